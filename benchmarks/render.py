"""The one renderer: harness results into Markdown tables, PNG plots and BENCHMARKS.md regions.

usage: python benchmarks/render.py [RESULTS.json ...] [--md BENCHMARKS.md] [--plots benchmarks/plots]

renders the pytest-benchmark JSON of the suite into the ``generated`` region of BENCHMARKS.md (default: every
``benchmarks/results/*.json``; each may have the ``<name>.session.json`` sidecar that benchmarks/conftest.py
writes: command, wall time, skipped cases). ``compare_markdown`` renders ``harness.compare`` results (the GPU
check, the native floor), ``integrations_markdown`` those of benchmarks/integrations_step.py, ``rollouts_markdown``
those of benchmarks/rollout_step.py. ``splice`` rewrites
one ``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->`` region of a Markdown file and keeps everything else byte
for byte.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODE_LABEL = {"forward": "forward", "backward": "backward", "full": "forward+backward"}
OP_TITLE = {
    "logprobs": "`fused_linear_logprobs` (token log-probs of a linear head)",
    "grao": "`grao_loss` (the GRAO loss and its gradients)",
}
# Row order: ours first, then the peers, then the floor.
KIND_ORDER = {"floor": 0, "ours": 1, "peer": 2}


def load(paths: list[str]) -> tuple[list[dict], list[dict], list[dict]]:
    rows, skips, runs = [], [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        ci, mi = data.get("commit_info") or {}, data.get("machine_info") or {}
        run = {"path": os.path.relpath(path, ROOT), "datetime": data.get("datetime", "?"), "commit": ci.get("id", "?")}
        run.update(dirty=ci.get("dirty"), cpu=mi.get("cpu", {}).get("brand_raw", "?"), python=mi.get("python_version"))
        runs.append(run)
        for b in data["benchmarks"]:
            if "op" in (b.get("extra_info") or {}):
                rows.append({"time_s": b["stats"]["min"], **b["extra_info"], "rounds": b["stats"]["rounds"]})
        side = os.path.splitext(path)[0] + ".session.json"
        if os.path.exists(side):
            with open(side) as f:
                info = json.load(f)
            skips.extend(info.get("skips", []))
            run.update({k: info.get(k) for k in ("command", "wall_s", "loadavg_start", "loadavg_end", "cpu_count")})
    return rows, skips, runs


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_mib(b) -> str:
    return "–" if b is None else f"{b / 2**20:,.0f} MiB"


def fmt_rate(r: float) -> str:
    if r >= 1e6:
        return f"{r / 1e6:,.2f} M"
    return f"{r / 1e3:,.1f} k" if r >= 1e4 else f"{r:,.0f}"


def table(head: str, rows) -> list[str]:
    """The lines of one Markdown table: ``head`` its column names joined by " | " (a name ending in ":" is a
    right-aligned column), ``rows`` lists of cells."""
    cols = head.split(" | ")
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"  # noqa: E731
    return [
        line(c.removesuffix(":") for c in cols),
        "|" + "".join("---:|" if c[-1] == ":" else "---|" for c in cols),
    ] + [line(r) for r in rows]


def shape_key(e: dict) -> tuple:
    return (e["device"], e["H"], e["V"], e["N"], e["dtype"])


def method_order(e: dict) -> tuple:
    return (KIND_ORDER.get(e["kind"], 3), e["label"])


def summary_tables(rows: list[dict]) -> list[str]:
    """Forward+backward at a glance: x floor and working memory, method x shape."""
    out = []
    for op in ("logprobs", "grao"):
        sel = [e for e in rows if e["op"] == op and e["mode"] == "full"]
        if not sel:
            continue
        shapes = sorted({shape_key(e) for e in sel})
        cell = {(shape_key(e), e["label"]): e for e in sel}
        head = " | ".join(["method", *(f"V={s[2] // 1000}k H={s[1]} N={s[3]}" for s in shapes)])
        body = [
            [label]
            + [
                f"{e['x_floor']:.2f}× / {fmt_mib(e.get('peak_working_bytes'))}" if e else "skipped"
                for e in (cell.get((s, label)) for s in shapes)
            ]
            for _, label in sorted({method_order(e) for e in sel})
        ]
        title = f"**{OP_TITLE[op]}**, forward+backward: time as a multiple of the GEMM floor / peak working memory\n"
        out += [title, *table(head, body), ""]
    return out


def detail_tables(rows: list[dict]) -> list[str]:
    out = []
    floors = {shape_key(e): e for e in rows if e["op"] == "floor"}
    head = "method | mode | time: | tokens/s: | × floor: | peak memory: | working memory: | device"
    for op in ("logprobs", "grao"):
        by_shape = defaultdict(list)
        for e in rows:
            if e["op"] == op:
                by_shape[shape_key(e)].append(e)
        if by_shape:
            out.append(f"### {OP_TITLE[op]}\n")
        for sk, es in sorted(by_shape.items()):
            es.sort(key=lambda e: (*method_order(e), list(MODE_LABEL).index(e["mode"])))
            body = []
            if sk in floors:
                fl = floors[sk]
                best = f"1.00 (best of: {fmt_time(fl['floor_s'])})"
                body.append([fl["label"], "3 GEMMs", fmt_time(fl["time_s"]), fmt_rate(fl["tokens_per_s"]), best])
                body[-1] += ["–", "–", fl["device_name"]]
            body += [
                [e["label"], MODE_LABEL[e["mode"]], fmt_time(e["time_s"]), fmt_rate(e["tokens_per_s"])]
                + [f"{e['x_floor']:.2f}", fmt_mib(e.get("peak_mem_bytes")), fmt_mib(e.get("peak_working_bytes"))]
                + [e["device_name"]]
                for e in es
            ]
            e0 = es[0]
            title = f"#### N={e0['N']:,} tokens, V={e0['V']:,}, H={e0['H']:,}, {e0['dtype']} on {e0['device']}\n"
            out += [title, *table(head, body), ""]
    return out


def trainer_table(rows: list[dict]) -> list[str]:
    sel = sorted((e for e in rows if e["op"] == "trainer_step"), key=lambda e: (e["device"], e["model"], e["method"]))
    if not sel:
        return []
    head = "model | loss | step: | tokens/s: | generation: | forward+backward: | optimizer: | peak memory: | device"
    body = [
        [e["model"], e["label"], fmt_time(e["time_s"]), fmt_rate(e["tokens_per_s"]), fmt_time(e["generation_s"])]
        + [fmt_time(e["fwd_bwd_s"]), fmt_time(e["optimizer_s"]), fmt_mib(e.get("peak_mem_bytes")), e["device_name"]]
        for e in sel
    ]
    return [
        "### GRAO trainer step\n",
        "One optimizer step of `grao.Trainer` (P=16 prompts, G=8): tokens/s of the training tokens over the whole "
        "step, its split, and the step's peak memory above the state after a first step.\n",
        *table(head, body),
        "",
    ]


def skip_section(skips: list[dict]) -> list[str]:
    """One line per (shape set, reason): how many cases, and which methods or tests."""
    if not skips:
        return []
    groups = defaultdict(list)
    for s in skips:
        name, _, inner = s["nodeid"].split("::")[-1].partition("[")
        parts = inner.rstrip("]").split("-")
        # test_logprobs[cpu-N128-V32000-H256-float32-cce-forward] -> "cce"; other tests by their name
        what = "-".join(parts[5:-1]) if name in ("test_logprobs", "test_grao") and len(parts) > 6 else name
        groups[(parts[0], s["reason"])].append(what)
    body = [[dev, len(w), ", ".join(sorted(set(w))), reason] for (dev, reason), w in sorted(groups.items())]
    return ["### Skipped cases\n", *table("shape set | cases: | methods / tests | reason", body), ""]


def plots(rows: list[dict], plot_dir: str) -> list[str]:
    """Time and peak working memory against V (forward+backward), one figure per (device, op, H)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    made = []
    groups = defaultdict(list)
    for e in rows:
        if e["mode"] == "full" and e["op"] in ("logprobs", "grao", "floor"):
            groups[(e["device"], e["H"], e["N"], e["dtype"])].append(e)
    for (device, H, N, dtype), es in sorted(groups.items()):
        for op in ("logprobs", "grao"):
            sel = [e for e in es if e["op"] in (op, "floor")]
            if not any(e["op"] == op for e in sel):
                continue
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
            series = defaultdict(list)
            for e in sel:
                series[method_order(e)].append(e)
            for (kind, label), pts in sorted(series.items()):
                pts.sort(key=lambda e: e["V"])
                vs = [e["V"] for e in pts]
                style = {"linestyle": "--", "marker": "x", "color": "black"} if kind == 0 else {"marker": "o"}
                ax_t.plot(vs, [e["time_s"] * 1e3 for e in pts], label=label, **style)
                if kind != 0:
                    ax_m.plot(vs, [e["peak_working_bytes"] / 2**20 for e in pts], label=label, **style)
            ax_t.set(xlabel="vocabulary size V", ylabel="forward+backward time (ms)", yscale="log")
            ax_m.set(xlabel="vocabulary size V", ylabel="peak working memory (MiB)", yscale="log")
            ticks = sorted({e["V"] for e in sel})
            for ax in (ax_t, ax_m):
                ax.set_xscale("log")
                ax.set_xticks(ticks, [f"{v / 1000:.0f}k" for v in ticks])
                ax.minorticks_off()
                ax.grid(True, which="both", alpha=0.3)
            ax_t.legend(fontsize=7)
            fig.suptitle(f"{op}: N={N} tokens, H={H}, {dtype} on {es[0]['device_name']}", fontsize=9)
            fig.tight_layout()
            name = f"{device}_{op}_H{H}.png"
            fig.savefig(os.path.join(plot_dir, name), dpi=110)
            plt.close(fig)
            made.append(name)
    return made


def generated_region(rows, skips, runs, plot_names, md_path, plot_dir) -> str:
    rel_plots = os.path.relpath(plot_dir, os.path.dirname(os.path.abspath(md_path)))
    lines = ["<!-- Written by benchmarks/render.py from the JSON below; edits inside this region are lost. -->", ""]
    lines += ["## Suite results\n", METHOD_NOTES]
    for r in runs:
        dirty = " (uncommitted changes)" if r["dirty"] else ""
        lines.append(
            f"Run `{r['path']}`: {r['datetime']}, commit `{str(r['commit'])[:10]}`{dirty}, {r['cpu']}, "
            f"Python {r['python']}."
        )
        if r.get("command"):
            load = f"; load average {r['loadavg_start']:.1f} at the start and {r['loadavg_end']:.1f} at the end"
            lines.append(f"Command: `{r['command']}` ({r['wall_s'] / 60:.1f} minutes{load} on {r['cpu_count']} cores).")
    devices = sorted({e["device_name"] for e in rows})
    lines.append(f"Device: {', '.join(devices)}.\n")
    if not any(e["device"] == "cuda" for e in rows):
        lines.append(
            "The GPU set (V ∈ {128256, 151936, 262144}, H = 4096, N ∈ {8192, 32768}, bf16, and the ~1B MoE step) "
            "has not been run here: `make bench` on a CUDA machine writes `benchmarks/results/cuda.json`, and "
            "`python benchmarks/render.py` then renders both.\n"
        )
    lines += summary_tables(rows)
    if plot_names:
        lines += ["### Plots (forward+backward)\n", *(f"![{n}]({rel_plots}/{n})" for n in plot_names), ""]
    lines.append("### Per shape\n")
    lines += detail_tables(rows)
    lines += trainer_table(rows)
    lines += skip_section(skips)
    return "\n".join(lines)


METHOD_NOTES = """\
How to read these numbers:

- **× floor** divides a method's time by the time of the matrix products no method can avoid, measured on the
  same device in the same session for each shape: the logits GEMM `h·Wᵀ` for the forward, `dZ·W` + `dZᵀ·h` for
  the backward, all three for forward+backward (2·N·V·H FLOPs each). A logits-free method recomputes the logits
  in its backward, so ~1.33× is its best forward+backward; `grao_loss` (and Liger's GRPO loss) do their whole
  gradient sweep in the forward, so their backward only hands over stored gradients.
- **peak memory** is the high-water mark above the inputs during one call, measured in a fresh process per case
  (CPU: RSS high-water mark; GPU: `torch.cuda.max_memory_allocated`); for the backward it is the peak of the whole
  forward+backward step. **working memory** leaves out the returned gradients (the same for every method): the
  larger of the forward's peak and the step's peak less the gradients (`grao_loss` and Liger's GRPO loss hold
  the finished gradients from their forward on, so their forward's peak is taken less the gradients too).
- Every method is first checked against the float64 oracle (`grao_kernels.testing`): the relative L2 error
  of its log-probs (or loss) and of dH and dW (estimated on a random projection) must be at most 2× that of
  eager PyTorch in the inputs' dtype (the same reference, row by row) + 1e-3, or the case fails unrecorded.
- Peers: Cut Cross-Entropy's `linear_cross_entropy(..., reduction="none")` (= −log-probs; on CPU only its
  `torch_compile` implementation runs, and it materialises the logits); TRL's `ChunkedLogProbFunction` with its
  trainer's vocabulary chunk (32768); Liger's `LigerFusedLinearGRPOLoss` (`loss_type="grpo"`, no KL, one chunk
  for the batch) with advantages chosen so that its gradient equals GRAO's, compared on gradients only; Liger's
  fused linear cross-entropy on GPU only.
- CPU timings are one round each on 2 shared cores, so expect noise of tens of percent between runs; ratios
  taken within one run are what to compare. Fresh memory is expensive to fault in on this machine, which
  penalises methods that allocate large buffers on every call.
"""


def machine_line(data: dict, after_load: str = "") -> str:
    """The machine sentence of a front end's table, from its :func:`harness.run_record` fields; ``after_load``
    goes right after the load averages."""
    return (
        f"Machine: {data['device']} of {data['cpu_count']} cores; torch {data['torch']}; load average "
        f"{data['loadavg'][0]:.1f} at the start and {data['loadavg'][1]:.1f} at the end{after_load}. "
        f"Command: `{data['command']}`."
    )


def publish(name: str, text: str, write: bool) -> None:
    """Print ``text`` and, with ``write``, make it BENCHMARKS.md's ``name`` region."""
    print(text)
    if write:
        splice(os.path.join(ROOT, "BENCHMARKS.md"), name, text)


def splice(md_path: str, name: str, text: str) -> None:
    """Replace the ``name`` region of ``md_path`` with ``text`` (appended when the file has none)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    body = open(md_path).read() if os.path.exists(md_path) else "# Benchmarks\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in body and end in body:
        head, rest = body.split(begin, 1)
        body = head + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    with open(md_path, "w") as f:
        f.write(body)


COMPARE_NOTES = (
    "Forward+backward. **× floor**: median over repetitions of method time / the three GEMMs over the computed "
    "(non-ignored) rows (logits `h·Wᵀ`, `dZ·W`, `dZᵀ·h`; 6·rows·V·H FLOPs) timed back to back in the same repetition "
    "of one process, their buffers freed before the methods run; the CPU-time "
    "column uses process CPU time, less sensitive to other load on shared cores. **peak extra**: peak memory above "
    "the inputs ({memory}), including the returned gradients; **workspace** = peak extra minus those gradients, "
    "also as a share of the fp32 logits. **err**: relative L2 error against the float64 oracle (dH, dW estimated on "
    "a random projection); **check**: within 2× eager PyTorch's own error in the inputs' dtype + 1e-3, tested before timing."
)


def compare_markdown(data: dict, title: str) -> str:
    """Markdown of ``harness.compare`` results: one table per shape."""
    rows = [r for res in data["results"] for r in res["rows"] if r.get("status") == "ok"]
    memory = rows[0]["memory_method"] if rows else "not measured"
    lines = [
        f"## {title}",
        "",
        COMPARE_NOTES.format(memory=memory),
        "",
        f"Device: {data['device']}; torch {data['torch']}.",
    ]
    if data.get("command"):
        lines.append(f"Command: `{data['command']}`.")
    lines.append("")
    head = "method | op | time: | × floor: | × floor, CPU time: | peak extra: | workspace: | % of fp32 logits: "
    head += "| err value: | err dH: | err dW: | check"
    for res in data["results"]:
        sh = res["shape"]
        N, V, H = sh["N"], sh["V"], sh["H"]
        logits, grads = N * V * 4, res.get("grad_bytes") or 0
        rows = res.get("floor_rows", N)  # results written before the floor counted only the computed rows: all N
        naive = "; ".join(
            f"{op}: " + ", ".join(f"{k} {v:.2e}" for k, v in e.items()) for op, e in res.get("eager_errors", {}).items()
        )
        body = []
        for r in res["rows"]:
            err, ok = r.get("errors") or {}, r.get("status") == "ok" and "time_s" in r
            errs = [f"{err[k]:.1e}" if k in err else "nan" * ok for k in ("value", "dh", "dw")]
            if not ok:
                body.append([r["label"], r["op"], *[""] * 6, *errs, r.get("status")])
                continue
            ws = r["peak_full"] - r["grad_bytes"]
            x_floor = [f"{statistics.median(r[k]):.2f}" for k in ("x_floor", "x_floor_cpu")]
            cells = [fmt_time(r["time_s"]), *x_floor, fmt_mib(r["peak_full"]), fmt_mib(ws), f"{100 * ws / logits:.1f}"]
            body.append([r["label"], r["op"], *cells, *errs, "ok"])
        per_rep = "; ".join(
            f"{r['label']} ({r['op']}): " + ", ".join(f"{x:.2f}" for x in r["x_floor"])
            for r in res["rows"]
            if r.get("x_floor")
        )
        lines += [
            f"### N={N:,}, H={H:,}, V={V:,}, {sh['dtype']}"
            + (f", {sh['ignored']:.0%} ignored targets" * bool(sh["ignored"])),
            "",
            f"Floor {fmt_time(res['floor_s'])} over the {rows:,} computed (non-ignored) rows "
            f"({6 * rows * V * H / res['floor_s'] / 1e12:.2f} TFLOP/s); fp32 logits "
            f"would be {fmt_mib(logits)}; gradients {fmt_mib(grads)}; eager PyTorch's own errors in this dtype: {naive or '–'}."
            + (f" Command: `{res['command']}`." if res.get("command") else ""),
            "",
            *table(head, body),
            "",
            f"Per-repetition × floor: {per_rep}.",
            "",
        ]
    return "\n".join(lines)


def integrations_markdown(data: dict) -> str:
    """Markdown of ``benchmarks/integrations_step.py``'s results: one loss step per TRL / ``grao train`` variant."""
    tokens = data["prompts"] * data["group"] * data["completion"]
    # verl's rows against verl's own path from the logits (its first row), the others against trl-stock.
    verl_stock = next((r for r in data["rows"] if r["variant"].startswith("verl-")), None)
    body = []
    for r in data["rows"]:
        ref = verl_stock if r["variant"].startswith("verl-") else data["rows"][0]
        ratio = f"{r['time_s'] / ref['time_s']:.2f}"
        mem = f"{r['peak_mem_bytes'] / ref['peak_mem_bytes']:.2f}"
        body.append([r["variant"], fmt_time(r["time_s"]), ratio, fmt_mib(r["peak_mem_bytes"]), mem])
    return "\n".join(
        [
            "<!-- Written by benchmarks/integrations_step.py; edits inside this region are lost. -->",
            "",
            "## One loss step through TRL, verl's actor and `grao train`",
            "",
            f"V = {data['vocab']:,}, H = 64 (tiny Qwen3-MoE, random weights), P = {data['prompts']} prompts × "
            f"G = {data['group']} completions of ≤ {data['completion']} tokens: {tokens} completion positions, whose "
            f"float32 logits (what the stock path would hold) are {fmt_mib(tokens * data['vocab'] * 4)}. Backend "
            f"`{data['backend']}`, {data['threads']} threads, each variant in a fresh process; median of 3 steps after "
            "a warm-up; peak memory (RSS high-water mark) of one more step above the state before it, which holds no "
            "gradients: the model's gradients count in the step. The `verl-*` rows are verl's actor loss on the "
            "completions' log-probs and entropies (no reference rows), compared with verl's own path from the full "
            "logits (`verl-logits`); the other rows with `trl-stock`.",
            "",
            machine_line(
                data, " (other processes on shared cores change the times between runs, by whole factors at high load)"
            ),
            "",
            *table("variant | step time: | × stock: | peak memory above the step's start: | × stock memory:", body),
        ]
    )


def rollouts_markdown(data: dict) -> str:
    """Markdown of ``benchmarks/rollout_step.py``'s results: one whole RL step per trainer and rollout engine, and
    the ratios of ``grao train`` on vLLM to TRL's stock trainer with each engine."""
    rows = {r["variant"]: r for r in data["rows"]}
    body = [
        [
            f"`{r['variant']}`",
            *(fmt_time(r[k]) for k in ("step", "generate", "sync", "train")),
            fmt_mib(r["peak_rss_bytes"]),
        ]
        for r in data["rows"]
    ]
    ours = rows.get("grao-train-vllm")
    ratios = []
    for peer, goal in (("trl-grpo-hf", 4.0), ("trl-grpo-vllm", 1.5)):
        if ours and peer in rows:
            x = rows[peer]["step"] / ours["step"]
            verdict = "met" if x >= goal else "not met"
            ratios.append(f"- `grao-train-vllm` whole step vs `{peer}`: **{x:.2f}×** (goal ≥ {goal:g}×: {verdict}).")
    return "\n".join(
        [
            "<!-- Written by benchmarks/rollout_step.py; edits inside this region are lost. -->",
            "",
            "## One whole RL step: `grao train` and TRL, sampling with `generate` or vLLM",
            "",
            f"Tiny Qwen3-MoE (H = 64, head_dim 64, 4 experts top-2, random weights, float32), V = {data['vocab']:,}; "
            f"P = {data['prompts']} prompts of the demo task × G = {data['group']} completions of up to "
            f"{data['completion']} new tokens at temperature 1; {data['threads']} threads. Each variant is its own "
            f"program, the same saved model; median of {data['steps']} optimizer steps after {data['warmup']} "
            "warm-up. `grao-train-*`: the CLI (`grao train --rollout-engine hf|vllm`, GRAO), times from its "
            "metrics.jsonl (`time/generate` includes scoring); `trl-grpo-*`: TRL's `GRPOTrainer` (defaults: DAPO "
            "loss, importance-sampling correction with vLLM); its vLLM row runs TRL's colocated generation through "
            "`ColocatedVLLM` (TRL's own weight sync fails on vLLM's CPU build); `trl-grao-vllm`: `GRAOTrainer` with "
            "vLLM colocate. TRL: step = `on_step_begin` to `on_step_end`, generation = sampling only, training = "
            "step − generation − sync. vLLM engines use the 1 GiB KV cache default of `grao train` and `GRAOConfig`, "
            "allocated in full. Peak memory: the variant's process RSS high-water mark (`getrusage`), model, "
            "engine and imports included.",
            "",
            machine_line(data, f"; {data['wall_s']:.0f} s for the whole run"),
            "",
            *table("variant | step: | generation: | sync: | training: | peak RSS:", body),
            "",
            *ratios,
        ]
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="*", help="pytest-benchmark JSON files (default: benchmarks/results/*.json)")
    ap.add_argument("--md", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--plots", default=os.path.join(HERE, "plots"))
    args = ap.parse_args(argv)
    paths = args.json or sorted(
        p for p in glob.glob(os.path.join(HERE, "results", "*.json")) if not p.endswith(".session.json")
    )
    if not paths:
        print("no benchmark JSON found; run `make bench` first", file=sys.stderr)
        return 1
    rows, skips, runs = load(paths)
    names = plots(rows, args.plots) if rows else []
    splice(args.md, "generated", "\n" + generated_region(rows, skips, runs, names, args.md, args.plots))
    print(f"wrote {args.md} ({len(rows)} results, {len(skips)} skipped) and {len(names)} plots in {args.plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
