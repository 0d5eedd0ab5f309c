"""Shared test helpers: batches, leaves and gradients, the (dtype, tolerance)
table, and the comparisons of kernel results against the float64 oracle
(``grao_kernels.testing``, the only oracle of the ops; ``oracles.py`` holds
the trainer methods')."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grao_kernels.backends import BACKENDS, unavailable_reason
from grao_kernels.testing import assert_close, assert_within_torch_error, rel_l2  # noqa: F401 (the tests' helpers)


def backends_under_test(device: str = "cpu") -> list[str]:
    """Every backend that can run on ``device`` here (triton on CPU only under the interpreter)."""
    return [name for name in BACKENDS if unavailable_reason(name, torch.device(device)) is None]


# Every backend on every device present: CPU (triton through the interpreter),
# and CUDA when there is one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ON_DEVICE = [
    pytest.param(device, name, id=name if device == "cpu" else f"{name}-{device}")
    for device in DEVICES
    for name in backends_under_test(device)
]

# float32 is checked against fixed bounds; the low-precision dtypes against
# PyTorch's own error in that dtype: (factor, relative-L2 floor).
DTYPES = [
    pytest.param(torch.float32, None, id="fp32"),
    pytest.param(torch.bfloat16, (2.0, 1e-3), id="bf16"),
    pytest.param(torch.float16, (2.0, 1e-4), id="fp16"),
]
# float32 bounds: element-wise (rtol, atol) of log-probs and entropies, and the
# relative L2 error of gradients.
FP32_VALUES = dict(rtol=1e-5, atol=1e-5)
FP32_GRAD_REL_L2 = 1e-4


def make_batch(P, G, T, H, V, bias, dtype, *, empty_seq=True, tied_group=True, scale=1.0, device="cpu"):
    """A group-major GRAO batch: ``(hidden (S, T, H), weight (V, H), bias (V,) or None, targets (S, T), rewards (P, G+1))``.

    S = P (G+1) sequences with the reference last in each group; prompt
    positions and right padding of varying lengths are ignored (-100); with
    ``empty_seq`` sequence 1 has no completion tokens, with ``tied_group``
    the last group's rewards are all equal.
    """
    S = P * (G + 1)
    hidden = (torch.randn(S, T, H) * scale).to(dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    b = (torch.randn(V) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (S, T))
    for s in range(S):
        prompt = 1 + s % 2
        pad = (s * 3) % max(T - prompt, 1)
        targets[s, :prompt] = -100
        if pad:
            targets[s, T - pad :] = -100
    if empty_seq and S > 1:
        targets[1] = -100  # a completion with no tokens: J = 0, no NaN
    rewards = torch.randn(P, G + 1)
    if tied_group and P > 1:
        rewards[-1] = 0.25  # all equal: zero advantages
    return tuple(None if t is None else t.to(device) for t in (hidden, weight, b, targets, rewards))


def leaf(t, dtype=None):
    """A detached copy of ``t`` (in ``dtype``) that requires grad; None stays None."""
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def leaves(*tensors, dtype=None):
    return tuple(leaf(t, dtype) for t in tensors)


def grads(loss, *inputs):
    """Gradients of ``loss`` w.r.t. ``inputs`` (None entries give None)."""
    live = [x for x in inputs if x is not None]
    it = iter(torch.autograd.grad(loss, live))
    return [None if x is None else next(it) for x in inputs]


def assert_grads_close(got, want, names=("hidden", "weight", "bias"), *, bound=FP32_GRAD_REL_L2):
    """Each gradient finite and within ``bound`` relative L2 of the oracle's (None where the oracle has none)."""
    for name, g, r in zip(names, got, want):
        if r is None:
            continue
        assert g is not None, f"d{name} missing"
        assert torch.isfinite(g).all(), f"d{name}: {int((~torch.isfinite(g)).sum())} non-finite elements"
        err = rel_l2(g, r)
        assert err <= bound, f"d{name}: relative L2 {err:.2e} > {bound:.0e}"


# The trainer on the built-in demo: a tiny run configuration and its metrics.


def small(tmp_path, **kw):
    """A trainer config for a few seconds of the demo: 2 prompts x 3 samples, tiny data, no progress bar."""
    from grao.config import TrainConfig

    base = dict(
        steps=2,
        prompts_per_step=2,
        group_size=3,
        max_new_tokens=4,
        demo_train_size=32,
        eval_size=4,
        eval_every=1,
        save_every=1,
        warmup_steps=1,
        lr=1e-2,
        progress=False,
        plot=False,
        output_dir=str(tmp_path / "run"),
    )
    base.update(kw)
    return TrainConfig(**base)


REPO = Path(__file__).resolve().parents[1]


def spawn_grao(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """``grao ARGS`` of this checkout as a child process, its stdout and stderr piped (for signals and races)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "grao.cli", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def read_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(dir_a, dir_b, *modules) -> list[dict]:
    """Two runs logged the same lines (timings aside) and each ``(module_a, module_b)`` pair of ``modules`` ended
    with the same parameters: what an interrupted and resumed run must share with an uninterrupted one. Returns run
    a's metrics lines."""
    from grao.train.trainer import TIME_KEYS

    def strip(lines):
        return [{k: v for k, v in ln.items() if k not in TIME_KEYS} for ln in lines]

    a, b = strip(read_lines(dir_a)), strip(read_lines(dir_b))
    assert [ln["step"] for ln in a] == [ln["step"] for ln in b]
    for la, lb in zip(a, b):
        assert la.keys() == lb.keys()
        for k in la:
            assert la[k] == pytest.approx(lb[k], rel=1e-5, abs=1e-6), (la["step"], k)
    for module_a, module_b in modules:
        named_b = dict(module_b.named_parameters())
        assert named_b.keys() == dict(module_a.named_parameters()).keys()
        for n, pa in module_a.named_parameters():
            torch.testing.assert_close(pa, named_b[n], rtol=1e-5, atol=1e-6, msg=n)
    return a


# The smallest decoder config the tests build models from (random weights; vocabulary and special ids added).
TINY_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    tie_word_embeddings=False,
)


def save_tiny_llama(path, cls_name="LlamaForCausalLM", **fields):
    """A tiny random Llama (``cls_name`` from transformers, e.g. LlamaForSequenceClassification) with the demo
    tokenizer, saved as a local Hugging Face model directory at ``path``; ``fields`` override its config."""
    import transformers

    from grao import models

    tok = models.build_demo_tokenizer()
    config = dict(TINY_DECODER, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config.update(fields)
    getattr(transformers, cls_name)(transformers.LlamaConfig(**config)).save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def run_readme_section(heading: str, min_blocks: int = 1) -> dict:
    """Execute the python blocks of README's section ``## heading`` in order, in one namespace, and return it."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
    assert len(blocks) >= min_blocks, f"README's section {heading!r} has {len(blocks)} python examples"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md ({heading}, python block {i + 1})", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README python block {i + 1} of {heading!r} failed:\n{block}") from exc
    return namespace
