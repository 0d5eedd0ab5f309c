"""The GRAO training loop (arXiv 2508.07750) on Hugging Face causal LMs, without materialising the logits.

Each step, for P prompts (:meth:`Trainer.train_step`):
  1. rollout: sample G completions per prompt and score them, and the prompt's
     reference answer, with the reward;
  2. update: run the backbone over the P (G+1) sequences (group-major,
     reference last, targets = ignore_index at prompt and padding positions)
     and hand its final hidden states with the lm_head weight and the head's
     logit scale and soft cap (read from the model config) to the loss
     (the config's ``method``, :mod:`grao.losses`: by default
     :class:`grao.losses.GRAO`, the composition ``grao_kernels.grao_loss`` is, unless the
     constructor gets another loss); the lm_head never runs, so the (tokens x
     vocabulary) logits never exist. MoE models add the router load-balancing
     loss. Then gradient clipping, AdamW and the learning-rate schedule;
     with ``num_iterations`` > 1, that many optimizer steps on the rollout,
     the loss seeing its snapshot of the sampling policy (``LossBatch.old``).

Everything else is a call into a module named for its job: ``rollout``
(sample and score), ``update`` (micro-batch gradients, optimizer step,
schedule), ``policy`` (the model's passes, one named method each),
``setup`` (runtime, output directory checks, model, reference, data fit),
``distributed`` (FSDP2 under torchrun), ``trainer_state`` (what a checkpoint
holds beside the model, and its restore), ``run_dir`` (the run directory's
start and metrics) and ``stopping`` here; ``models``, ``data``, ``losses`` and
``eval`` beside.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .. import losses, models
from ..config import ConfigError, TrainConfig
from ..data import Example
from ..eval import evaluate as evaluation
from ..eval import rewards
from ..log import say
from ..models import heads, runtime
from . import output_errors, run_dir, setup, stopping, trainer_state, update
from .batch import IGNORE_INDEX, MicroBatch, Rollout, build_batch, micro_batches
from .rollout import PromptOrder, sample_and_score
from .update import lr_lambda

__all__ = ["IGNORE_INDEX", "TIME_KEYS", "Rollout", "Trainer", "build_batch", "lr_lambda"]

TIME_KEYS = ("tokens_per_s", "time/generate", "time/train", "time/sync")
WTL_KEYS = ("eval/wins", "eval/ties", "eval/losses")  # against the starting model's responses: NAG's counts


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
        self.runtime, self.world, sharded = setup.start_runtime(cfg)
        setup.check_output_dir(cfg, resume, overwrite)
        models.check_source(cfg.model, cfg.tokenizer)
        self.init_dir = setup.start_weights(cfg, resume)  # init_from's checkpoint (resumed: the run's initial/)
        self.train_examples, self.validation_examples, self.eval_examples, self.rejected_source = setup.load_data(cfg)
        if reward is None:
            reward = rewards.resolve(
                cfg.reward, cfg.data, self.runtime.device, task=cfg.task, **rewards.judge_options(cfg)
            )
        self.reward = reward
        self.logprob_temperature = cfg.temperature if cfg.logprob_temperature == "sampling" else 1.0
        self.callbacks = list(callbacks)
        self.prompt_order = PromptOrder(self.train_examples, cfg.prompts_per_step, cfg.seed)
        runtime.set_threads(cfg.threads, cfg.model == models.TINY_MOE, self.runtime.device)

        self.checkpoint, self.model, self.tokenizer, self.initial_model, state = setup.load_start(
            cfg, self.runtime, resume, self.init_dir
        )
        inner = models.unwrap(self.model)  # the Hugging Face model, also under a LoRA wrapper
        # How the model's forward transforms its logits (Granite, Cohere, Falcon-H1, Gemma-2 ...), checked on the
        # model itself: the loss computes the log-probs of these logits, never those of a plain linear head.
        self.head = heads.logit_head(inner, cfg.loss_backend)
        self.logit_transform = setup.logit_transform(self.head, self.logprob_temperature)
        self.loss = (
            loss if loss is not None else losses.from_config(cfg, hidden_size=heads.output_head(inner)[0].shape[1])
        )
        # A loss that is an nn.Module (PPO's value head) is trained, sharded and checkpointed with the model.
        module_loss = self.loss if isinstance(self.loss, torch.nn.Module) else None
        if module_loss is not None:
            module_loss.to(self.runtime.device)
            if state is not None:
                trainer_state.restore_loss(module_loss, state, self.checkpoint)
        # the prompt tokens that fit the model's context next to max_new_tokens; the step's memory bound
        self.max_prompt_tokens, self.prompts_cut = setup.check_data_fits(
            cfg,
            inner,
            self.tokenizer,
            self.train_examples + self.validation_examples + self.eval_examples,
            self.runtime.device,
        )
        # The frozen starting policy, for losses that compare against it (DPO, GRPO's KL).
        self.reference_model = self.reference = None
        if getattr(self.loss, "needs_reference_model", False):
            self.reference_model, self.reference = setup.reference_policy(
                cfg, self.runtime, self.logit_transform, sharded, self.init_dir
            )
        self.router_biases = setup.router_biases(cfg, inner)  # updated after each step by loss-free balancing
        self.policy, self.sharding = setup.policy(  # the loss, generate and evaluation run in its named methods
            cfg, self.model, module_loss, self.runtime, self.logit_transform, self.world, sharded
        )
        self.moe, self.aux_coef, self.router_scoring = self.policy.moe, self.policy.aux_coef, self.policy.router_scoring
        # What samples the rollouts (and, with vLLM, answers evaluation): grao.train.engines, chosen once per run.
        self.engine = setup.rollout_engine(
            cfg, self.model, self.policy, self.tokenizer, self.runtime, self.world, self.max_prompt_tokens
        )

        # LoRA: the adapters only; the policy's parameter order (the model's, then the loss's) names the optimizer's.
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.trainable_params, self.total_params = models.parameter_counts(self.policy)  # ppo: its value head too
        setup.report_parameters(cfg, self.trainable_params, self.total_params)
        self.optimizer, self.scheduler = update.optimizer_and_schedule(self.trainable, cfg)
        if self.sharding is not None:
            self.sharding.optimizer = self.optimizer
        self.step = 0
        self.saved_step: int | None = None
        self.baseline_eval: list[float] | None = None  # held-out rewards of the starting model, for eval/nag
        self.last_eval: float | None = None
        self.stopped_by: str | None = None  # the signal (or request_stop) that ends the run early
        if state is not None:
            self.step, self.baseline_eval = trainer_state.restore(
                state, self.policy, self.optimizer, self.scheduler, self.checkpoint, self.sharding is not None
            )
            self.saved_step = self.step
        self.world.barrier()  # every rank has checked the run directory before rank 0 writes to it

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
        with stopping.on_signals(self._stop_requested):
            try:
                self._start_run()
                if self.step == 0:  # the starting model: the baseline of eval/nag
                    self._evaluate_start()
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
                after = trainer_state.save_after_error(self.run_dir, self.sharding is not None, self._save_progress)
                raise output_errors.OutputError(f"{exc}; {after}") from exc.__cause__
            finally:
                bar.close()
                self._plot()
            self._save_progress()
        return self.step >= cfg.steps

    def train_step(self, step: int) -> dict:
        """Step ``step`` (1-based): rollout (sample, score), then update; returns its metrics line."""
        sync = self.engine.sync(self.model)  # the engine's weights were the policy's before the last update
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
            **rewards.statistics(r, getattr(self.loss, "reference_in_group", True)),
            **rewards.pop_metrics(self.reward),  # the rollout's (a judge's counts); evaluate() pops its own
            **stats,
            "completion_len": float(lengths.sum()) / r[:, :-1].numel(),
            "tokens_per_s": n_tokens / max(t2 - t1, 1e-9),
            "time/generate": t1 - t0,
            "time/train": t2 - t1,
            "time/sync": sync,
        }

    # ------------------------------------------------------------------ rollout: sample and score

    def prompts_for_step(self, step: int) -> list[Example]:
        """The P examples of ``step`` (1-based), the same on every rank (:class:`grao.train.rollout.PromptOrder`)."""
        return self.prompt_order(step)

    def rollout(self, examples: list[Example], step: int) -> Rollout:
        """Sample G completions per prompt and score them and the reference answers
        (:func:`grao.train.rollout.sample_and_score`)."""
        return sample_and_score(
            self.engine,
            self.tokenizer,
            examples,
            self.reward,
            self.cfg,
            step,
            self.world.rank,
            self.rejected_source,
            self.max_prompt_tokens,
        )

    # ------------------------------------------------------------------ update: loss, backward, optimizer

    def update(self, rollout: Rollout) -> dict:
        """``num_iterations`` optimizer steps on the rollout, each :meth:`accumulate_gradients` then
        :meth:`optimizer_step`, the loss seeing its :meth:`snapshot` of the policy that sampled.

        Returns the metrics of the step: with one iteration its own, with more
        the mean over the iterations of each number (``lr`` too) and the sum of
        ``train_tokens``.
        """
        self.engine.sleep()  # CUDA: the engine's memory goes to the update until the next sync
        reference = self.reference_logps(rollout)  # fixed for the rollout: once, whatever num_iterations
        old = self.snapshot(rollout, reference)
        lines = []
        for _ in range(self.cfg.num_iterations):
            stats = self.accumulate_gradients(rollout, old, reference)
            stats.update(self.optimizer_step())
            self.engine.mark_stale()
            counts = stats.pop("moe/layer_counts", None)
            if self.router_biases and counts is not None:
                models.update_router_bias(self.router_biases, counts, self.cfg.router_bias_update_rate)
            lines.append(stats)
        # the engine against the policy that sampled: the first iteration's forward (later ones see updated weights)
        gap = [line.pop("rollout/logp_gap", None) for line in lines][0]
        stats = lines[0] if len(lines) == 1 else update.mean_over_iterations(lines)
        return stats if gap is None else {**stats, "rollout/logp_gap": gap}

    def reference_logps(self, rollout: Rollout) -> list[torch.Tensor] | None:
        """The frozen reference model's (S, T) token log-probs of each micro-batch of the rollout
        (``LossBatch.reference_logp``), for a loss with ``needs_reference_model``; None for the others."""
        if self.reference is None:
            return None
        batches = self.micro_batches(rollout)
        return update.reference_logps(self.reference, batches, self.cfg.loss_backend, self.sharding is not None)

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
        batches = self.micro_batches(rollout, reference=reference)
        return update.snapshots(self.policy, take, batches)

    def accumulate_gradients(
        self, rollout: Rollout, old: list[dict] | None = None, reference: list[torch.Tensor] | None = None
    ) -> dict:
        """Gradients of the step's loss (into ``.grad``) over micro-batches of whole prompt groups
        (:func:`grao.train.update.accumulate_gradients`); ``old``: the :meth:`snapshot` of each micro-batch, passed
        to the loss as ``LossBatch.old``; ``reference``: the rollout's :meth:`reference_logps` (computed here when
        the loss needs them and none are given)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if reference is None:
            reference = self.reference_logps(rollout)
        batches = self.micro_batches(rollout, old, reference)
        return update.accumulate_gradients(self.policy, self.loss, batches, self.world)

    def micro_batches(self, rollout: Rollout, old=None, reference=None) -> list[MicroBatch]:
        """This rank's micro-batches of ``micro_batch_prompts`` prompt groups, each with its ``old`` snapshot and
        ``reference`` log-probs (lists with one entry per micro-batch, or None), numbered in the whole step."""
        return update.rank_micro_batches(
            rollout,
            self.world,
            self.cfg.micro_batch_prompts,
            self.tokenizer.pad_token_id,
            self.runtime.device,
            old,
            reference,
        )

    def optimizer_step(self) -> dict:
        """Clip the gradient norm, take the AdamW step, advance the schedule; returns grad_norm and the lr used."""
        return update.optimizer_step(self.trainable, self.optimizer, self.scheduler, self.cfg.max_grad_norm)

    # ------------------------------------------------------------------ evaluation and logging

    def evaluate(self) -> dict:
        """Held-out reward, RAS and NAG (against the starting model's responses) of the current model, and with
        ``validation_size`` the validation prompts' reward and RAS (``val/``)."""
        res, judged = self.answer(self.eval_examples)
        if self.baseline_eval is None:
            self.baseline_eval = res.rewards
        self.last_eval = res.mean_reward
        line = {
            "step": self.step,
            "eval/reward": res.mean_reward,
            "eval/ras": res.ras,
            "eval/nag": evaluation.nag(res.rewards, self.baseline_eval),
            **dict(zip(WTL_KEYS, evaluation.win_tie_loss(res.rewards, self.baseline_eval, "eval/nag"))),
            **{f"eval/{k}": v for k, v in judged.items()},
        }
        if self.validation_examples:
            val, judged = self.answer(self.validation_examples)
            line.update(
                {"val/reward": val.mean_reward, "val/ras": val.ras, **{f"val/{k}": v for k, v in judged.items()}}
            )
        line.update(self.term_gradients())
        return line

    def answer(self, examples: list[Example]) -> tuple[evaluation.EvalResult, dict]:
        """The current model's responses to ``examples`` (greedy unless ``eval_greedy`` is off) and their rewards,
        and the reward's own metrics of scoring them (a judge's counts, checked); with several processes each rank
        answers its block of the prompts and the results are gathered in order."""
        cfg = self.cfg
        examples, real = self.world.padded_share(examples)
        options = dict(
            max_new_tokens=cfg.max_new_tokens,
            max_prompt_tokens=self.max_prompt_tokens,
            batch_size=cfg.eval_batch_size,
            greedy=cfg.eval_greedy,
            temperature=cfg.temperature,
            seed=cfg.seed,
            chat_template=cfg.chat_template,
        )
        if self.engine.name == "vllm":  # the engine answers, with the current weights
            self.engine.sync(self.model)
            res = evaluation.evaluate(
                self.model, self.tokenizer, examples, self.reward, self.runtime, engine=self.engine, **options
            )
        else:
            res = self.policy.evaluate(self.tokenizer, examples, self.reward, **options)
        parts = self.world.gather_objects([res.responses[:real], res.rewards[:real], res.reference_rewards[:real]])
        judged = rewards.pop_metrics(self.reward)
        rewards.check_judged(judged, self.reward)
        return evaluation.EvalResult(*([x for part in parts for x in part[i]] for i in range(3))), judged

    def term_gradients(self) -> dict:
        """``terms/grad_norm/<term>`` of each GRAO term on the fixed probe batch (:func:`grao.losses.term_gradient_norms`)
        and ``terms/grad_share/<term>``, its norm over the three norms' sum (left out when all are 0: every probe
        group tied); {} for a loss without GRAO's terms or ``evaluation.probe_prompts`` 0.

        The probe batch: the first ``probe_prompts`` training prompts (at most ``micro_batch_prompts``, so the
        probe's one micro-batch fits where training's do), each with ``group_size`` completions sampled from the
        current model with one seed at every evaluation, and its reference answer; so two evaluations differ by
        the model alone. It runs under its own RNG state and its reward calls are not counted in any metrics line.
        """
        k = min(self.cfg.evaluation.probe_prompts, self.cfg.runtime.micro_batch_prompts or math.inf)
        if not isinstance(self.loss, losses.GRAO) or k == 0:
            return {}
        device = self.runtime.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            probe = sample_and_score(
                self.engine,
                self.tokenizer,
                self.train_examples[:k],
                self.reward,
                self.cfg,
                0,  # step 0 has no rollout of its own: the probe's seed, the same on every rank
                0,
                "sampled",  # GRAO's groups are always G samples and the reference
                self.max_prompt_tokens,
            )
        rewards.pop_metrics(self.reward)
        counts = torch.tensor([[len(c) for c in g] for g in probe.completion_ids])
        (mb,) = micro_batches(probe, 0, self.tokenizer.pad_token_id, device, counts, 0)
        norms = self.policy.term_gradient_norms(self.loss, mb)
        total = sum(norms.values())
        out = {f"terms/grad_norm/{t}": v for t, v in norms.items()}
        if total > 0:
            out.update({f"terms/grad_share/{t}": v / total for t, v in norms.items()})
        return out

    def _evaluate_start(self) -> None:
        """Evaluate and log the starting model (the baseline of eval/nag), with the run's parameter counts."""
        started = time.perf_counter()
        say(f"evaluating the starting model on {len(self.eval_examples)} prompts ...")
        start_eval = self.evaluate()
        say(f"starting model: reward {start_eval['eval/reward']:.3f} ({time.perf_counter() - started:.1f}s)")
        self.log(
            {
                **start_eval,
                "params/trainable": self.trainable_params,
                "params/total": self.total_params,
                "data/prompts_cut": self.prompts_cut,
            }
        )

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
        from ..tools.plot import plot_metrics

        try:
            run_dir.record(self.run_dir, run_dir.PLOT)
            plot_metrics(metrics, self.run_dir / run_dir.PLOT, self.cfg.method)
        except OSError as exc:  # e.g. a full disk: the plot is not worth hiding the run's own outcome
            say(f"warning: could not write {run_dir.PLOT}: {exc}")

    # ------------------------------------------------------------------ run directory and checkpoints

    def _start_run(self) -> None:
        """Rank 0 starts the run directory (:func:`grao.train.run_dir.start`): the config and, for a new run of the
        demo or from init_from, its starting model; a resumed run's metrics cut back to its checkpoint."""
        writes_initial = self.cfg.model == models.TINY_MOE or self.cfg.init_from is not None
        initial = self.checkpoint is None and writes_initial and self.initial_model is not None
        # A sharded model's starting weights, gathered by every rank for rank 0 to write (under LoRA initial_model is
        # the plain copy taken before the adapters were added, never sharded).
        gather = initial and self.sharding is not None and self.initial_model is self.model
        weights = self.sharding.full_model_state() if gather else None
        if self.world.main:
            run_dir.start(
                self.run_dir,
                self.cfg,
                overwrite=self.overwrite,
                resumed_at=None if self.checkpoint is None else self.step,
                initial=self.initial_model if initial else None,
                tokenizer=self.tokenizer,
                weights=weights,
            )
        self.initial_model = None  # saved once (a later train() call must not save a trained model as the start)
        self.world.barrier()

    def save_checkpoint(self) -> Path:
        """``checkpoints/step-NNNNNN``; a failed save raises CheckpointError and leaves the previous checkpoint."""
        state = trainer_state.collect(
            self.step, self.optimizer, self.scheduler, self.baseline_eval, self.cfg, self.loss, self.sharding
        )
        path = trainer_state.save(
            self.run_dir,
            self.step,
            self.model,
            self.tokenizer,
            state,
            self.cfg.keep_checkpoints,
            self.sharding,
            self.world.main,
        )
        self.saved_step = self.step
        return path

    def _save_progress(self) -> None:
        """A checkpoint of the steps done unless the last one saved holds them (or none was done)."""
        if self.step > 0 and self.saved_step != self.step:
            self.save_checkpoint()

    # ------------------------------------------------------------------ stopping early

    def close(self, wait: bool = True) -> None:
        """Shut the rollout engine down (an in-process vLLM engine frees its memory and its process groups);
        ``wait``: first wait until every rank gets here. The trainer cannot sample afterwards."""
        if wait:
            self.world.barrier()
        self.engine.close()

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return from :meth:`train` (what SIGINT and SIGTERM do)."""
        self.stopped_by = "request_stop"

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop; all ranks then stop after the same step."""
        self.stopped_by = self.world.first(self.stopped_by)
        return self.stopped_by is not None

    def _stop_requested(self, name: str) -> None:
        self.stopped_by = name
