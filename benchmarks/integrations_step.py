"""One training step's loss (forward + backward) through TRL, verl's actor and `grao train`, at a large vocabulary.

usage: python benchmarks/integrations_step.py [--vocab 151936] [--prompts 2] [--group 4] [--completion 64] [--no-write]

A front end of the harness: each variant runs in a fresh process (``harness.fresh``) on the same tiny Qwen3-MoE
(H = 64, random weights, vocabulary V) and the same batch of P prompts x G completions (GRAO variants add each
prompt's reference answer as one more row):

* ``trl-stock``: TRL's GRPOTrainer.compute_loss (DAPO loss, TRL's own chunked fused head) + backward;
* ``trl-patched``: the same trainer after ``grao_kernels.integrations.trl.patch_trl``;
* ``trl-grao``: ``GRAOTrainer.compute_loss`` + backward;
* ``grao-train``: ``grao.Trainer.accumulate_gradients`` (the CLI's step without sampling);
* ``verl-logits``: verl's actor without fused kernels: the model's full logits, ``logprobs_from_logits`` and
  ``entropy_from_logits`` (verl's functions), then a policy-gradient loss on the log-probs minus 0.01 x the masked
  entropy, + backward (the G completions per prompt, no reference rows);
* ``verl-fused``: the same loss with verl's own ``use_fused_kernels`` forward (``forward_with_torch_backend``,
  its chunked linear-log-prob function);
* ``verl-patched``: the same loss with our forward (``grao_kernels.integrations.verl.patch_verl_model``).

It reports the median time of 3 steps after one warm-up, and the peak memory of one more step above the state
before it, the previous gradients freed (``harness.peak_meter``; the gradients of the whole model are part of a
step), prints the table and writes it into the ``integrations`` region of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import types

import harness
import render
import torch

VARIANTS = ("trl-stock", "trl-patched", "trl-grao", "grao-train", "verl-logits", "verl-fused", "verl-patched")


def batch(args):
    """P prompts of 16 ids, G + 1 completions each (the last: the reference answer), lengths varying; rewards."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, args.vocab, (args.prompts, 16), generator=g)
    completion = torch.randint(3, args.vocab, (args.prompts, args.group + 1, args.completion), generator=g)
    lengths = torch.randint(args.completion // 2, args.completion + 1, (args.prompts, args.group + 1), generator=g)
    rewards = torch.rand(args.prompts, args.group + 1, generator=g)
    return prompt, completion, lengths, rewards


def trl_inputs(args, pad_id, with_reference):
    """The batch as TRL's compute_loss takes it, with GRAO's coefficients or GRPO's group-normalised advantages."""
    prompt, completion, lengths, rewards = batch(args)
    K = args.group + (1 if with_reference else 0)
    prompt_ids = prompt.repeat_interleave(K, 0)
    comp = completion[:, :K].reshape(-1, args.completion)
    mask = (torch.arange(args.completion)[None] < lengths[:, :K].reshape(-1, 1)).long()
    comp = torch.where(mask.bool(), comp, pad_id)
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
        adv = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
        inputs["advantages"] = adv.view(-1)
    return inputs


def verl_step(name, args, model, pad_id):
    """The loss step of one ``verl-*`` variant: log-probs and entropies of the completions as verl's actor gets
    them, a policy-gradient loss minus 0.01 x the entropy (verl's ``entropy_coeff`` term), backward."""
    from verl.models.transformers.dense_common import forward_with_torch_backend
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    inputs = trl_inputs(args, pad_id, with_reference=False)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    C = inputs["completion_ids"].shape[1]
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    if name == "verl-patched":
        from grao_kernels.integrations.verl import patch_verl_model

        patch_verl_model(model, backend=args.backend)

    def step():
        if name == "verl-logits":
            logits = model(**kwargs).logits
            logp = logprobs_from_logits(logits[:, -C - 1 : -1], ids[:, -C:])
            entropy = entropy_from_logits(logits[:, -C - 1 : -1])
        else:
            forward = model if name == "verl-patched" else functools.partial(forward_with_torch_backend, model)
            out = forward(**kwargs, temperature=1.0, return_dict=True)
            logp, entropy = out.log_probs[:, -C - 1 : -1], out.entropy[:, -C - 1 : -1]
        completion = inputs["completion_mask"]
        loss = -(logp * inputs["advantages"][:, None] * completion).sum() - 0.01 * (entropy * completion).sum()
        loss.backward()

    return step


def run_variant(name, args, tmp):
    """One variant's median step time and the peak memory of one more step; in a fresh process, output in ``tmp``."""
    torch.set_num_threads(args.threads)
    # Started here for its fixed mmap threshold: large blocks allocated from now on (the gradients of the steps
    # before the measured one) go back to the system when freed, so the measured step cannot reuse them unseen.
    harness.peak_meter("cpu")
    from grao.models import build_demo_tokenizer, tiny_moe

    tok = build_demo_tokenizer()
    if name == "grao-train":
        from grao.config import TrainConfig
        from grao.train.trainer import Rollout, Trainer

        cfg = TrainConfig(
            output_dir=tmp,
            prompts_per_step=args.prompts,
            group_size=args.group,
            loss_backend=args.backend,
            threads=args.threads,  # the CLI's default for the tiny model is 1 thread; compare at the same count
        )
        trainer = Trainer(cfg)
        trainer.model.resize_token_embeddings(args.vocab, mean_resizing=False)
        prompt, completion, lengths, rewards = batch(args)
        rollout = Rollout(
            prompt_ids=prompt.tolist(),
            completion_ids=[
                [completion[p, k, : lengths[p, k]].tolist() for k in range(args.group + 1)] for p in range(args.prompts)
            ],
            rewards=rewards,
            completions=[[""] * args.group for _ in range(args.prompts)],
        )
        loss_step = functools.partial(trainer.accumulate_gradients, rollout)
    elif name.startswith("verl-"):
        model = tiny_moe(tok)
        model.resize_token_embeddings(args.vocab, mean_resizing=False)
        model.train()
        trainer = types.SimpleNamespace(model=model)
        loss_step = verl_step(name, args, model, tok.pad_token_id)
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
            trainer_cls, cfg = GRAOTrainer, GRAOConfig(**common, grao_backend=args.backend)
        else:
            trainer_cls, cfg = GRPOTrainer, GRPOConfig(**common, loss_type="dapo")
        trainer = trainer_cls(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok)
        if name == "trl-patched":
            patch_trl(trainer, backend=args.backend)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inputs = trl_inputs(args, tok.pad_token_id, with_reference=name == "trl-grao")
        loss_step = lambda: trainer.compute_loss(trainer.model, dict(inputs)).backward()  # noqa: E731

    def step():
        trainer.model.zero_grad(set_to_none=True)
        loss_step()

    step()  # warm-up: allocator, thread pools, gradient buffers
    times = [harness.timed(step, "cpu")[0] for _ in range(3)]
    trainer.model.zero_grad(set_to_none=True)  # measured from a state without gradients: they count in the step
    peak = harness.peak_meter("cpu")
    loss_step()
    return {"variant": name, "time_s": statistics.median(times), "peak_mem_bytes": peak()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)  # the machine line's thread count; each variant sets its own
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="grao-bench-") as tmp:  # the trainers' output_dir; they save nothing
        rows = [harness.fresh(f"integrations step {name}", run_variant, name, args, tmp) for name in VARIANTS]
    data = dict(vars(args), rows=rows, **harness.run_record("integrations_step.py", argv, load_start))
    render.publish("integrations", render.integrations_markdown(data), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
