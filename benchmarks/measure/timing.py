"""``compare``: gate, memory and time against the floor of (method, op) cases, interleaved per repetition."""

from __future__ import annotations

import functools
import gc
import statistics
import time

import torch

from .device import device_name, timed
from .floor import floor_all, floor_gemms
from .gate import check
from .methods import METHODS, warm_up
from .shapes import make_inputs


def compare(shapes, cases, reps: int, deadline_s: float | None = None, log=print) -> dict:
    """Forward+backward of each (method key, op) at each shape against the floor: gate, memory, interleaved time.

    Per repetition the floor and every method that passed its gate run back to back; the ratio method / floor is
    taken per repetition and the median reported, for wall and for process CPU time.
    """
    t_start, results = time.time(), []
    for shape in shapes:
        res = {"shape": shape.__dict__, "grad_bytes": None, "rows": []}
        timers, inp = {"floor": floor_all(shape)}, None
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
            inp = inp or make_inputs(shape)
            warm_up(m, op, shape)  # in this process too: lazy imports and compilation stay out of the timing
            timers[(key, op)] = functools.partial(m.run, inp, op)
            log(f"[{shape.id}] {key} {op}: errors {row['errors']}, peak {mem['peak_full'] / 2**20:.0f} MiB")
        times = {k: [] for k in timers}
        for rep in range(reps):
            for k, fn in timers.items():
                times[k].append(timed(fn, shape.device)[:2])  # not the outputs: they would pile up
            log(
                f"[{shape.id}] rep {rep}: "
                + ", ".join(f"{k[0] if k != 'floor' else k} {v[-1][0]:.3f}s" for k, v in times.items())
            )
        fl = times.pop("floor")
        res["floor_s"] = statistics.median(t[0] for t in fl)
        for row in res["rows"]:
            ts = times.get((row["method"], row["op"]))
            if ts:
                row["time_s"] = statistics.median(t[0] for t in ts)
                row["x_floor"] = [t[0] / f[0] for t, f in zip(ts, fl)]
                row["x_floor_cpu"] = [t[1] / f[1] for t, f in zip(ts, fl)]
        floor_gemms.cache_clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results.append(res)
    return {"device": device_name(shapes[0].device) if shapes else "", "torch": torch.__version__, "results": results}
