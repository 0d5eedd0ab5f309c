"""``grao eval``: mean reward, RAS and NAG of a checkpoint (by default a run's last) on held-out prompts."""

from __future__ import annotations

import json
from pathlib import Path

from .. import config as config_mod
from ..log import say
from .common import refuse_code_from_run


def _run_of(model_dir: str | None) -> Path | None:
    """The run directory a ``checkpoints/step-NNNNNN`` model directory belongs to, or None."""
    from ..train.checkpoint import CHECKPOINTS
    from ..train.run_dir import CONFIG

    if model_dir is None:
        return None
    path = Path(model_dir).resolve()
    run = path.parent.parent
    return run if path.parent.name == CHECKPOINTS and (run / CONFIG).is_file() else None


def run(args) -> int:
    """``grao eval`` with the parsed ``args``: prints (and with ``--output`` writes) the results; its exit status."""
    from .. import models
    from ..data import context_limits, load_examples, load_jsonl
    from ..eval import evaluate, rewards
    from ..models import runtime
    from ..train import checkpoint, output_errors
    from ..train.run_dir import CONFIG, INITIAL

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise config_mod.ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.output:  # before the evaluation, not after it
        output_errors.check_file_writable(args.output, "--output")
    run = Path(args.run or _run_of(args.model) or config_mod.TrainConfig().output_dir)
    saved = run / CONFIG
    if not saved.is_file() and (args.model is None or args.data is None):
        raise config_mod.ConfigError(f"{run} is not a run directory (no config.yaml): give --model and --data")
    cfg = config_mod.load(saved) if saved.is_file() else config_mod.TrainConfig(data=args.data, model=args.model)
    refuse_code_from_run(cfg.trust_remote_code and not args.trust_remote_code, saved, "--trust-remote-code")
    model_dir = args.model
    if model_dir is None:
        model_dir, skipped = checkpoint.latest_intact(run)
        for reason in skipped:
            say(f"warning: {reason}; evaluating an older checkpoint")
        if model_dir is None:
            detail = f" ({'; '.join(skipped)})" if skipped else ""
            raise config_mod.ConfigError(f"no intact checkpoint in {run / 'checkpoints'}{detail}")
    elif (Path(model_dir) / checkpoint.MANIFEST).is_file():  # a checkpoint named by --model: checked the same way
        reason = checkpoint.problem(Path(model_dir))
        if reason is not None:
            raise checkpoint.CheckpointError(f"--model: {reason}")
    baseline = args.baseline
    if baseline is None and saved.is_file():  # the run's starting model
        baseline = run / INITIAL if (run / INITIAL).is_dir() else cfg.model
    examples = load_jsonl(args.data) if args.data else load_examples(cfg)[1]
    rt = runtime.choose(cfg.device, cfg.precision, cfg.attn_implementation)
    reward = rewards.resolve(
        args.reward or cfg.reward,
        "demo" if not args.data and cfg.data == "demo" else "file",
        rt.device,
        task=cfg.task,
        **rewards.judge_options(cfg),
    )
    opts = dict(
        max_new_tokens=cfg.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
        max_prompt_tokens=cfg.max_prompt_tokens,
        batch_size=cfg.eval_batch_size,
        greedy=cfg.eval_greedy and not args.sample,
        temperature=cfg.temperature,
        seed=cfg.seed,
        chat_template=cfg.chat_template,
    )
    decoding = "greedy" if opts["greedy"] else f"sampling at temperature {opts['temperature']:g}"
    source = f"the run's {saved}" if saved.is_file() else "the defaults (no run config.yaml)"
    say(f"generating up to {opts['max_new_tokens']} new tokens, {decoding}, as set by {source}")

    def run_model(path):
        if models.is_adapter(path):  # a LoRA checkpoint: its adapter on the base the run started from
            base_dir = run / INITIAL if cfg.model == models.TINY_MOE else cfg.model
            base = models.load_model(base_dir, rt.attn_implementation, cfg.trust_remote_code)
            base = base.to(rt.device, models.lora_base_dtype(cfg.lora_base_dtype, rt.device))
            model = models.load_adapter(base, path, trainable=False)
        else:
            model = models.load_model(path, rt.attn_implementation, cfg.trust_remote_code).to(rt.device)
        tokenizer = models.load_tokenizer(path, cfg.trust_remote_code)
        budget, _ = context_limits.prompt_budget(model.config, opts["max_prompt_tokens"], opts["max_new_tokens"])
        rewards.pop_metrics(reward)  # counts of this evaluation only
        result = evaluate.evaluate(model, tokenizer, examples, reward, rt, **dict(opts, max_prompt_tokens=budget))
        rewards.check_judged(rewards.pop_metrics(reward), reward)
        return result

    res = run_model(model_dir)
    out = {"model": str(model_dir), "prompts": len(examples), "eval/reward": res.mean_reward, "eval/ras": res.ras}
    if baseline is not None:
        base = run_model(baseline)
        out.update(
            {
                "baseline": str(baseline),
                "eval/nag": evaluate.nag(res.rewards, base.rewards),
                "baseline/reward": base.mean_reward,
            }
        )
    print(json.dumps(out))
    if args.output:
        detail = dict(
            out,
            responses=[
                {"prompt": ex.prompt, "reference": ex.reference, "response": r, "reward": v}
                for ex, r, v in zip(examples, res.responses, res.rewards)
            ],
        )
        try:
            Path(args.output).write_text(json.dumps(detail, indent=1))
        except OSError as exc:
            raise output_errors.OutputError(output_errors.describe(args.output, exc)) from exc
    return 0
