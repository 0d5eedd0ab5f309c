"""`import grao_kernels` (and the integrations package itself) imports neither TRL, verl nor transformers."""

from __future__ import annotations

import subprocess
import sys


def test_import_grao_kernels_stays_free_of_frameworks():
    code = (
        "import sys, grao_kernels, grao_kernels.integrations\n"
        "print(sorted(m for m in ('trl', 'verl', 'transformers', 'ray', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
