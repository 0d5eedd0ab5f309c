"""One training step's loss (forward + backward) through TRL and `grao train`, at a large vocabulary, CPU.

usage: python benchmarks/integrations_step.py [--vocab 151936] [--prompts 2] [--group 4] [--completion 64]

Each variant runs in a fresh process on the same tiny Qwen3-MoE (H = 64, random weights, vocabulary V) and the
same batch of P prompts x G completions (GRAO variants add each prompt's reference answer as one more row):

* ``trl-stock``: TRL's GRPOTrainer.compute_loss (DAPO loss, TRL's own chunked fused head) + backward;
* ``trl-patched``: the same trainer after ``grao_kernels.integrations.trl.patch_trl``;
* ``trl-grao``: ``GRAOTrainer.compute_loss`` + backward;
* ``grao-train``: ``grao.Trainer.accumulate_gradients`` (the CLI's step without sampling).

It prints the median time of 3 steps after one warm-up, and the peak resident memory of one step above the
resident set before it (minus nothing: the gradients of the whole model are part of a step), in a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = ("trl-stock", "trl-patched", "trl-grao", "grao-train")


def batch(args, tok):
    """Prompt and completion ids: P prompts (left-padded to 16), G completions each, lengths varying."""
    g = torch.Generator().manual_seed(0)
    rows = args.prompts * args.group
    prompt = torch.randint(3, args.vocab, (args.prompts, 16), generator=g)
    completion = torch.randint(3, args.vocab, (args.prompts, args.group + 1, args.completion), generator=g)
    lengths = torch.randint(args.completion // 2, args.completion + 1, (args.prompts, args.group + 1), generator=g)
    rewards = torch.rand(args.prompts, args.group + 1, generator=g)
    return prompt, completion, lengths, rewards, rows


def trl_inputs(args, tok, with_reference):
    prompt, completion, lengths, rewards, _ = batch(args, tok)
    K = args.group + (1 if with_reference else 0)
    prompt_ids = prompt.repeat_interleave(K, 0)
    comp = completion[:, :K].reshape(-1, args.completion)
    mask = (torch.arange(args.completion)[None] < lengths[:, :K].reshape(-1, 1)).long()
    comp = torch.where(mask.bool(), comp, tok.pad_token_id)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": comp,
        "completion_mask": mask,
        "num_items_in_batch": mask.sum(),
    }
    r = rewards[:, :K].reshape(-1)
    if with_reference:
        from grao_kernels import grao_coefficients

        pos = torch.arange(len(r))
        coefs = grao_coefficients(r, group_ids=pos // K, is_reference=pos % K == K - 1)
        inputs["grao_token_coef"] = coefs.token_coef(torch.where(mask.bool(), comp, -100))
        inputs["advantages"] = coefs.advantages
    else:
        grouped = r.view(-1, K)
        inputs["advantages"] = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(
            -1
        )
    return inputs


def run_variant(name, args):
    from grao_kernels.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

    torch.set_num_threads(args.threads)
    from grao.models import build_demo_tokenizer, tiny_moe

    tok = build_demo_tokenizer()
    tmp = tempfile.mkdtemp()
    if name == "grao-train":
        from grao.config import TrainConfig
        from grao.trainer import Rollout, Trainer

        cfg = TrainConfig(
            output_dir=tmp,
            prompts_per_step=args.prompts,
            group_size=args.group,
            loss_backend=args.backend,
            threads=args.threads,  # the CLI's default for the tiny model is 1 thread; compare at the same count
        )
        trainer = Trainer(cfg)
        trainer.model.resize_token_embeddings(args.vocab, mean_resizing=False)
        prompt, completion, lengths, rewards, _ = batch(args, tok)
        rollout = Rollout(
            prompt_ids=prompt.tolist(),
            completion_ids=[
                [completion[p, k, : lengths[p, k]].tolist() for k in range(args.group + 1)] for p in range(args.prompts)
            ],
            rewards=rewards,
            completions=[[""] * args.group for _ in range(args.prompts)],
        )
        params = [p for p in trainer.model.parameters()]

        def step():
            for p in params:
                p.grad = None
            trainer.accumulate_gradients(rollout)
    else:
        from trl import GRPOConfig, GRPOTrainer

        from grao_kernels.integrations.trl import GRAOConfig, GRAOTrainer, patch_trl

        model = tiny_moe(tok)
        model.resize_token_embeddings(args.vocab, mean_resizing=False)
        common = dict(
            output_dir=tmp,
            per_device_train_batch_size=args.prompts * args.group,
            num_generations=args.group,
            steps_per_generation=1,
            max_completion_length=args.completion,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
        )
        from datasets import Dataset

        data = Dataset.from_list([{"prompt": "ab=", "reference": "ba"}] * 4)
        reward = lambda completions, **kw: [0.0] * len(completions)  # noqa: E731
        if name == "trl-grao":
            cfg = GRAOConfig(**common, grao_backend=args.backend)
            trainer = GRAOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok)
        else:
            cfg = GRPOConfig(**common, loss_type="dapo")
            trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok)
            if name == "trl-patched":
                patch_trl(trainer, backend=args.backend)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inputs = trl_inputs(args, tok, with_reference=name == "trl-grao")

        def step():
            trainer.model.zero_grad(set_to_none=True)
            trainer.compute_loss(trainer.model, dict(inputs)).backward()

    step()  # warm-up: allocator, thread pools, gradient buffers
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    base = rss_bytes()
    if not reset_peak_rss():
        raise SystemExit("cannot reset the RSS high-water mark: no reliable memory measurement")
    step()
    peak = peak_rss_bytes() - base
    return {"variant": name, "time_s": statistics.median(times), "peak_extra_bytes": peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--variant", choices=VARIANTS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "variant"
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    tokens = args.prompts * args.group * args.completion
    logits_mib = tokens * args.vocab * 4 / 2**20
    print(
        f"V = {args.vocab}, H = 64 (tiny Qwen3-MoE), P = {args.prompts}, G = {args.group}, completions <= "
        f"{args.completion} tokens ({tokens} completion positions; their float32 logits: {logits_mib:.0f} MiB), "
        f"{args.threads} threads, backend {args.backend}"
    )
    print()
    print("| variant | step time (s) | x trl-stock | peak memory above the step's start (MiB) |")
    print("|---|---|---|---|")
    ref = rows[0]["time_s"]
    for r in rows:
        print(f"| {r['variant']} | {r['time_s']:.3f} | {r['time_s'] / ref:.2f} | {r['peak_extra_bytes'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
