"""``compare``: gate, memory and time against the floor of (method, op) cases, interleaved per repetition."""

from __future__ import annotations

import functools
import statistics
import time

import torch

from .device import device_name, timed
from .floor import floor_all, release
from .gate import check
from .methods import METHODS, warm_up
from .shapes import computed_rows, make_inputs


def compare(shapes, cases, reps: int, deadline_s: float | None = None, log=print) -> dict:
    """Forward+backward of each (method key, op) at each shape against the floor: gate, memory, interleaved time.

    Per shape, in three phases so that nothing one phase holds distorts another: every case's gate and memory probe
    (no floor buffers and no timing inputs allocated); then the timing inputs and an untimed warm-up of each method
    that passed, at the real shape (autotuning); then per repetition the floor (its buffers built, timed, freed)
    and every method back to back. The ratio method / floor is taken per repetition and the median reported, for
    wall and for process CPU time. The floor covers the rows the methods compute (``floor_rows``).
    """
    t_start, results = time.time(), []
    for shape in shapes:
        res = {"shape": shape.__dict__, "grad_bytes": None, "rows": [], "floor_rows": computed_rows(shape)}
        passed = []
        for key, op in cases:
            m, row = METHODS[key], {"method": key, "label": METHODS[key].label, "op": op, "kind": METHODS[key].kind}
            res["rows"].append(row)
            reason = m.skip_reason(shape, op)
            if reason or (deadline_s and time.time() - t_start > deadline_s):
                row["status"] = f"skipped: {reason or 'time budget'}"
                continue
            try:
                mem, row["errors"], res.setdefault("eager_errors", {})[op], bad = check(key, op, shape)
            except Exception as exc:  # a peer's version mismatch or an out-of-memory must not hide the other rows
                row["status"] = f"error: {str(exc).strip().splitlines()[-1][:200]}"  # the child's last traceback line
                continue
            if bad:  # a fast wrong number is never timed
                row["status"] = "FAIL: " + ", ".join(bad)
                continue
            row.update({k: mem[k] for k in ("peak_full", "working_full", "grad_bytes", "memory_method")}, status="ok")
            res["grad_bytes"] = mem["grad_bytes"]
            passed.append((key, op))
            log(f"[{shape.id}] {key} {op}: errors {row['errors']}, peak {mem['peak_full'] / 2**20:.0f} MiB")
        inp = make_inputs(shape) if passed else None
        timers = {}
        for key, op in passed:
            warm_up(METHODS[key], op, shape, inp)  # in this process too: compilation and autotuning stay untimed
            timers[(key, op)] = functools.partial(METHODS[key].run, inp, op)
        times = {k: [] for k in ["floor", *timers]}
        for rep in range(reps):
            floor = floor_all(shape)
            floor()  # first touch of the fresh buffers, untimed
            times["floor"].append(timed(floor, shape.device)[:2])
            del floor
            release()  # the floor's (rows, V) operands must not crowd the methods
            for k, fn in timers.items():
                times[k].append(timed(fn, shape.device)[:2])  # not the outputs: they would pile up
            log(
                f"[{shape.id}] rep {rep}: "
                + ", ".join(f"{k[0] if k != 'floor' else k} {v[-1][0]:.3f}s" for k, v in times.items())
            )
        fl = times.pop("floor")
        res["floor_s"] = statistics.median(t[0] for t in fl) if fl else None
        for row in res["rows"]:
            ts = times.get((row["method"], row["op"]))
            if ts:
                row["time_s"] = statistics.median(t[0] for t in ts)
                row["x_floor"] = [t[0] / f[0] for t, f in zip(ts, fl)]
                row["x_floor_cpu"] = [t[1] / f[1] for t, f in zip(ts, fl)]
        del inp, timers
        release()
        results.append(res)
    return {"device": device_name(shapes[0].device) if shapes else "", "torch": torch.__version__, "results": results}
