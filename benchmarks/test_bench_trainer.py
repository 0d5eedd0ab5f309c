"""One GRAO training step of ``grao.Trainer``: generation, forward+backward, optimizer; grao_loss vs full logits.

The "full logits" variant runs the same step with the loss computed by the eager reference (``lm_head`` logits
materialised, ``grao_kernels.testing.reference_grao``) in place of ``grao_loss``. Peak memory is that of one
step in a fresh process (CPU: RSS high-water mark; GPU: ``torch.cuda.max_memory_allocated``), above the state
after a first, untimed step (model, optimizer state and allocator warm).

The demo tokenizer is character-level, so the tiny MoE's vocabulary is small and its logits are too; the
memory gap that full logits open at real vocabularies is measured by the op benchmarks.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile

import pytest
import torch
from harness import device_name, fresh, import_error, rounds, timed

from grao_kernels.testing import peak_meter

VARIANTS = ("grao_loss", "full_logits")
PHASES = ("generation_s", "fwd_bwd_s", "optimizer_s")
# ~1B parameters: 12 MoE layers of 16 experts (top-2) of 3 x 2048 x 768, plus attention.
MOE_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    moe_intermediate_size=768,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=16,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
)
# (device, model): the TrainConfig fields of its case beyond those every case shares (see ``_trainer``).
CASES = {("cpu", "tiny_moe"): {}, ("cuda", "moe_1b"): dict(model_overrides=MOE_1B, max_new_tokens=32)}


def _full_logits_loss(hidden, weight, targets, rewards, *, group_size, backend="auto", **kw):
    """``grao_loss``'s signature over ``reference_grao`` (the remaining keywords: bias, beta, lam, logit_scale,
    softcap, ignore_index, passed through); ``backend`` is ignored."""
    from grao_kernels import GRAOOutput
    from grao_kernels.testing import reference_grao

    if rewards.shape[1] != group_size + 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} do not hold group_size + 1 = {group_size + 1} columns")

    r = reference_grao(hidden, weight, targets, rewards, **kw)
    terms = (r[k].detach().float() for k in ("advantages", "seq_logp", "exploration", "imitation", "alignment"))
    return GRAOOutput(r["loss"], *terms)


@contextlib.contextmanager
def _trainer(device: str, model: str, variant: str):
    """A ``grao.Trainer`` of one variant (its loss a constructor argument) in a temporary output directory."""
    from grao import GRAO, TrainConfig, Trainer

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="grao-bench-") as tmp:
        common = dict(output_dir=tmp, steps=100, plot=False, progress=False, eval_size=8, seed=0, device=device)
        cfg = TrainConfig(demo_train_size=256, prompts_per_step=16, group_size=8, **common, **CASES[device, model])
        loss = GRAO(cfg.beta, cfg.lam, cfg.loss_backend, fn=_full_logits_loss) if variant == "full_logits" else None
        try:
            yield Trainer(cfg, loss=loss)
        finally:
            torch.set_num_threads(threads)


def _step(tr, i: int) -> dict:
    """Optimizer step ``i``, timed in its three phases; its training tokens and loss."""
    dev = str(tr.runtime.device)
    gen_s, _, ro = timed(lambda: tr.rollout(tr.prompts_for_step(i), i), dev)
    fwd_bwd_s, _, stats = timed(lambda: tr.accumulate_gradients(ro), dev)
    opt_s = timed(tr.optimizer_step, dev)[0]
    return dict(zip(PHASES, (gen_s, fwd_bwd_s, opt_s)), train_tokens=stats["train_tokens"], loss=stats["loss"])


def _probe(device: str, model: str, variant: str) -> dict:
    """Step 2 with its peak memory above the state after step 1, and its loss (for the agreement check)."""
    with _trainer(device, model, variant) as tr:
        _step(tr, 1)
        peak = peak_meter(device)
        return dict(_step(tr, 2), peak_mem_bytes=peak())


@functools.cache
def _probe_cached(device: str, model: str, variant: str) -> dict:
    """``_probe`` in a fresh process on CPU (RSS high-water mark), in this one on a GPU."""
    args = (device, model, variant)
    return _probe(*args) if device != "cpu" else fresh(f"trainer probe {args}", _probe, *args)


def _skip_reason(device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "the ~1B MoE step needs a CUDA device"
    if device == "cpu" and torch.cuda.is_available():
        return "the tiny-MoE step runs on CPU-only machines (this one benchmarks CUDA)"
    return import_error("grao.train.trainer", "train")


@pytest.mark.parametrize(
    ("device", "model", "variant"),
    [
        pytest.param(d, m, v, id=f"{d}-{m}-{v}", marks=[pytest.mark.gpu] if d == "cuda" else [])
        for d, m in CASES
        for v in VARIANTS
    ],
)
def test_trainer_step(benchmark, device, model, variant):
    reason = _skip_reason(device)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"trainer {device} {model}"
    mem = _probe_cached(device, model, variant)
    ref = _probe_cached(device, model, "grao_loss")
    # The same step from the same state: both variants must reach the same loss.
    assert abs(mem["loss"] - ref["loss"]) <= 2e-3 * max(abs(ref["loss"]), 1e-3), (mem["loss"], ref["loss"])

    phases = []
    with _trainer(device, model, variant) as tr:
        _step(tr, 1)  # warm: first generation, optimizer state allocation
        step = lambda: phases.append(_step(tr, len(phases) + 2))  # noqa: E731
        benchmark.pedantic(step, rounds=rounds(device)[0], warmup_rounds=0, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    best = min(phases, key=lambda p: sum(p[k] for k in PHASES))
    total = sum(best[k] for k in PHASES)
    full = variant == "full_logits"
    benchmark.extra_info.update(
        best,
        op="trainer_step",
        method=variant,
        label=f"GRAO step ({'full logits' if full else 'grao_loss'})",
        kind="peer" if full else "ours",
        mode="step",
        model=model,
        device=device,
        device_name=device_name(device),
        dtype="bfloat16 autocast" if device == "cuda" else "float32",
        time_s=total,
        tokens_per_s=best["train_tokens"] / total,
        fwd_bwd_tokens_per_s=best["train_tokens"] / best["fwd_bwd_s"],
        peak_mem_bytes=mem["peak_mem_bytes"],
    )
