"""``python -m grao.cli``: the ``grao`` command."""

import sys

from . import main

sys.exit(main())
