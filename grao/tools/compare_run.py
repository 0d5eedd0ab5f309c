"""One run of ``grao compare`` in a process of its own (``python -m grao.tools.compare_run <grao train flags>``),
so that the peak memory it records is the run's alone."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from .. import cli
from .compare_runner import RECORD


def _peak_memory() -> dict:
    """This process's peak RSS (MiB) and, when CUDA was used, the peak of ``torch.cuda.max_memory_allocated``."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    cuda = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        cuda = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20
    return {"peak_rss_mib": rss_mib, "cuda_max_allocated_mib": cuda}


def code_version() -> str:
    """The code this process runs: ``git <commit>`` of the checkout holding the ``grao`` package (``+changes`` when
    tracked files differ from it), else the installed distribution's version."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD") if (root / ".git").exists() else None
    if commit:
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "grao", "grao_kernels", "csrc")
        return f"git {commit[:12]}" + ("+changes" if changed else "")
    try:
        return f"grao-kernels {metadata.version('grao-kernels')}"
    except metadata.PackageNotFoundError:
        return "unknown"


def child_main(argv: list[str]) -> int:
    """``python -m grao.tools.compare_run <grao train flags>``: one run, then its peak memory appended to ``compare-run.json``."""

    t0 = time.perf_counter()
    rc = cli.main(["train", *argv])
    out = Path(next(a for a in argv if a.startswith("--output-dir=")).split("=", 1)[1])  # set by train_run
    if out.is_dir():
        path = out / RECORD
        record = json.loads(path.read_text()) if path.is_file() else {"segments": []}
        record["segments"].append(
            {
                "exit_status": rc,
                "resumed": "--resume" in argv,
                "train_s": time.perf_counter() - t0,
                "code": code_version(),
                **_peak_memory(),
            }
        )
        path.write_text(json.dumps(record, indent=1) + "\n")
    return rc


# ---------------------------------------------------------------------- results


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
