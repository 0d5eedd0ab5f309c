"""``python -m grao``: the ``grao`` command."""

import sys

from .cli import main

sys.exit(main())
