"""Packaging: a wheel (``pip install .`` without ``-e``) ships the C++ sources of the native backend."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from grao_kernels.backends import native_backend

ROOT = Path(__file__).resolve().parents[1]
NATIVE_FILES = native_backend._SOURCES + native_backend._HEADERS
# What a source distribution leaves out: VCS, environments, build outputs, run artefacts.
NOT_SHIPPED = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".benchmarks", "runs", "*.so")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built by pip from a clean copy of the source tree, without build isolation or the index."""
    pytest.importorskip("setuptools")
    pytest.importorskip("pip")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    # A copy, so that no stale build/ of the checkout reaches the wheel and the checkout stays clean.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["--disable-pip-version-check", "-w", str(tmp / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (found,) = (tmp / "dist").glob("grao_kernels-*.whl")
    return found


def test_wheel_ships_the_native_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in NATIVE_FILES if f"grao_kernels/csrc/{f}" not in names]
    assert not missing, f"{wheel.name} lacks grao_kernels/csrc/{missing}"
