"""The run's PNG plot: rewards, and each GRAO objective term's share, over the training steps."""

from __future__ import annotations

from pathlib import Path

TERMS = ("exploration", "imitation", "alignment")


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of a metrics.jsonl."""
    from .run_dir import read_metrics as read_lines

    train, evals = [], []
    for rec in read_lines(Path(path))[0]:
        (evals if "eval/reward" in rec else train).append(rec)
    return train, evals


def term_shares(train: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, shares): |term| / (|exploration| + |imitation| + |alignment|) per step.

    Steps without the terms (other methods) or where every term is 0 (each group's rewards tied, so no advantage) are left out.
    """
    steps, shares = [], {t: [] for t in TERMS}
    for rec in train:
        if not all(f"objective/{t}" in rec for t in TERMS):  # a method without GRAO's terms (sft, grpo)
            continue
        mags = [abs(rec[f"objective/{t}"]) for t in TERMS]
        total = sum(mags)
        if total > 0:
            steps.append(rec["step"])
            for t, m in zip(TERMS, mags):
                shares[t].append(m / total)
    return steps, shares


def plot_metrics(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path)
    if not train and not evals:
        return None
    window = max(1, len(train) // 25)
    steps = [r["step"] for r in train]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    if train:
        ax1.plot(steps, _smooth([r["reward/samples"] for r in train], window), label="reward/samples (train)")
        ax1.plot(steps, _smooth([r["reward/reference"] for r in train], window), label="reward/reference", ls="--")
    if evals:
        ax1.plot([r["step"] for r in evals], [r["eval/reward"] for r in evals], "o-", label="eval/reward (held out)")
    ax1.set_ylabel("reward")
    ax1.set_title(f"GRAO training (moving average over {window} steps)")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="best")
    if train:
        share_steps, shares = term_shares(train)
        for term, values in shares.items():
            ax2.plot(share_steps, _smooth(values, window), label=term)
    ax2.set_ylabel("share of |objective|")
    ax2.set_xlabel("step")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    ax2.legend(loc="best")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
