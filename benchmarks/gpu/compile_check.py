"""Compile the triton backend's kernels for NVIDIA GPUs without one (ahead of time, down to cubin).

The interpreter, which the CPU test suite runs, never lowers a kernel, so a
kernel that only fails to compile (a type error in an scf.if, a tile that does
not fit) would pass CI. This compiles every autotuning config for the given
architectures with the ptxas bundled in the triton wheel; no device is needed.

    python benchmarks/gpu/compile_check.py [--arch 90 80] [--dtype bf16 fp32] [--first]

``--first`` compiles only the first config of each list (the quick test).
Exit status 0 when everything compiled.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _compile(fn, types: dict, consts: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    t0 = time.time()
    triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32))
    return time.time() - t0


def jobs(dtypes, first):
    """(label, kernel, argument types, constexprs) for every kernel, dtype and config."""
    from grao_kernels.triton_kernels import dlogits, group_ops, logprob_backward, lse_forward

    i32, f32 = "i32", "fp32"
    for dt in dtypes:
        p = "*" + dt
        common = {"hidden_ptr": p, "weight_ptr": p, "bias_ptr": p, "targets_ptr": "*i64", "rows_ptr": "*i32"}
        common.update({"n_valid_ptr": "*i32", "V": i32, "H": i32, "inv_temp": f32})
        strides = {k: i32 for k in ("stride_hn", "stride_hh", "stride_wv", "stride_wh")}
        fwd = {**common, **strides, "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_tgt_ptr": "*fp32"}
        fwd.update({"v_per_split": i32, "stride_ps": i32})
        bwd = {**common, **strides, "coef_ptr": "*fp32", "lse_ptr": "*fp32", "logp_ptr": "*fp32"}
        bwd.update({k: "*fp32" for k in ("dhidden_ptr", "dweight_ptr", "dbias_ptr")})
        bwd.update({k: i32 for k in ("N", "stride_dhn", "stride_dhh", "stride_dwv", "stride_dwh")})
        bwd["filter_eps"] = f32
        dlg = {**common, **strides, "coef_ptr": "*fp32", "lse_ptr": "*fp32", "logp_ptr": "*fp32", "dz_ptr": p}
        dlg.update({"dbias_ptr": "*fp32", "N": i32, "v_start": i32, "v_end": i32, "stride_dzn": i32})
        del dlg["V"]
        fwd_cfgs = lse_forward.CONFIGS_FP32 if dt == "fp32" else lse_forward.CONFIGS
        bwd_cfgs = logprob_backward.CONFIGS_FP32 if dt == "fp32" else logprob_backward.CONFIGS
        flags = {"DOT_PRECISION": "ieee", "UPCAST_DOT": False}
        dlg_cfgs = dlogits.CONFIGS_FP32 if dt == "fp32" else dlogits.CONFIGS
        for cfg in dlg_cfgs[:1] if first else dlg_cfgs:
            consts = {"HAS_BIAS": True, **flags, **cfg.kwargs}
            yield f"dlogits {dt} {cfg.kwargs}", dlogits.dlogits_kernel, dlg, consts
        for cfg in fwd_cfgs[:1] if first else fwd_cfgs:
            consts = {"HAS_BIAS": True, **flags, **cfg.kwargs}
            yield f"lse_forward {dt} {cfg.kwargs}", lse_forward.lse_forward_kernel, fwd, consts
        for cfg in bwd_cfgs[:1] if first else bwd_cfgs:
            for filt in (False, True) if dt != "fp32" else (False,):
                consts = {"HAS_BIAS": True, "FILTER": filt, **flags, **cfg.kwargs}
                yield (
                    f"logprob_backward {dt} FILTER={filt} {cfg.kwargs}",
                    logprob_backward.logprob_backward_kernel,
                    bwd,
                    consts,
                )
    adv = {"rewards_ptr": "*fp32", "adv_ptr": "*fp32", "P": i32, "K": i32, "eps": f32}
    adv.update({"stride_rp": i32, "stride_rk": i32, "stride_ap": i32})
    yield "group_advantages", group_ops.group_advantages_kernel, adv, {"IS_FP64": False, "BLOCK_P": 8, "BLOCK_K": 8}
    coef = {"adv_ptr": "*fp32", "targets_ptr": "*i64", "coef_ptr": "*fp32", "n_ptr": "*fp32", "P": i32, "T": i32}
    coef.update({"G": i32, "ignore_index": i32, "beta": f32, "lam": f32})
    coef.update({k: i32 for k in ("stride_ap", "stride_ak", "stride_ts", "stride_tt")})
    yield "token_coefficients", group_ops.token_coefficients_kernel, coef, {"BLOCK_T": 256, "BLOCK_G": 4}
    seq = {"logp_ptr": "*fp32", "n_ptr": "*fp32", "out_ptr": "*fp32", "T": i32, "stride_ls": i32, "stride_lt": i32}
    yield "sequence_logp", group_ops.sequence_logp_kernel, seq, {"BLOCK_T": 256}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"])
    parser.add_argument("--first", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile check: unset TRITON_INTERPRET (interpreted kernels are never compiled)", file=sys.stderr)
        return 2
    failed = 0
    for arch in args.arch:
        for label, fn, types, consts in jobs(args.dtype, args.first):
            try:
                print(f"sm_{arch} {label}: {_compile(fn, types, consts, arch):.1f}s", flush=True)
            except Exception as exc:
                failed += 1
                print(f"sm_{arch} {label}: FAILED {type(exc).__name__}: {str(exc)[:400]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
