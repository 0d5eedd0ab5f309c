"""The PNG plots: a run's rewards and GRAO term shares (of the objective's value and of its gradient) over its
steps, and ``grao compare``'s figures."""

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
    from ..train.run_dir import read_metrics as read_lines

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


def gradient_shares(evals: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, shares): each GRAO term's ``terms/grad_share/<term>`` (its gradient norm on the probe batch over the
    three norms' sum) at the evaluations that logged it."""
    steps, shares = [], {t: [] for t in TERMS}
    for rec in evals:
        if all(f"terms/grad_share/{t}" in rec for t in TERMS):
            steps.append(rec["step"])
            for t in TERMS:
                shares[t].append(rec[f"terms/grad_share/{t}"])
    return steps, shares


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, out_path: str | Path) -> Path:
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def plot_metrics(metrics_path: str | Path, out_path: str | Path, method: str = "grao") -> Path | None:
    """A run's ``plot.png`` (:func:`metrics_figure`); None when ``metrics_path`` holds no line yet."""
    plt = _pyplot()
    train, evals = read_metrics(metrics_path)
    if not train and not evals:
        return None
    return _save(metrics_figure(plt, train, evals, method), plt, out_path)


def metrics_figure(plt, train: list[dict], evals: list[dict], method: str):
    """Rewards over the steps (top), titled by ``method``; below, each GRAO term's share of the objective's value for
    the grao methods, the loss for the others (which have no GRAO terms); under the value shares, when the
    evaluations measured them, each term's share of the gradient norm on the probe batch, a marker per
    evaluation."""
    window = max(1, len(train) // 25)
    steps = [r["step"] for r in train]
    grad_steps, grad_shares = gradient_shares(evals)
    rows = 3 if grad_steps else 2
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3.5 * rows), sharex=True)
    ax1, ax2 = axes[:2]
    if train:
        ax1.plot(steps, _smooth([r["reward/samples"] for r in train], window), label="reward/samples (train)")
        ax1.plot(steps, _smooth([r["reward/reference"] for r in train], window), label="reward/reference", ls="--")
    if evals:
        ax1.plot([r["step"] for r in evals], [r["eval/reward"] for r in evals], "o-", label="eval/reward (held out)")
    ax1.set_ylabel("reward")
    ax1.set_title(f"{method} training (moving average over {window} steps)")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="best")
    share_steps, shares = term_shares(train)
    if share_steps:
        for term, values in shares.items():
            ax2.plot(share_steps, _smooth(values, window), label=term)
        ax2.set_ylabel("share of |objective|")
        ax2.set_ylim(0, 1)
    else:
        ax2.plot(steps, _smooth([r.get("loss", float("nan")) for r in train], window), label="loss")
        ax2.set_ylabel("loss")
    if grad_steps:
        for term, values in grad_shares.items():
            axes[2].plot(grad_steps, values, "o-", ms=3, label=term)
        axes[2].set_ylabel("share of gradient norm\n(probe batch)")
        axes[2].set_ylim(0, 1)
    for ax in axes[1:]:
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    axes[-1].set_xlabel("step")
    return fig


# ---------------------------------------------------------------------- grao compare (grao.tools.compare)


def plot_compare_curves(curves: dict[str, list[list]], out_path: str | Path) -> Path:
    """Held-out reward against step per label: the mean over seeds, and a band from the lowest to the highest seed.

    ``curves[label]`` is one ``[[step, reward], ...]`` list per seed; a step is drawn where every seed evaluated.
    """
    plt = _pyplot()
    return _save(compare_curves_figure(plt, curves), plt, out_path)


def compare_curves_figure(plt, curves: dict[str, list[list]]):
    """The figure of :func:`plot_compare_curves`: a marker at each evaluation, a band where a label has 2+ seeds."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, per_seed in curves.items():
        common = sorted(set.intersection(*({s for s, _ in c} for c in per_seed)))
        by_seed = [dict((s, r) for s, r in c) for c in per_seed]
        values = [[seed[s] for seed in by_seed] for s in common]
        mean = [sum(v) / len(v) for v in values]
        (line,) = ax.plot(common, mean, "o-", ms=3, label=f"{label} (n={len(per_seed)})")
        if len(per_seed) > 1:
            ax.fill_between(
                common, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2
            )
    ax.set_xlabel("step")
    ax.set_ylabel("held-out reward (eval/reward)")
    banded = any(len(per_seed) > 1 for per_seed in curves.values())
    ax.set_title("held-out reward: mean over seeds" + (", band = min to max" if banded else ", one seed (no band)"))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


def plot_compare_shares(shares: dict[str, list[tuple]], out_path: str | Path) -> Path:
    """Figure-5-style: per label, the share of each GRAO term in |objective| over the steps, mean over seeds.

    ``shares[label]`` is one :func:`term_shares` result ``(steps, {term: values})`` per seed; each step's share is
    the mean over the seeds that have it, smoothed as in :func:`plot_metrics`.
    """
    plt = _pyplot()
    n = len(shares)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), sharey=True, squeeze=False)
    for ax, (label, per_seed) in zip(axes.flat, shares.items()):
        by_step: dict[int, list[list[float]]] = {}
        for steps, values in per_seed:
            for i, step in enumerate(steps):
                by_step.setdefault(step, []).append([values[t][i] for t in TERMS])
        steps = sorted(by_step)
        window = max(1, len(steps) // 25)
        mean = [[sum(v[k] for v in by_step[s]) / len(by_step[s]) for s in steps] for k in range(len(TERMS))]
        ax.stackplot(steps, *[_smooth(m, window) for m in mean], labels=TERMS, alpha=0.85)
        ax.set_title(f"{label} (n={len(per_seed)})", fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of |objective|")
    axes.flat[0].legend(loc="lower left", fontsize="small")
    return _save(fig, plt, out_path)


def plot_sweep(grids: dict[str, dict[tuple[float, float], float]], out_path: str | Path) -> Path:
    """Per method, a beta x lambda heatmap of the final held-out reward (``grids[method][(beta, lam)]``, the mean
    over seeds), each cell annotated with its value; a grid point not run is blank."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(4.5 * len(grids), 4), squeeze=False)
    for ax, (method, grid) in zip(axes[0], grids.items()):
        betas = sorted({b for b, _ in grid})
        lams = sorted({lam for _, lam in grid})
        table = [[grid.get((b, lam), float("nan")) for lam in lams] for b in betas]
        image = ax.imshow(table, origin="lower", cmap="viridis", aspect="auto")
        for i, row in enumerate(table):
            for j, value in enumerate(row):
                if value == value:
                    ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="w", fontsize="small")
        ax.set_xticks(range(len(lams)), [f"{v:g}" for v in lams])
        ax.set_yticks(range(len(betas)), [f"{v:g}" for v in betas])
        ax.set_xlabel("λ (alignment weight)")
        ax.set_ylabel("β (imitation weight)")
        ax.set_title(f"{method}: final held-out reward")
        fig.colorbar(image, ax=ax)
    return _save(fig, plt, out_path)
