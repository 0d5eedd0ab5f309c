"""One whole RL step (sample, sync the engine, train) of `grao train` and TRL, sampling with transformers'
``generate`` or with an in-process vLLM engine, at a large vocabulary.

usage: python benchmarks/rollout_step.py [--prompts 4] [--group 8] [--completion 32] [--steps 3] [--no-write]

A front end of the harness: every variant runs as its own program (``harness.command_peak_rss``: a fresh process,
its peak RSS measured from outside) on the same saved model, a tiny Qwen3-MoE (H = 64, head_dim 64, random
weights, V = 151,936, float32), P prompts of the demo task x G completions of up to ``--completion`` new tokens
at temperature 1, 2 threads:

* ``grao-train-hf`` / ``grao-train-vllm``: the CLI, ``grao train --rollout-engine hf|vllm`` (GRAO); its times are
  the ``time/generate`` (sample and score), ``time/sync`` and ``time/train`` of metrics.jsonl;
* ``trl-grpo-hf``: TRL's stock ``GRPOTrainer`` (its default DAPO loss) sampling with ``generate``;
* ``trl-grpo-vllm``: the same with ``use_vllm=True, vllm_mode="colocate"``. TRL's own colocate mode cannot run
  on vLLM's CPU build (its weight sync fails), so this row is ``GRPOTrainer`` with
  ``grao_kernels.integrations.trl.ColocatedVLLM`` (the engine in float32, synced by
  ``grao_kernels.integrations.vllm``); sampling, TRL's importance-sampling forward and the loss are TRL's;
* ``trl-grao-vllm``: ``GRAOTrainer`` (GRAO, reference answers appended) with vLLM colocate.

TRL's times: the optimizer step from ``on_step_begin`` to ``on_step_end``; generation is its
``_generate_single_turn`` (sampling only; rewards are scored in training), the sync is the engine's
``sync_weights`` before it. Training = step - generation - sync. Each variant runs ``--warmup`` + ``--steps``
optimizer steps; the table gives the median of the last ``--steps``. It prints the table and writes it into the
``rollouts`` region of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

VARIANTS = ("grao-train-hf", "grao-train-vllm", "trl-grpo-hf", "trl-grpo-vllm", "trl-grao-vllm")
MODEL = {
    "head_dim": 64,
    "max_position_embeddings": 128,
}  # tiny-moe's other fields; vLLM's CPU attention: head_dim >= 32


def save_model(path: str, vocab: int) -> None:
    """The benchmark's policy: tiny-moe with head_dim 64 and ``vocab`` output rows (the demo tokenizer names only the
    first few; the others decode to nothing), saved in float32 with the demo tokenizer."""
    from grao.models import build_demo_tokenizer, tiny_moe

    tok = build_demo_tokenizer()
    model = tiny_moe(tok, overrides=MODEL)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def grao_train_argv(args, model_dir: str, run_dir: str, engine: str) -> list[str]:
    return [
        sys.executable, "-m", "grao", "train",
        "--model", model_dir, "--output-dir", run_dir, "--rollout-engine", engine,
        "--prompts-per-step", str(args.prompts), "--group-size", str(args.group),
        "--max-new-tokens", str(args.completion), "--temperature", "1.0",
        "--steps", str(args.warmup + args.steps), "--save-every", str(args.warmup + args.steps + 1),
        "--threads", str(args.threads), "--plot", "false", "--progress", "false",
        "--evaluation.size", "1", "--evaluation.every", str(args.warmup + args.steps),
    ]  # fmt: skip


def grao_train_times(run_dir: str) -> list[dict]:
    """Per step of a ``grao train`` run: generation, sync, training and their sum, from its metrics.jsonl."""
    steps = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "time/train" in m:
                t = {"generate": m["time/generate"], "sync": m.get("time/sync", 0.0), "train": m["time/train"]}
                steps.append(dict(t, step=sum(t.values())))
    return steps


def trl_child(args) -> None:
    """One TRL variant (``args.child``) in this process: train, write each optimizer step's times to ``args.out``."""
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grao.data import demo_task
    from grao_kernels.integrations.trl import ColocatedVLLM, GRAOConfig, GRAOTrainer

    def timed(cls):
        class Timed(cls):
            """Times the engine sync and the sampling of each generation (TRL's own sync condition, done first)."""

            bench = {"generate": 0.0, "sync": 0.0}

            def _generate_single_turn(self, *a, **kw):
                if self.use_vllm and self.state.global_step != self._last_loaded_step:
                    t = time.perf_counter()
                    self.vllm_generation.sync_weights()
                    self._last_loaded_step = self.state.global_step
                    self.bench["sync"] += time.perf_counter() - t
                t = time.perf_counter()
                out = super()._generate_single_turn(*a, **kw)
                self.bench["generate"] += time.perf_counter() - t
                return out

        return Timed

    class GRPOWithEngine(ColocatedVLLM, GRPOTrainer):
        pass

    steps = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            trainer.bench = {"generate": 0.0, "sync": 0.0}
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step = time.perf_counter() - self.t0
            b = trainer.bench
            steps.append({**b, "train": step - b["generate"] - b["sync"], "step": step})

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    train, _ = demo_task.make_splits(64, 4, seed=0)
    data = Dataset.from_list([{"prompt": ex.prompt, "reference": ex.reference} for ex in train])

    def reward(prompts, completions, reference, **kw):
        return [demo_task.score(ref, c) for c, ref in zip(completions, reference)]

    common = dict(
        output_dir=args.out + ".run",
        per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group,
        steps_per_generation=1,
        max_completion_length=args.completion,
        temperature=1.0,
        max_steps=args.warmup + args.steps,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_vllm=args.child.endswith("-vllm"),
        vllm_mode="colocate",
    )
    if args.child == "trl-grao-vllm":
        cls, cfg = GRAOTrainer, GRAOConfig(**common)
    else:
        cls, cfg = (GRPOWithEngine if common["use_vllm"] else GRPOTrainer), GRPOConfig(**common)
    trainer = timed(cls)(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok)
    trainer.add_callback(StepTimes())
    trainer.train()
    with open(args.out, "w") as f:
        json.dump(steps, f)


def run_variant(name: str, args, tmp: str, model_dir: str) -> dict:
    """One variant as its own program: per-step times (median of the last ``args.steps``) and peak RSS."""
    import harness

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    if name.startswith("grao-train-"):
        run_dir = os.path.join(tmp, name)
        res = harness.command_peak_rss(name, grao_train_argv(args, model_dir, run_dir, name.rsplit("-", 1)[1]), env)
        steps = grao_train_times(run_dir)
    else:
        out = os.path.join(tmp, name + ".json")
        argv = [sys.executable, os.path.abspath(__file__), "--child", name, "--model", model_dir, "--out", out]
        argv += [f"--{k}={getattr(args, k)}" for k in ("prompts", "group", "completion", "steps", "warmup", "threads")]
        res = harness.command_peak_rss(name, argv, env)
        with open(out) as f:
            steps = json.load(f)
    if len(steps) != args.warmup + args.steps:
        raise RuntimeError(f"{name}: {len(steps)} steps timed, expected {args.warmup + args.steps}")
    measured = steps[args.warmup :]
    row = {k: statistics.median(s[k] for s in measured) for k in ("step", "generate", "sync", "train")}
    print(f"{name}: " + ", ".join(f"{k} {v:.2f}s" for k, v in row.items()), flush=True)
    return {"variant": name, **row, "steps": steps, "peak_rss_bytes": res["peak_rss_bytes"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--completion", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="measured steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        trl_child(args)
        return 0
    import harness  # not in the variants' own processes: their peak RSS is theirs
    import render

    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    load_start, t0 = os.getloadavg()[0], time.time()
    with tempfile.TemporaryDirectory(prefix="grao-rollout-bench-") as tmp:
        model_dir = os.path.join(tmp, "model")
        save_model(model_dir, args.vocab)
        rows = [run_variant(name, args, tmp, model_dir) for name in names]
    data = {k: v for k, v in vars(args).items() if k not in ("child", "model", "out", "no_write")}
    data.update(rows=rows, wall_s=time.time() - t0, **harness.run_record("rollout_step.py", argv, load_start))
    render.publish("rollouts", render.rollouts_markdown(data), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
