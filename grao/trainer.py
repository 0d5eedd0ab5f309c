"""The GRAO training loop (arXiv 2508.07750) on Hugging Face causal LMs, without materialising the logits.

Each step, for P prompts (:meth:`Trainer.train_step`):
  1. rollout: sample G completions per prompt and score them, and the prompt's
     reference answer, with the reward;
  2. update: run the backbone over the P (G+1) sequences (group-major,
     reference last, targets = ignore_index at prompt and padding positions)
     and hand its final hidden states with the lm_head weight and the head's
     logit scale and soft cap (read from the model config) to the loss
     (the config's ``method``, :mod:`grao.methods`: by default
     :class:`grao.losses.GRAO`, i.e. ``grao_kernels.grao_loss``, unless the
     constructor gets another loss); the lm_head never runs, so the (tokens x
     vocabulary) logits never exist. MoE models add the router load-balancing
     loss. Then gradient clipping, AdamW and the learning-rate schedule;
     with ``num_iterations`` > 1, that many optimizer steps on the rollout,
     the loss seeing its snapshot of the sampling policy (``LossBatch.old``).

Everything else is a call into a module named for its job: ``runtime``
(device, autocast), ``distributed`` (FSDP2 under torchrun), ``models``,
``data``, ``rewards``, ``evaluate``, ``checkpoint`` and ``run_dir``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grao_kernels import fused_linear_logprobs

from . import (
    checkpoint,
    config,
    context_limits,
    data,
    distributed,
    evaluate,
    generation,
    losses,
    methods,
    models,
    output_errors,
    rewards,
    run_dir,
    runtime,
    safe_state,
    step_bounds,
    text_coverage,
)
from .config import ConfigError, TrainConfig
from .data import Example
from .generation import encode_prompt, encode_reference
from .log import say

IGNORE_INDEX = -100
TIME_KEYS = ("tokens_per_s", "time/generate", "time/train")


@dataclass
class Rollout:
    """P prompts with their G sampled completions and the rewards of completions and reference."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[list[int]]]  # [P][G+1] token ids, the reference last
    rewards: torch.Tensor  # (P, G+1) float32
    completions: list[list[str]]  # [P][G] decoded samples


def build_batch(rollout: Rollout, groups: range, pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, targets) for the sequences of ``groups``, right-padded.

    Position t of a sequence predicts token t + 1, so ``targets[s, t]`` is that
    token where it is a completion token and IGNORE_INDEX elsewhere.
    """
    seqs, starts = [], []
    for p in groups:
        for comp in rollout.completion_ids[p]:
            seqs.append(rollout.prompt_ids[p] + comp)
            starts.append(len(rollout.prompt_ids[p]))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        row = torch.tensor(s, dtype=torch.long)
        ids[i, : len(s)] = row
        mask[i, : len(s)] = 1
        targets[i, start - 1 : len(s) - 1] = row[start:]
    return ids.to(device), mask.to(device), targets.to(device)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine or linear decay to ``min_lr_ratio`` (or constant).

    Counted in optimizer steps, as TRL does: a training step takes
    ``num_iterations`` of them, so the warmup spans ``warmup_steps *
    num_iterations`` optimizer steps and the decay ends after ``steps *
    num_iterations``.
    """
    n = cfg.num_iterations
    warm, total, floor = cfg.warmup_steps * n, cfg.steps * n, cfg.min_lr_ratio

    def f(i: int) -> float:  # i = optimizer steps taken so far
        if i < warm:
            return (i + 1) / warm
        if cfg.lr_schedule == "constant" or total <= warm:
            return 1.0
        progress = min(1.0, (i - warm) / max(1, total - warm))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * decay

    return f


def _mean_over_iterations(lines: list[dict]) -> dict:
    """One metrics line for a step's optimizer steps: each number's mean (a list's, element-wise), tokens summed."""
    out = {}
    for key, first in lines[0].items():
        values = [ln[key] for ln in lines]
        if key == "train_tokens":
            out[key] = sum(values)
        elif isinstance(first, list):
            out[key] = [round(sum(v) / len(v), 4) for v in zip(*values)]
        else:
            out[key] = sum(values) / len(values)
    return out


class Trainer:
    """Owns the model, optimizer, data and run directory of one training run.

    ``loss`` replaces the GRAO objective with any :class:`grao.losses.Loss`;
    ``reward`` replaces the config's reward with any callable; ``callbacks`` are
    called as ``cb(trainer, step, metrics)`` after each training step.
    ``resume`` continues the run in ``cfg.output_dir`` from its newest intact
    checkpoint; ``overwrite`` starts over in a directory an earlier run used.
    Every setting is checked before anything is loaded or written.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        loss: losses.Loss | None = None,
        reward: rewards.Reward | None = None,
        callbacks=(),
        resume: bool = False,
        overwrite: bool = False,
    ):
        if resume and overwrite:
            raise ConfigError("--resume continues the run in output_dir and --overwrite starts it over: give one")
        self.cfg, self.run_dir, self.overwrite = cfg, Path(cfg.output_dir), overwrite
        self.runtime = runtime.choose(cfg.device, cfg.precision, cfg.attn_implementation)
        sharded = distributed.sharded(cfg)  # under torchrun or with an fsdp_* memory option: FSDP2
        self.world, self.runtime = distributed.init(self.runtime, sharded)
        runtime.check_loss_backend(cfg.loss_backend, self.runtime.device)
        if cfg.warmup_steps >= cfg.steps:
            say(
                f"warning: warmup_steps ({cfg.warmup_steps}) >= steps ({cfg.steps}): the learning rate is still "
                "warming up at the last step and never decays; lower warmup_steps for a run this short"
            )
        run_dir.check_writable(self.run_dir)
        if resume:
            run_dir.check_no_symlinks(self.run_dir)
            self._check_resumable()
        else:
            run_dir.check_fresh_start(self.run_dir, overwrite)
        models.check_source(cfg.model, cfg.tokenizer)
        self.train_examples, self.eval_examples = data.load_examples(cfg)
        # dpo's rejected answers: the data's own ("data": each group is rejected + reference, nothing is sampled)
        # or the lowest-scored of the G samples ("sampled")
        self.rejected_source = "sampled"
        if cfg.method == "dpo":
            self.rejected_source = data.rejected_source(cfg.dpo_rejected, self.train_examples)
            say(f"dpo: rejected answers from {'the data' if self.rejected_source == 'data' else 'the G samples'}")
        if reward is None:
            reward = rewards.resolve(cfg.reward, cfg.data, self.runtime.device, **rewards.judge_options(cfg))
        self.reward = reward
        self.logprob_temperature = cfg.temperature if cfg.logprob_temperature == "sampling" else 1.0
        self.callbacks = list(callbacks)
        runtime.set_threads(cfg.threads, cfg.model == models.TINY_MOE, self.runtime.device)

        state = None
        loading = time.perf_counter()
        say(f"loading model {cfg.model} ...")
        if resume:
            self.checkpoint, (self.model, self.tokenizer, state), skipped = checkpoint.load_latest(
                self.run_dir,
                self._load_checkpoint_model,
                lambda d: models.load_tokenizer(d, cfg.trust_remote_code),
            )
            for reason in skipped:
                say(f"warning: {reason}; falling back to an older checkpoint")
        else:
            self.checkpoint = None
            self.model, self.tokenizer = models.load(
                cfg.model, cfg.tokenizer, cfg.model_overrides, self.runtime, cfg.seed, cfg.trust_remote_code
            )
            self.initial_model = self.model  # what ``initial/`` holds for the demo
            if cfg.lora_rank:
                if cfg.model == models.TINY_MOE:  # tiny by construction: keep the full-weight base for initial/
                    self.initial_model = copy.deepcopy(self.model)
                self.model = models.add_lora(
                    self.model.to(models.lora_base_dtype(cfg.lora_base_dtype, self.runtime.device)),
                    cfg.lora_rank,
                    cfg.lora_alpha,
                    cfg.lora_dropout,
                    config.lora_targets(cfg),
                    cfg.seed,
                )
        say(f"loaded model {cfg.model} in {time.perf_counter() - loading:.1f}s")
        if cfg.chat_template and not getattr(self.tokenizer, "chat_template", None):
            say("warning: chat_template is on but the tokenizer has no chat template; prompts are used as written")
        inner = models.unwrap(self.model)  # the Hugging Face model, also under a LoRA wrapper
        # How the model's forward transforms its logits (Granite, Cohere, Falcon-H1, Gemma-2 ...), checked on the
        # model itself: the loss computes the log-probs of these logits, never those of a plain linear head.
        self.head = models.logit_head(inner, cfg.loss_backend)
        self.loss = (
            loss if loss is not None else methods.from_config(cfg, hidden_size=models.output_head(inner)[0].shape[1])
        )
        # A loss that is an nn.Module (PPO's value head) is trained, sharded and checkpointed with the model.
        module_loss = self.loss if isinstance(self.loss, torch.nn.Module) else None
        if module_loss is not None:
            module_loss.to(self.runtime.device)
            if state is not None:  # before sharding: the checkpoint holds its whole state, whoever saved it
                self._restore_loss(state)
        # the prompt tokens that fit the model's context next to max_new_tokens (max_prompt_tokens or fewer)
        self.max_prompt_tokens, note = context_limits.prompt_budget(
            inner.config, cfg.max_prompt_tokens, cfg.max_new_tokens
        )
        step_bounds.check(cfg, self.max_prompt_tokens, models.output_head(inner)[0].shape[1], self.runtime.device)
        prompts = [ex.prompt for ex in self.train_examples + self.eval_examples]
        self.prompts_cut = context_limits.count_longer(
            prompts, lambda p, n: encode_prompt(self.tokenizer, p, n, cfg.chat_template), self.max_prompt_tokens
        )
        if self.prompts_cut:  # max_prompt_tokens defaults to what the context leaves: quiet until a prompt is cut
            why = f" ({note})" if note else ""
            say(
                f"warning: {self.prompts_cut} of {len(prompts)} prompts are longer than {self.max_prompt_tokens} "
                f"tokens and are cut to their last {self.max_prompt_tokens}{why}; metric data/prompts_cut"
            )
        data.check_prompts(
            self.train_examples + self.eval_examples,
            lambda p: encode_prompt(self.tokenizer, p, self.max_prompt_tokens, cfg.chat_template),
        )
        unknown, first = text_coverage.unknown_examples(self.train_examples + self.eval_examples, self.tokenizer)
        if unknown:
            say(
                f"warning: {unknown} example(s) hold text the tokenizer does not know (it becomes "
                f"{self.tokenizer.unk_token}), first {first}; use a tokenizer that covers the data"
            )
        # The frozen starting policy, for losses that compare against it (DPO, GRPO's KL): loaded afresh from the
        # config, so a resumed run gets the same one.
        self.reference_model = self._frozen_start() if getattr(self.loss, "needs_reference_model", False) else None
        self.reference = None if self.reference_model is None else distributed.Policy(self.reference_model)
        if sharded and self.reference is not None:  # frozen: sharded like the policy, forward only
            distributed.shard(self.reference, self.runtime.device, cfg.fsdp_cpu_offload, cfg.fsdp_param_dtype)
        self.moe = models.moe_info(inner)
        self.aux_coef = models.aux_loss_coef(inner, cfg.router_aux_loss_coef)
        self.router_scoring = models.router_scoring(inner)
        self.router_biases = []  # updated after each step by auxiliary-loss-free balancing
        if cfg.router_bias_update_rate > 0:
            try:
                self.router_biases = models.correction_biases(inner)
            except models.ModelError as exc:
                raise ConfigError(f"'router_bias_update_rate' is {cfg.router_bias_update_rate}: {exc}") from None
        if cfg.gradient_checkpointing:
            models.enable_activation_checkpointing(inner)
        self.model.config.use_cache = True  # for generate; the training forward passes use_cache=False
        self.policy = distributed.Policy(self.model, module_loss)  # the loss, generate, evaluation run in its forward
        self.sharding = None
        if sharded:
            self.sharding = distributed.Sharding(
                self.policy, self.world, self.runtime.device, cfg.fsdp_cpu_offload, cfg.fsdp_param_dtype
            )

        # LoRA: the adapters only; the policy's parameter order (the model's, then the loss's) names the optimizer's.
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.trainable = trainable
        self.trainable_params, self.total_params = models.parameter_counts(self.policy)  # ppo: its value head too
        lora = f"; LoRA rank {cfg.lora_rank} on {cfg.lora_target_modules}, base frozen" if cfg.lora_rank else ""
        say(
            f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} "
            f"({100 * self.trainable_params / max(1, self.total_params):.2f}%){lora}"
        )
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        if self.sharding is not None:
            self.sharding.optimizer = self.optimizer
        self.step = 0
        self.saved_step: int | None = None
        self.baseline_eval: list[float] | None = None  # held-out rewards of the starting model, for eval/nag
        self.last_eval: float | None = None
        self.stopped_by: str | None = None  # the signal (or request_stop) that ends the run early
        if state is not None:
            self._restore(state)
        self.world.barrier()  # every rank has checked the run directory before rank 0 writes to it

    def _load_checkpoint_model(self, directory: Path):
        """A checkpoint's model: the whole model, or (LoRA) its adapter on the frozen base the run started from
        (``initial/`` for the demo, else ``cfg.model``)."""
        cfg, rt = self.cfg, self.runtime
        if not models.is_adapter(directory):
            return models.load_model(directory, rt.attn_implementation, cfg.trust_remote_code).to(rt.device)
        base_dir = self.run_dir / run_dir.INITIAL if cfg.model == models.TINY_MOE else cfg.model
        base = models.load_model(base_dir, rt.attn_implementation, cfg.trust_remote_code)
        base = base.to(rt.device, models.lora_base_dtype(cfg.lora_base_dtype, rt.device))
        return models.load_adapter(base, directory, trainable=True)

    def _check_resumable(self) -> None:
        if not checkpoint.step_dirs(self.run_dir):
            raise ConfigError(f"--resume: no checkpoint in {self.run_dir / checkpoint.CHECKPOINTS}")
        saved = self.run_dir / run_dir.CONFIG
        if not saved.is_file():
            raise ConfigError(
                f"--resume: {saved} is missing, and without the run's settings a resumed run would silently use "
                "others; restore the file (or start a new run with --overwrite)"
            )
        conflicts = config.resume_conflicts(config.load(saved), self.cfg)
        if conflicts:
            raise ConfigError(
                f"--resume would change what the run in {self.run_dir} computes ({'; '.join(conflicts)}); "
                "start a new run in another output_dir for that"
            )

    # ------------------------------------------------------------------ the loop

    def train(self) -> bool:
        """Train to ``cfg.steps``; True when done, False when stopped early by SIGINT/SIGTERM or :meth:`request_stop`
        (after saving a checkpoint of the steps done, if any)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (cfg.progress and self.world.main),
            desc="grao train",
            dynamic_ncols=True,
        )
        ema = None
        with self._stop_on_signals():
            try:
                self._start_run()
                if self.step == 0:  # the starting model: the baseline of eval/nag
                    started = time.perf_counter()
                    say(f"evaluating the starting model on {len(self.eval_examples)} prompts ...")
                    start_eval = self.evaluate()
                    say(
                        f"starting model: reward {start_eval['eval/reward']:.3f} ({time.perf_counter() - started:.1f}s)"
                    )
                    self.log(
                        {
                            **start_eval,
                            "params/trainable": self.trainable_params,
                            "params/total": self.total_params,
                            "data/prompts_cut": self.prompts_cut,
                        }
                    )
                while self.step < cfg.steps and not self._stop_agreed():
                    step = self.step + 1
                    metrics = self.train_step(step)
                    self.step = step
                    self.log(metrics)
                    if step % cfg.eval_every == 0 or step == cfg.steps:
                        self.log(self.evaluate())
                    for cb in self.callbacks:
                        cb(self, step, metrics)
                    if step % cfg.save_every == 0 or step == cfg.steps:
                        self.save_checkpoint()
                    ema = metrics["reward/samples"] if ema is None else 0.9 * ema + 0.1 * metrics["reward/samples"]
                    bar.set_postfix(
                        reward=f"{ema:.3f}", eval="-" if self.last_eval is None else f"{self.last_eval:.3f}"
                    )
                    bar.update(1)
            except rewards.RewardError:
                self._save_progress()  # keep the steps done; the error names the reward and its bad value
                raise
            except output_errors.OutputError as exc:  # metrics could not be written: keep the steps done first
                raise output_errors.OutputError(f"{exc}; {self._save_after_error()}") from exc.__cause__
            finally:
                bar.close()
                self._plot()
            self._save_progress()
        return self.step >= cfg.steps

    def train_step(self, step: int) -> dict:
        """Step ``step`` (1-based): rollout (sample, score), then update; returns its metrics line."""
        t0 = time.perf_counter()
        rollout = self.rollout(self.world.share(self.prompts_for_step(step)), step)  # this rank's prompt groups
        t1 = time.perf_counter()
        stats = self.update(rollout)
        t2 = time.perf_counter()
        r, n_tokens = self.world.gather_rows(rollout.rewards), stats.pop("train_tokens")  # the whole step's
        lengths = self.world.gather_rows(torch.tensor([[len(c) for c in g[:-1]] for g in rollout.completion_ids]))
        return {
            "step": step,
            "reward/samples": float(r[:, :-1].mean()),
            "reward/reference": float(r[:, -1].mean()),
            **rewards.statistics(r),
            **rewards.pop_metrics(self.reward),  # the rollout's (a judge's counts); evaluate() pops its own
            **stats,
            "completion_len": float(lengths.sum()) / r[:, :-1].numel(),
            "tokens_per_s": n_tokens / max(t2 - t1, 1e-9),
            "time/generate": t1 - t0,
            "time/train": t2 - t1,
        }

    # ------------------------------------------------------------------ rollout: sample and score

    def prompts_for_step(self, step: int) -> list[Example]:
        """The P examples of ``step`` (1-based): consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
        n, P = len(self.train_examples), self.cfg.prompts_per_step
        out = []
        for i in range((step - 1) * P, step * P):
            epoch, pos = divmod(i, n)
            out.append(self.train_examples[self._permutation(epoch)[pos]])
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train_examples))
            self._perm_cache = cache = (epoch, perm)
        return cache[1]

    def rollout(self, examples: list[Example], step: int) -> Rollout:
        """Sample G completions per prompt (seeded by step and rank, so a resumed run samples the same), then score
        them and each prompt's reference answer; rewards (P, G+1), the reference's last.

        dpo on the data's preference pairs (``rejected_source == "data"``) samples nothing: each group's one
        completion (G = 1) is the example's rejected answer, ended by eos like the reference.
        """
        cfg, tok, G = self.cfg, self.tokenizer, self.cfg.group_size
        prompt_ids = [encode_prompt(tok, ex.prompt, self.max_prompt_tokens, cfg.chat_template) for ex in examples]
        if self.rejected_source == "data":
            G, texts = 1, [ex.rejected for ex in examples]
            sampled = [encode_reference(tok, text) for text in texts]
        else:
            torch.manual_seed(cfg.seed * 1_000_003 + step + 1_000_000_007 * self.world.rank)
            sampled = self.policy(
                generation.generate,
                tok,
                prompt_ids,
                self.runtime,
                num_return=G,
                sample=True,
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
            )
            texts = generation.decode(tok, sampled)
        prompts, refs = [ex.prompt for ex in examples], [ex.reference for ex in examples]
        sample_rewards = rewards.score(
            self.reward, [p for p in prompts for _ in range(G)], texts, [r for r in refs for _ in range(G)]
        )
        ref_rewards = rewards.score(self.reward, prompts, refs, refs)
        r = torch.tensor(sample_rewards, dtype=torch.float32).view(len(examples), G)
        r = torch.cat([r, torch.tensor(ref_rewards, dtype=torch.float32)[:, None]], dim=1)
        completion_ids = [sampled[p * G : (p + 1) * G] + [encode_reference(tok, ref)] for p, ref in enumerate(refs)]
        completions = [texts[p * G : (p + 1) * G] for p in range(len(examples))]
        return Rollout(prompt_ids, completion_ids, r, completions)

    # ------------------------------------------------------------------ update: loss, backward, optimizer

    def update(self, rollout: Rollout) -> dict:
        """``num_iterations`` optimizer steps on the rollout, each :meth:`accumulate_gradients` then
        :meth:`optimizer_step`, the loss seeing its :meth:`snapshot` of the policy that sampled.

        Returns the metrics of the step: with one iteration its own, with more
        the mean over the iterations of each number (``lr`` too) and the sum of
        ``train_tokens``.
        """
        reference = self.reference_logps(rollout)  # fixed for the rollout: once, whatever num_iterations
        old = self.snapshot(rollout, reference)
        lines = []
        for _ in range(self.cfg.num_iterations):
            stats = self.accumulate_gradients(rollout, old, reference)
            stats.update(self.optimizer_step())
            counts = stats.pop("moe/layer_counts", None)
            if self.router_biases and counts is not None:
                models.update_router_bias(self.router_biases, counts, self.cfg.router_bias_update_rate)
            lines.append(stats)
        return lines[0] if len(lines) == 1 else _mean_over_iterations(lines)

    @torch.no_grad()
    def reference_logps(self, rollout: Rollout) -> list[torch.Tensor] | None:
        """The frozen reference model's (S, T) token log-probs of each micro-batch of the rollout
        (``LossBatch.reference_logp``), for a loss with ``needs_reference_model``; None for the others."""
        if self.reference_model is None:
            return None
        logps = [
            self.reference(self._reference_logp, ids, mask, targets)
            for _, ids, mask, targets in self._micro_batches(rollout)
        ]
        if self.sharding is not None:  # FSDP keeps a root's parameters gathered after its forward, for the backward
            self.reference.reshard()  # that a frozen model never runs
        return logps

    @torch.no_grad()
    def snapshot(self, rollout: Rollout, reference: list[torch.Tensor] | None = None) -> list[dict] | None:
        """The loss's ``snapshot`` of the current policy for each micro-batch of the rollout (``LossBatch.old`` of
        each of its optimizer steps), from a backbone forward under no_grad; None with ``num_iterations`` = 1 (the
        policy updated is the one that sampled) or a loss without ``snapshot``. ``reference``: the rollout's
        :meth:`reference_logps`, computed here when the loss needs them and none are given."""
        take = getattr(self.loss, "snapshot", None)
        if take is None or self.cfg.num_iterations == 1:
            return None
        if reference is None:
            reference = self.reference_logps(rollout)
        self.model.train()  # the mode of the updates, so dropout (if any) is that of their forwards
        token_counts = self._step_token_counts(rollout)
        return [
            self.policy(
                self._snapshot_micro_batch,
                take,
                rollout,
                groups,
                ids,
                mask,
                targets,
                token_counts,
                None if reference is None else reference[k],
            )
            for k, (groups, ids, mask, targets) in enumerate(self._micro_batches(rollout))
        ]

    def _snapshot_micro_batch(self, model, take, rollout, groups, ids, mask, targets, token_counts, ref) -> dict:
        """``take(batch)`` (the loss's snapshot) of one micro-batch, inside :class:`grao.distributed.Policy`'s
        forward like :meth:`_micro_batch_loss`."""
        with runtime.autocast(self.runtime):
            out = models.backbone(models.unwrap(model))(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = out.last_hidden_state
        return take(self._loss_batch(model, rollout, groups, hidden, ids, mask, targets, token_counts, None, ref))

    def accumulate_gradients(
        self, rollout: Rollout, old: list[dict] | None = None, reference: list[torch.Tensor] | None = None
    ) -> dict:
        """Gradients of the step's loss (into ``.grad``), over micro-batches of whole prompt groups; ``old``: the
        :meth:`snapshot` of each micro-batch, passed to the loss as ``LossBatch.old``; ``reference``: the rollout's
        :meth:`reference_logps` (computed here when the loss needs them and none are given).

        The loss returns each micro-batch's share of the step loss, so the
        accumulated gradient is the one-batch gradient. The MoE load-balancing
        loss is computed within each prompt group (its G+1 sequences) and
        averaged over the P groups, so it too is the same for any split; a
        batch-wide balance loss would not be, as its token shares are not a sum
        over micro-batches.
        """
        model, device = self.model, self.runtime.device
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        inner = models.unwrap(model)
        token_counts = self._step_token_counts(rollout)
        total, terms, aux_total, n_tokens = 0.0, {}, 0.0, 0
        layers = len(models.routers(inner)) if self.moe else 0
        counts = torch.zeros(layers, self.moe.num_experts if self.moe else 0, device=device)
        batches = list(self._micro_batches(rollout))
        if old is not None and len(old) != len(batches):
            raise ValueError(f"old holds {len(old)} snapshots for the rollout's {len(batches)} micro-batches")
        if reference is None:
            reference = self.reference_logps(rollout)
        if reference is not None and len(reference) != len(batches):
            raise ValueError(
                f"reference holds {len(reference)} log-probs for the rollout's {len(batches)} micro-batches"
            )
        for k, (groups, ids, mask, targets) in enumerate(batches):
            n_tokens += int(mask.sum())
            loss, res, aux, batch_counts = self.policy(
                self._micro_batch_loss,
                rollout,
                groups,
                ids,
                mask,
                targets,
                token_counts,
                None if old is None else old[k],
                None if reference is None else reference[k],
            )
            loss.backward()
            total += float(loss.detach())
            for key, value in res.metrics.items():
                terms[key] = terms.get(key, 0.0) + float(value)
            aux_total += aux
            counts += batch_counts
        stats = {"loss": total, **terms, "moe/aux_loss": aux_total, "train_tokens": n_tokens}
        stats, counts = self.world.sum(stats), self.world.sum_tensor(counts)  # the whole step's, over the ranks
        if counts.sum() > 0:
            load = counts.sum(0) / counts.sum()
            stats["moe/expert_load"] = [round(float(x), 4) for x in load]
            stats["moe/layer_counts"] = counts
        return stats

    def _micro_batches(self, rollout: Rollout):
        """(groups, input_ids, attention_mask, targets) of each micro-batch of ``micro_batch_prompts`` of this rank's
        prompt groups."""
        P = rollout.rewards.shape[0]
        mb = self.cfg.micro_batch_prompts or P
        for start in range(0, P, mb):
            groups = range(start, min(P, start + mb))
            yield (groups, *build_batch(rollout, groups, self.tokenizer.pad_token_id, self.runtime.device))

    def _step_token_counts(self, rollout: Rollout) -> torch.Tensor:
        """(P, G+1) completion tokens of every sequence of the whole step (all ranks' groups, in order)."""
        return self.world.gather_rows(torch.tensor([[len(c) for c in g] for g in rollout.completion_ids]))

    def _micro_batch_loss(self, model, rollout, groups: range, ids, mask, targets, token_counts, old=None, ref=None):
        """(loss, LossOutput, aux loss value, expert counts) of one micro-batch of this rank's groups ``groups``.

        Runs inside :class:`grao.distributed.Policy`'s forward (``self.policy(this, ...)``): under FSDP the lm_head
        weight it hands the loss is the unsharded one. The loss shares are of the whole step's P groups (all ranks').
        """
        inner = models.unwrap(model)
        P = token_counts.shape[0]
        layers = len(models.routers(inner)) if self.moe else 0
        counts = torch.zeros(layers, self.moe.num_experts if self.moe else 0, device=ids.device)
        capture = models.capture_routing(inner, self.moe.top_k) if self.moe else contextlib.nullcontext([])
        with runtime.autocast(self.runtime), capture as routing:
            out = models.backbone(inner)(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = out.last_hidden_state
        batch = self._loss_batch(model, rollout, groups, hidden, ids, mask, targets, token_counts, old, ref)
        res = self.loss(batch)
        loss, aux_value = res.loss, 0.0
        if routing:
            aux, _ = models.load_balancing_loss(
                [r.logits for r in routing],
                *self.moe,
                mask,
                groups=len(groups),
                chosen=[r.chosen for r in routing],
                scoring=self.router_scoring,
            )
            loss = loss + self.aux_coef * aux.sum() / P
            aux_value = float(aux.detach().sum()) / P
            counts += models.expert_counts(routing, layers, self.moe, mask, self.router_scoring)
        return loss, res, aux_value, counts

    def _loss_batch(self, model, rollout, groups, hidden, ids, mask, targets, token_counts, old=None, ref=None):
        """What the loss gets of one micro-batch of this rank's ``groups``: the backbone's ``hidden`` states and the
        lm_head in the compute dtype, the head's logit transform and the log-prob temperature, the group layout of
        the whole step (all ranks' P groups; this rank holds a contiguous block), and (``ref``, for a loss that
        needs it) the frozen reference model's token log-probs at the same head and temperature."""
        weight, bias = models.output_head(models.unwrap(model))  # frozen under LoRA: no weight gradient
        P = token_counts.shape[0]
        first = self.world.rank * (P // self.world.size)
        batch = losses.LossBatch(
            *self._in_compute_dtype(hidden, weight, bias),
            targets=targets,
            rewards=rollout.rewards[groups.start : groups.stop].to(self.runtime.device),
            group_size=rollout.rewards.shape[1] - 1,
            groups=range(first + groups.start, first + groups.stop),
            num_groups=P,
            step_token_counts=token_counts,
            **self._logit_transform(),
            old=old,
            reference_logp=ref,
        )
        return batch

    def _frozen_start(self) -> torch.nn.Module:
        cfg = self.cfg
        model, _ = models.load(
            cfg.model, cfg.tokenizer, cfg.model_overrides, self.runtime, cfg.seed, cfg.trust_remote_code
        )
        return model.eval().requires_grad_(False)

    def _reference_logp(self, model, ids, mask, targets) -> torch.Tensor:
        """(S, T) token log-probs of the frozen reference ``model``, through the fused path (no logits), with the
        policy's logit head and log-prob temperature (the reference model is the starting model: the same head).
        Runs inside the forward of its :class:`grao.distributed.Policy`, where FSDP has its lm_head unsharded."""
        with runtime.autocast(self.runtime):
            out = models.backbone(model)(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden, weight, bias = self._in_compute_dtype(out.last_hidden_state, *models.output_head(model))
        return fused_linear_logprobs(
            hidden, weight, targets, bias=bias, backend=self.cfg.loss_backend, **self._logit_transform()
        )

    def _logit_transform(self) -> dict:
        """How this run forms log-probs from the lm_head output, as grao_kernels keyword arguments (and LossBatch
        fields): the model's logit scale and soft cap, the log-prob temperature, the ignored target."""
        return dict(
            logit_scale=self.head.logit_scale,
            softcap=self.head.softcap,
            temperature=self.logprob_temperature,
            ignore_index=IGNORE_INDEX,
        )

    def _in_compute_dtype(self, hidden, weight, bias):
        """(hidden, weight, bias) in the autocast dtype, so the loss sees what the lm_head would under autocast."""
        dt = self.runtime.autocast_dtype
        if dt is None:
            return hidden, weight, bias
        return hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)

    def optimizer_step(self) -> dict:
        """Clip the gradient norm, take the AdamW step, advance the schedule; returns grad_norm and the lr used."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        grad_norm = distributed.local(grad_norm)  # sharded: the norm over all ranks' shards
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        return {"grad_norm": float(grad_norm), "lr": lr}

    # ------------------------------------------------------------------ evaluation and logging

    def evaluate(self) -> dict:
        """Held-out reward, RAS and NAG (against the starting model's responses) of the current model; with several
        processes each rank answers its block of the held-out prompts and the results are gathered in order."""
        cfg = self.cfg
        examples, real = self.world.padded_share(self.eval_examples)
        res = self.policy(
            evaluate.evaluate,
            self.tokenizer,
            examples,
            self.reward,
            self.runtime,
            max_new_tokens=cfg.max_new_tokens,
            max_prompt_tokens=self.max_prompt_tokens,
            batch_size=cfg.eval_batch_size,
            greedy=cfg.eval_greedy,
            temperature=cfg.temperature,
            seed=cfg.seed,
            chat_template=cfg.chat_template,
        )
        parts = self.world.gather_objects([res.responses[:real], res.rewards[:real], res.reference_rewards[:real]])
        res = evaluate.EvalResult(*([x for part in parts for x in part[i]] for i in range(3)))
        if self.baseline_eval is None:
            self.baseline_eval = res.rewards
        self.last_eval = res.mean_reward
        judged = rewards.pop_metrics(self.reward)
        rewards.check_judged(judged, self.reward)
        return {
            "step": self.step,
            "eval/reward": res.mean_reward,
            "eval/ras": res.ras,
            "eval/nag": evaluate.nag(res.rewards, self.baseline_eval),
            **{f"eval/{k}": v for k, v in judged.items()},
        }

    def log(self, line: dict) -> None:
        if self.world.main:
            try:
                run_dir.append_metrics(self.run_dir, line)
            except OSError as exc:
                raise output_errors.OutputError(output_errors.describe(self.run_dir / run_dir.METRICS, exc)) from exc

    def _plot(self) -> None:
        metrics = self.run_dir / run_dir.METRICS
        if not self.cfg.plot or not metrics.is_file() or not self.world.main:
            return
        from .plot import plot_metrics

        try:
            run_dir.record(self.run_dir, run_dir.PLOT)
            plot_metrics(metrics, self.run_dir / run_dir.PLOT)
        except OSError as exc:  # e.g. a full disk: the plot is not worth hiding the run's own outcome
            say(f"warning: could not write {run_dir.PLOT}: {exc}")

    # ------------------------------------------------------------------ run directory and checkpoints

    def _start_run(self) -> None:
        """A new run writes its config (after deleting an earlier run's files with ``overwrite``) and, for the demo,
        its random starting model (``initial/``, what ``grao eval`` measures NAG against). A resumed run drops the
        lines logged after its checkpoint and records the (resume-safe) settings it continues with."""
        initial = self.checkpoint is None and self.cfg.model == models.TINY_MOE and self.initial_model is not None
        # A sharded model's starting weights, gathered by every rank for rank 0 to write (under LoRA initial_model is
        # the plain copy taken before the adapters were added, never sharded).
        gather = initial and self.sharding is not None and self.initial_model is self.model
        weights = self.sharding.full_model_state() if gather else None
        if self.world.main and self.checkpoint is None:
            if self.overwrite:
                run_dir.clear(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run_dir.record(self.run_dir, run_dir.CONFIG)
            config.write(self.cfg, self.run_dir / run_dir.CONFIG)
            if initial:
                run_dir.record(self.run_dir, run_dir.INITIAL)
                checkpoint.save_pretrained(
                    self.run_dir / run_dir.INITIAL, self.initial_model, self.tokenizer, state_dict=weights
                )
        elif self.world.main:
            note = run_dir.cut_metrics(self.run_dir, self.step)
            if note:
                say(f"warning: {note}")
            config.write(self.cfg, self.run_dir / run_dir.CONFIG)
        self.initial_model = None  # saved once (a later train() call must not save a trained model as the start)
        self.world.barrier()

    def save_checkpoint(self) -> Path:
        """``checkpoints/step-NNNNNN``; a failed save raises CheckpointError and leaves the previous checkpoint."""
        state = {
            "step": self.step,
            **({"optimizer": self.optimizer.state_dict()} if self.sharding is None else {}),  # sharded: in DCP
            "scheduler": self.scheduler.state_dict(),
            "rng": safe_state.rng_state(),
            "baseline_eval": self.baseline_eval,
            "config": config.to_dict(self.cfg),
        }
        if isinstance(self.loss, torch.nn.Module):  # sharded: gathered, as one process has it
            state["loss"] = self.loss.state_dict() if self.sharding is None else self.sharding.full_state("loss")
        if self.world.main:
            run_dir.record(self.run_dir, checkpoint.CHECKPOINTS)
        try:
            save = checkpoint.save if self.sharding is None else self.sharding.save_checkpoint
            path = save(self.run_dir, self.step, self.model, self.tokenizer, state, self.cfg.keep_checkpoints)
        except checkpoint.CheckpointError as exc:
            previous, _ = checkpoint.latest_intact(self.run_dir)
            kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
            raise checkpoint.CheckpointError(f"{exc}; {kept}") from exc.__cause__
        self.saved_step = self.step
        return path

    def _save_after_error(self) -> str:
        """Try to checkpoint the steps done after a failed write; what became of them, for the error message."""
        if self.sharding is not None:  # a checkpoint is collective and the other ranks did not fail
            return "no checkpoint attempted in a sharded run; the newest earlier checkpoint remains"
        try:
            self._save_progress()
        except checkpoint.CheckpointError as exc:
            return f"saving a checkpoint failed too ({exc})"
        ckpt = checkpoint.latest(self.run_dir)
        return f"the steps done are in {ckpt}" if ckpt is not None else "no step was done; nothing to save"

    def _save_progress(self) -> None:
        """A checkpoint of the steps done unless the last one saved holds them (or none was done)."""
        if self.step > 0 and self.saved_step != self.step:
            self.save_checkpoint()

    def _restore_loss(self, state: dict) -> None:
        if "loss" not in state:
            raise checkpoint.CheckpointError(
                f"{self.checkpoint / checkpoint.STATE_FILE} holds no state of the {type(self.loss).__name__} loss "
                "(its parameters were not saved): the run cannot be resumed exactly"
            )
        self.loss.load_state_dict(state["loss"])

    def _restore(self, state: dict) -> None:
        if self.sharding is None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        else:  # a sharded run's, or one process's checkpoint resumed sharded
            distributed.restore(self.policy, self.optimizer, self.checkpoint, state)
        self.scheduler.load_state_dict(state["scheduler"])
        safe_state.restore_rng(state["rng"])
        self.step = self.saved_step = int(state["step"])
        self.baseline_eval = state["baseline_eval"]

    # ------------------------------------------------------------------ stopping early

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return from :meth:`train` (what SIGINT and SIGTERM do)."""
        self.stopped_by = "request_stop"

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop; all ranks then stop after the same step."""
        self.stopped_by = self.world.first(self.stopped_by)
        return self.stopped_by is not None

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT (Ctrl-C) and SIGTERM (``kill``, ``timeout``, schedulers) stop the run after the current step."""
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        # Re-armed before the message: a second signal sent on seeing it must abort, not reach this handler.
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        name = signal.Signals(signum).name
        self.stopped_by = name
        say(f"{name} received; finishing this step and saving a checkpoint ({name} again aborts without one)")
