"""Packaging and the native build cache.

A wheel (``pip install .`` without ``-e``) ships the C++ sources as package
data, and an install of it into a fresh venv, used from outside the source
tree, builds or reuses the native backend and matches the float64 oracle.
A compiled library is keyed by what it depends on, not by paths: a second
process with another ``ninja``, another name for the same compiler, another
venv or another source location loads it without running ninja or the
compiler.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy
import pytest
import torch
from utils import FP32_VALUES, assert_close, assert_grads_close

from grao_kernels.backends import native_backend
from grao_kernels.testing import reference_logprobs

ROOT = Path(__file__).resolve().parents[2]
NATIVE_FILES = native_backend._SOURCES + native_backend._HEADERS
COMPILING = "compiling the native CPU backend"
# What a source distribution leaves out: VCS, environments, build outputs, run artefacts.
NOT_SHIPPED = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".benchmarks", "runs", "*.so")


@pytest.fixture(scope="module")
def native_library() -> Path:
    """The session's compiled native library (built now when missing)."""
    reason = native_backend.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"native backend unavailable: {reason}")
        pytest.fail(f"a C++ compiler is present but the native backend is unavailable: {reason}")
    lib, _ = native_backend._library()
    assert lib.is_file(), lib
    return lib


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


@pytest.fixture(scope="module")
def wheel_python(wheel, tmp_path_factory) -> Path:
    """The python of a fresh venv with the wheel installed; torch and numpy come from this interpreter's
    site-packages through a .pth file (nothing is downloaded, and this checkout is not on its path)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ninja = shutil.which("ninja", path=os.path.dirname(sys.executable))
    if ninja is not None:  # where `pip install ninja` puts it
        (venv / "bin" / "ninja").symlink_to(ninja)
    shared = sorted({str(Path(m.__file__).resolve().parents[1]) for m in (torch, numpy)})
    Path(purelib, "shared-site-packages.pth").write_text("".join(p + "\n" for p in shared))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
        + ["--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return python


def _clean_env(**update: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRAO_KERNELS_BACKEND")}
    env.update(update)
    return env


# Runs in the installed venv, from a directory outside the checkout: the
# package's location, its sources' location, and the native backend's
# log-probs and dhidden of a small case saved for the parent to check.
WHEEL_SCRIPT = """
    import json, sys
    import torch
    import grao_kernels
    from grao_kernels import fused_linear_logprobs
    from grao_kernels.backends import native_backend

    torch.manual_seed(0)
    h = torch.randn(37, 24, requires_grad=True)
    w = torch.randn(1003, 24) / 24**0.5
    b = torch.randn(1003)
    t = torch.randint(0, 1003, (37,))
    t[::4] = -100
    logp = fused_linear_logprobs(h, w, t, bias=b, backend="native")
    (logp * torch.linspace(-1, 1, 37)).sum().backward()
    torch.save({"h": h.detach(), "w": w, "b": b, "t": t, "logp": logp.detach(), "dh": h.grad}, sys.argv[1])
    print(json.dumps({"package": grao_kernels.__file__, "csrc": str(native_backend._CSRC),
                      "library": str(native_backend._library()[0])}))
"""


def _run_installed(python: Path, cwd: Path, build_dir: Path) -> tuple[dict, dict, str]:
    out = cwd / "result.pt"
    proc = subprocess.run(
        [python, "-c", textwrap.dedent(WHEEL_SCRIPT), str(out)],
        cwd=cwd,
        env=_clean_env(GRAO_KERNELS_BUILD_DIR=str(build_dir)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return info, torch.load(out), proc.stderr


def _check_installed_run(info: dict, result: dict, venv_python: Path) -> None:
    package = Path(info["package"]).resolve()
    assert ROOT not in package.parents, f"grao_kernels was imported from the checkout: {package}"
    assert venv_python.parents[1] in package.parents, f"grao_kernels is not the venv's install: {package}"
    csrc = Path(info["csrc"])
    assert csrc.parent == package.parent and all((csrc / f).is_file() for f in NATIVE_FILES), csrc
    h = result["h"].double().requires_grad_()
    ref = reference_logprobs(h, result["w"].double(), result["t"], bias=result["b"].double())
    (ref * torch.linspace(-1, 1, 37, dtype=torch.float64)).sum().backward()
    assert_close(result["logp"], ref.detach(), **FP32_VALUES, name="installed native logp")
    assert_grads_close((result["dh"],), (h.grad,), names=("hidden",))


def test_wheel_ships_the_native_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in NATIVE_FILES if f"grao_kernels/csrc/{f}" not in names]
    assert not missing, f"{wheel.name} lacks grao_kernels/csrc/{missing}"


def test_wheel_ships_the_compile_check(wheel):
    """``python -m grao_kernels.triton_kernels.compile_check`` runs from an install, not only from the checkout."""
    assert "grao_kernels/triton_kernels/compile_check.py" in zipfile.ZipFile(wheel).namelist(), wheel.name


@pytest.mark.slow
def test_wheel_install_runs_the_native_backend_reusing_the_cache(wheel_python, native_library, tmp_path):
    # Another venv and another source location with the same toolchain: the
    # session's library is loaded as is, not rebuilt.
    before = native_library.stat().st_mtime_ns
    info, result, stderr = _run_installed(wheel_python, tmp_path, native_library.parents[1])
    _check_installed_run(info, result, wheel_python)
    assert Path(info["library"]) == native_library
    assert COMPILING not in stderr, stderr[-2000:]
    assert native_library.stat().st_mtime_ns == before, "the cached library was rebuilt"


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("GRAO_KERNELS_TEST_COLD_BUILD") != "1",
    reason="compiles the extension from the installed sources; set GRAO_KERNELS_TEST_COLD_BUILD=1",
)
def test_wheel_install_builds_the_native_backend(wheel_python, tmp_path):
    build = tmp_path / "build"
    info, result, stderr = _run_installed(wheel_python, tmp_path, build)
    _check_installed_run(info, result, wheel_python)
    assert COMPILING in stderr
    assert Path(info["library"]).parent.parent == build and Path(info["library"]).is_file()


def test_cached_library_loads_without_ninja_for_an_equivalent_toolchain(native_library, tmp_path):
    # A `ninja` first on PATH that records any call and fails, and the same
    # compiler under another name: the cached library must load without
    # either being needed for a build.
    shims = tmp_path / "bin"
    shims.mkdir()
    log = tmp_path / "ninja-calls"
    (shims / "ninja").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 1\n')
    (shims / "ninja").chmod(0o755)
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    (shims / "my-cxx").symlink_to(cxx)
    before = native_library.stat().st_mtime_ns
    code = (
        "import torch\n"
        "from grao_kernels.backends import native_backend as nb\n"
        "print(nb.unavailable_reason(torch.device('cpu')), nb._library()[0], torch.ops.grao_native)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_clean_env(
            PYTHONPATH=str(ROOT),
            PATH=f"{shims}{os.pathsep}{os.environ.get('PATH', '')}",
            CXX=str(shims / "my-cxx"),
            GRAO_KERNELS_BUILD_DIR=str(native_library.parents[1]),
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[:2] == ["None", str(native_library)], proc.stdout + proc.stderr[-2000:]
    assert not log.exists(), f"ninja was run: {log.read_text()}"
    assert COMPILING not in proc.stderr, proc.stderr[-2000:]
    assert native_library.stat().st_mtime_ns == before, "the cached library was rebuilt"


def test_build_key_follows_the_compiler_not_its_name(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "alias-c++").symlink_to(cxx)
    other = tmp_path / "other-c++"
    other.write_text("#!/bin/sh\necho 'other-c++ (Other) 99.1'\n")
    other.chmod(0o755)
    real = native_backend._compiler_identity(cxx)
    assert native_backend._compiler_identity(str(tmp_path / "alias-c++")) == real
    assert native_backend._compiler_identity(str(other)) == "(Other) 99.1" != real
    flags = native_backend._flags()
    name = native_backend._build_name(native_backend._build_key(flags, real))
    assert name == native_backend._build_name(native_backend._build_key(list(flags), real))
    assert name != native_backend._build_name(native_backend._build_key(flags, "(Other) 99.1"))
    assert name != native_backend._build_name(native_backend._build_key(flags + ["-DX"], real))


def test_ninja_of_a_venv_that_is_not_activated_is_found(monkeypatch, tmp_path):
    # `venv/bin/python script.py` without activating the venv: the ninja pip
    # package's executable sits beside the interpreter, not on PATH.
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "ninja").write_text("#!/bin/sh\nexit 0\n")
    (venv_bin / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setitem(sys.modules, "ninja", None)  # the ninja package itself not importable
    assert native_backend._ninja_dir() == str(venv_bin)
    (venv_bin / "ninja").unlink()
    with pytest.raises(RuntimeError, match=r"the 'ninja' build tool is missing \(pip install ninja\)"):
        native_backend._ninja_dir()
    monkeypatch.setenv("PATH", f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    (venv_bin / "ninja").write_text("#!/bin/sh\nexit 0\n")
    (venv_bin / "ninja").chmod(0o755)
    assert native_backend._ninja_dir() is None  # on PATH: nothing to add


def _run_python(code: str, **env: str) -> dict:
    """``code`` in a fresh interpreter on this checkout; its last stdout line, parsed as JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=_clean_env(PYTHONPATH=str(ROOT), **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_without_a_compiler_auto_warns_once_and_native_raises(tmp_path):
    out = _run_python(
        """
        import json, warnings
        import torch
        from grao_kernels import grao_loss
        h, w = torch.randn(2, 3, 8), torch.randn(20, 8)
        t, r = torch.randint(0, 20, (2, 3)), torch.randn(1, 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            auto = grao_loss(h, w, t, r, group_size=1).loss
            again = grao_loss(h, w, t, r, group_size=1).loss
        ref = grao_loss(h, w, t, r, group_size=1, backend="torch").loss
        try:
            grao_loss(h, w, t, r, group_size=1, backend="native")
            err = None
        except ValueError as e:
            err = str(e)
        print(json.dumps({"warnings": [str(x.message) for x in caught if x.category is RuntimeWarning],
                          "same": bool(auto == ref) and bool(again == ref), "err": err}))
        """,
        CXX="/nonexistent/c++",
        GRAO_KERNELS_BUILD_DIR=str(tmp_path),
    )
    assert len(out["warnings"]) == 1 and "'native' is unavailable" in out["warnings"][0], out
    assert "no C++ compiler" in out["warnings"][0]
    assert out["same"]
    assert out["err"] is not None and "backend 'native' cannot run" in out["err"] and "no C++ compiler" in out["err"]
    assert not any(tmp_path.iterdir())  # nothing built, nothing left behind


def test_import_compiles_nothing(tmp_path):
    out = _run_python(
        """
        import json, os, sys
        import grao_kernels
        from grao_kernels.backends import native_backend
        build = native_backend.build_dir()
        print(json.dumps({"state": sorted(native_backend._state), "built": build.exists()}))
        """,
        GRAO_KERNELS_BUILD_DIR=str(tmp_path / "build"),
    )
    assert out == {"state": [], "built": False}


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("GRAO_KERNELS_TEST_COLD_BUILD") != "1",
    reason="compiles the extension from scratch; set GRAO_KERNELS_TEST_COLD_BUILD=1",
)
def test_concurrent_first_use_builds_share_one_cache(tmp_path):
    code = (
        "import torch\n"
        "from grao_kernels.backends import native_backend as nb\n"
        "print(nb.unavailable_reason(torch.device('cpu')))\n"
    )
    env = _clean_env(PYTHONPATH=str(ROOT), GRAO_KERNELS_BUILD_DIR=str(tmp_path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0 and stdout.strip() == "None", stderr[-3000:]
    (lib,) = tmp_path.glob("grao_native_*/grao_native_*.so")
    assert (lib.parent / "build.json").is_file()
