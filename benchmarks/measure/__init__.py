"""The one measurement harness, by job: each module below does one, each front end composes them.

``device`` (device, its name, synchronised timing) -> ``shapes`` (shapes, the one input factory) -> ``methods``
(ours and the peers, one ``Method`` each) -> ``oracle`` (float64 sketches) -> ``memory`` (the peak-memory probe,
fresh processes) -> ``gate`` (oracle gate, cached per shape) -> ``floor`` (the three-GEMM floor) -> ``timing``
(``compare``: gate, memory and interleaved timing against the floor) -> ``suite`` (the pytest-benchmark cases).

Front ends: the pytest-benchmark suite (``benchmarks/test_bench_*.py``), the GPU check (``benchmarks/gpu/check.py``),
the native floor script (``benchmarks/native_floor.py``), ``benchmarks/integrations_step.py``,
``benchmarks/rollout_step.py`` and the memory test
(``tests/kernels/test_memory.py``, through ``python benchmarks/harness.py probe``), all through ``benchmarks/harness.py``.
``benchmarks/render.py`` turns their results into Markdown and plots.

FLOP counts (N tokens, V vocabulary entries, H hidden size; one multiply-add = 2 FLOPs): the logits ``Z = h W^T``,
``dH = dZ W`` and ``dW = dZ^T h`` are 2 N V H each. No method avoids these three products, so their time on this
device (the "GEMM floor") is the yardstick: the forward against the logits GEMM, the backward against dH + dW,
forward+backward against all three. A logits-free method that recomputes the logits in its backward does a fourth
product: about 1.33x the floor is its best forward+backward.

Honesty rules: every method passes the oracle gate before it is timed; ratios are taken within one run (the floor
is timed in the same process, interleaved with the methods where a front end repeats); a method that cannot run
is skipped with the reason.
"""
