"""What a run starts from: its runtime and processes, the checks of its output directory (new or resumed), its data,
its model and tokenizer (fresh, LoRA-wrapped, a checkpoint's), the frozen starting model a loss may compare against,
the policy module (sharded with FSDP2 when the run is), the routers' balancing biases, and the check that its data
fits the model's context and the machine's memory."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from .. import config, data, models
from ..config import ConfigError
from ..data import context_limits, text_coverage
from ..log import say
from ..models import runtime
from ..models.generation import encode_prompt
from . import checkpoint, distributed, run_dir, step_bounds
from .batch import IGNORE_INDEX
from .policy import Policy


def start_weights(cfg, resume: bool) -> Path | None:
    """The directory of the weights a run with ``init_from`` starts from (None without ``init_from``).

    A new run: the checkpoint ``init_from`` names (a checkpoint directory, or a run directory's newest intact
    checkpoint), a whole model (not a LoRA adapter) of this run's ``model`` and ``model_overrides`` when the source
    run's config.yaml says what it trained. A resumed run: its own ``initial/``, the copy of those weights it wrote
    when it started, so its frozen reference does not move when the source run goes on. ConfigError otherwise."""
    if cfg.policy.init_from is None:
        return None
    if resume:
        initial = Path(cfg.run.output_dir) / run_dir.INITIAL
        if not (initial / checkpoint.MANIFEST).is_file():
            raise ConfigError(f"--resume: {initial}, the starting weights of this init_from run, is missing")
        try:
            reason = checkpoint.files_problem(initial)
        except checkpoint.CheckpointError as exc:
            reason = str(exc)
        if reason is not None:
            raise ConfigError(f"--resume: the starting weights of this init_from run are not intact ({reason})")
        return initial
    try:
        found, skipped = checkpoint.weights_source(cfg.policy.init_from)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(f"'init_from': {exc}") from None
    for reason in skipped:
        say(f"warning: init_from: {reason}; starting from an older checkpoint")
    if models.is_adapter(found):
        raise ConfigError(
            f"'init_from': {found} holds a LoRA adapter, not a whole model; start from a full fine-tuning run's "
            "checkpoint"
        )
    source_config = found.parent.parent / run_dir.CONFIG
    if found.parent.name == checkpoint.CHECKPOINTS and source_config.is_file():
        source = config.load(source_config)
        for name in ("model", "model_overrides"):
            if getattr(source, name) != getattr(cfg, name):
                raise ConfigError(
                    f"'init_from': {found} is a checkpoint of {name} {getattr(source, name)!r} (its run's "
                    f"{source_config}), this run's {name} is {getattr(cfg, name)!r}; give the same {name}"
                )
    say(f"init_from: starting from the weights of {found}")
    return found


def configured_model(cfg, rt) -> tuple:
    """(model, tokenizer) as the config names them: the policy's model, tokenizer and overrides, seeded."""
    return models.load(
        cfg.policy.model,
        cfg.policy.tokenizer,
        cfg.policy.model_overrides,
        rt,
        cfg.run.seed,
        cfg.policy.trust_remote_code,
        cfg.dataset.task,
    )


def weights_at(cfg, rt, init_dir: Path) -> torch.nn.Module:
    """The whole model saved in ``init_dir`` (:func:`start_weights`), read from safetensors only."""
    return models.load_model(init_dir, rt.attn_implementation, cfg.policy.trust_remote_code, safetensors=True)


def fresh_model(cfg, rt, init_dir: Path | None = None) -> tuple:
    """(model, tokenizer, initial model) of a new run: the config's model on ``rt.device`` (with ``init_dir``, the
    weights there, read from safetensors only), under LoRA its adapters over the base; the initial model is what
    ``initial/`` holds for the demo or an init_from run (the full-weight base under LoRA)."""
    if init_dir is not None:  # weights only: the source's optimizer, schedule and step stay behind
        model = weights_at(cfg, rt, init_dir)
        tokenizer = models.load_tokenizer(cfg.policy.tokenizer or init_dir, cfg.policy.trust_remote_code)
        return model.to(rt.device), tokenizer, model
    model, tokenizer = configured_model(cfg, rt)
    initial = model
    if cfg.lora.rank:
        if cfg.policy.model == models.TINY_MOE:  # tiny by construction: keep the full-weight base for initial/
            initial = copy.deepcopy(model)
        model = models.add_lora(
            model.to(models.lora_base_dtype(cfg.lora.base_dtype, rt.device)),
            cfg.lora.rank,
            cfg.lora.alpha,
            cfg.lora.dropout,
            config.lora_targets(cfg),
            cfg.run.seed,
        )
    return model, tokenizer, initial


def frozen_start(cfg, rt, init_dir: Path | None = None) -> torch.nn.Module:
    """The frozen starting policy, for losses that compare against it (DPO, GRPO's KL, PPO): loaded afresh from the
    config, or from ``init_dir`` (:func:`start_weights`), so a resumed run gets the same one."""
    if init_dir is not None:
        model = weights_at(cfg, rt, init_dir)
        return model.to(rt.device).eval().requires_grad_(False)
    model, _ = configured_model(cfg, rt)
    return model.eval().requires_grad_(False)


def checkpoint_model(directory: Path, cfg, rt):
    """A checkpoint's model: the whole model, or (LoRA) its adapter on the frozen base the run started from
    (``initial/`` for the demo, else ``cfg.policy.model``)."""
    if not models.is_adapter(directory):
        return models.load_model(directory, rt.attn_implementation, cfg.policy.trust_remote_code).to(rt.device)
    base_dir = Path(cfg.run.output_dir) / run_dir.INITIAL if cfg.policy.model == models.TINY_MOE else cfg.policy.model
    base = models.load_model(base_dir, rt.attn_implementation, cfg.policy.trust_remote_code)
    base = base.to(rt.device, models.lora_base_dtype(cfg.lora.base_dtype, rt.device))
    return models.load_adapter(base, directory, trainable=True)


def check_resumable(cfg) -> None:
    """ConfigError unless the run in ``cfg.run.output_dir`` has a checkpoint and its saved settings, and ``cfg`` changes
    nothing it computes (only the resume-safe keys)."""
    directory = Path(cfg.run.output_dir)
    if not checkpoint.step_dirs(directory):
        raise ConfigError(f"--resume: no checkpoint in {directory / checkpoint.CHECKPOINTS}")
    saved = directory / run_dir.CONFIG
    if not saved.is_file():
        raise ConfigError(
            f"--resume: {saved} is missing, and without the run's settings a resumed run would silently use "
            "others; restore the file (or start a new run with --overwrite)"
        )
    conflicts = config.resume_conflicts(config.load(saved), cfg)
    if conflicts:
        raise ConfigError(
            f"--resume would change what the run in {directory} computes ({'; '.join(conflicts)}); "
            "start a new run in another output_dir for that"
        )


def check_data_fits(cfg, model, tokenizer, examples, device) -> tuple[int, int]:
    """(the prompt tokens a prompt keeps, how many prompts are longer) for ``model``'s context, after checking that
    one step fits the machine's memory (:mod:`grao.train.step_bounds`), that every prompt leaves room for its
    answer, and warning about prompts cut and text the tokenizer does not know."""
    budget, note = context_limits.prompt_budget(model.config, cfg.dataset.max_prompt_tokens, cfg.rollout.max_new_tokens)
    step_bounds.check(cfg, budget, models.output_head(model)[0].shape[1], device)
    prompts = [ex.prompt for ex in examples]
    cut = context_limits.count_longer(
        prompts, lambda p, n: encode_prompt(tokenizer, p, n, cfg.dataset.chat_template), budget
    )
    if cut:  # max_prompt_tokens defaults to what the context leaves: quiet until a prompt is cut
        why = f" ({note})" if note else ""
        say(
            f"warning: {cut} of {len(prompts)} prompts are longer than {budget} tokens and are cut to their last "
            f"{budget}{why}; metric data/prompts_cut"
        )
    data.check_prompts(examples, lambda p: encode_prompt(tokenizer, p, budget, cfg.dataset.chat_template))
    unknown, first = text_coverage.unknown_examples(examples, tokenizer)
    if unknown:
        say(
            f"warning: {unknown} example(s) hold text the tokenizer does not know (it becomes "
            f"{tokenizer.unk_token}), first {first}; use a tokenizer that covers the data"
        )
    return budget, cut


def start_runtime(cfg) -> tuple:
    """(runtime, world, sharded) of the run: its device, precision and processes, FSDP2 under torchrun or with an
    fsdp_* memory option; warns when the learning rate would never leave its warmup."""
    rt = runtime.choose(cfg.device, cfg.precision, cfg.attn_implementation)
    sharded = distributed.sharded(cfg)
    world, rt = distributed.init(rt, sharded)
    runtime.check_loss_backend(cfg.loss_backend, rt.device)
    if cfg.warmup_steps >= cfg.steps:
        say(
            f"warning: warmup_steps ({cfg.warmup_steps}) >= steps ({cfg.steps}): the learning rate is still "
            "warming up at the last step and never decays; lower warmup_steps for a run this short"
        )
    return rt, world, sharded


def check_output_dir(cfg, resume: bool, overwrite: bool) -> None:
    """ConfigError unless ``cfg.output_dir`` can take this run: writable, and resumable (``resume``) or free for a
    new run (empty, or ``overwrite`` and holding only what runs wrote there)."""
    directory = Path(cfg.output_dir)
    run_dir.check_writable(directory)
    if resume:
        run_dir.check_no_symlinks(directory)
        check_resumable(cfg)
    else:
        run_dir.check_fresh_start(directory, overwrite)


def load_data(cfg) -> tuple:
    """(training examples, validation examples, held-out examples, where dpo's rejected answers come from): the
    data's own ("data": each group is rejected + reference, nothing is sampled) or the lowest-scored of the G samples
    ("sampled")."""
    train_examples, eval_examples = data.load_examples(cfg)
    train_examples, validation = data.validation_split(train_examples, eval_examples, cfg.evaluation.validation_size)
    rejected = "sampled"
    if cfg.method == "dpo":
        rejected = data.rejected_source(cfg.dpo_rejected, train_examples)
        say(f"dpo: rejected answers from {'the data' if rejected == 'data' else 'the G samples'}")
    return train_examples, validation, eval_examples, rejected


def load_start(cfg, rt, resume: bool, init_dir: Path | None = None) -> tuple:
    """(checkpoint, model, tokenizer, initial model, trainer state) the run starts from: with ``resume`` the newest
    intact checkpoint's (no initial model), else :func:`fresh_model`'s (no checkpoint, no state), from ``init_dir``
    when given."""
    loading = time.perf_counter()
    say(f"loading model {cfg.model} ...")
    if resume:
        ckpt, (model, tokenizer, state), skipped = checkpoint.load_latest(
            cfg.output_dir,
            lambda d: checkpoint_model(d, cfg, rt),
            lambda d: models.load_tokenizer(d, cfg.trust_remote_code),
        )
        for reason in skipped:
            say(f"warning: {reason}; falling back to an older checkpoint")
        initial = None
    else:
        ckpt, state = None, None
        model, tokenizer, initial = fresh_model(cfg, rt, init_dir)
    say(f"loaded model {cfg.model} in {time.perf_counter() - loading:.1f}s")
    if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
        say("warning: chat_template is on but the tokenizer has no chat template; prompts are used as written")
    return ckpt, model, tokenizer, initial, state


def logit_transform(head: models.LogitHead, temperature: float) -> dict:
    """How this run forms log-probs from the lm_head output (``head``'s logit scale and soft cap, the log-prob
    ``temperature``): ``grao_kernels`` keyword arguments and :class:`grao.losses.LossBatch` fields."""
    return dict(logit_scale=head.logit_scale, softcap=head.softcap, temperature=temperature, ignore_index=IGNORE_INDEX)


def reference_policy(cfg, rt, logit_transform: dict, sharded: bool, init_dir: Path | None = None) -> tuple:
    """(reference model, its Policy) for a loss that compares against the frozen starting policy (DPO, GRPO's KL),
    sharded like the policy when the run is; loaded afresh from the config (or ``init_dir``), so a resumed run gets
    the same one."""
    model = frozen_start(cfg, rt, init_dir)
    reference = Policy(model, runtime=rt, logit_transform=logit_transform)
    if sharded:  # frozen: sharded like the policy, forward only
        distributed.shard(reference, rt.device, cfg.fsdp_cpu_offload, cfg.fsdp_param_dtype)
    return model, reference


def router_biases(cfg, model) -> list:
    """The routers' correction biases that auxiliary-loss-free balancing updates after each step (none unless
    ``router_bias_update_rate`` > 0); ConfigError for a model without them."""
    if cfg.router_bias_update_rate <= 0:
        return []
    try:
        return models.correction_biases(model)
    except models.ModelError as exc:
        raise ConfigError(f"'router_bias_update_rate' is {cfg.router_bias_update_rate}: {exc}") from None


def report_parameters(cfg, trainable: int, total: int) -> None:
    """Say how many parameters train (under LoRA the adapters only, PPO's value head included)."""
    lora = f"; LoRA rank {cfg.lora_rank} on {cfg.lora_target_modules}, base frozen" if cfg.lora_rank else ""
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(1, total):.2f}%){lora}")


def policy(cfg, model, module_loss, rt, logit_transform: dict, world, sharded: bool) -> tuple:
    """(Policy, Sharding or None): ``model`` (and a loss that is an nn.Module) as the module the loss, generate and
    evaluation run in, with its MoE load-balancing loss, activation checkpointing when configured, and FSDP2 over
    ``world`` when ``sharded``."""
    inner = models.unwrap(model)  # the Hugging Face model, also under a LoRA wrapper
    if cfg.gradient_checkpointing:
        models.enable_activation_checkpointing(inner)
    model.config.use_cache = True  # for generate; the training forward passes use_cache=False
    pol = Policy(
        model,
        module_loss,
        runtime=rt,
        logit_transform=logit_transform,
        moe=models.moe_info(inner),
        aux_coef=models.aux_loss_coef(inner, cfg.router_aux_loss_coef),
        router_scoring=models.router_scoring(inner),
    )
    sharding = None
    if sharded:
        sharding = distributed.Sharding(pol, world, rt.device, cfg.fsdp_cpu_offload, cfg.fsdp_param_dtype)
    return pol, sharding


def rollout_engine(cfg, model, policy, tokenizer, rt, world, max_prompt_tokens: int):
    """The run's rollout engine (:mod:`grao.train.engines`), chosen by ``rollout_engine`` and announced with the
    reason; ConfigError for vllm where vLLM cannot run the model, or an importance-sampling correction without
    the engine's log-probs."""
    from grao_kernels.integrations.vllm import engine_config

    from . import engines

    max_len = max_prompt_tokens + cfg.max_new_tokens
    choice = engines.choose(cfg.rollout_engine, engine_config(model), rt.device, max_len, world.size)
    if choice.engine == "hf":
        if cfg.vllm_importance_sampling_cap > 0:
            raise ConfigError(
                f"'vllm_importance_sampling_cap' needs the vllm engine's log-probs; the rollouts run on hf ({choice.why})"
            )
        say(f"rollout engine: hf, transformers' generate ({choice.why})")
        return engines.HFEngine(policy, tokenizer)
    started = time.perf_counter()
    temperature = cfg.temperature if cfg.logprob_temperature == "sampling" else 1.0
    engine = engines.VLLMEngine(model, tokenizer, cfg, rt, world, max_len, temperature)
    say(f"rollout engine: {engine.description} ({choice.why}; started in {time.perf_counter() - started:.1f}s)")
    return engine
