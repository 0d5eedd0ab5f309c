"""The training methods (grao.losses) against float64 references that materialise the logits, and in the trainer."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from utils import FP32_VALUES, assert_close, assert_grads_close, assert_same_run, grads, leaves, make_batch, rel_l2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from oracles import reference_dpo, reference_grpo, reference_sft  # noqa: E402

from grao import cli, config, models  # noqa: E402
from grao.config import ConfigError, TrainConfig  # noqa: E402
from grao.losses import DPO, GRAO, GRPO, METHODS, SFT, LossBatch, from_config  # noqa: E402
from grao.train.trainer import Trainer, lr_lambda  # noqa: E402
from grao_kernels import fused_linear_logprobs, grao_loss  # noqa: E402
from grao_kernels.testing import reference_advantages, reference_grao, reference_logprobs  # noqa: E402

P, G, T, H, V = 3, 3, 7, 8, 37  # V not a power of two; make_batch pads, ignores prompts, empties one row, ties a group
K = G + 1
WHOLE = [range(0, P)]
SPLIT = [range(0, 1), range(1, P)]
BETA, LAM = 0.5, 0.6


@pytest.fixture
def batch():
    hidden, weight, bias, targets, rewards = make_batch(P, G, T, H, V, bias=True, dtype=torch.float32)
    return hidden, weight, bias, targets, rewards


def token_counts(targets):
    return (targets != -100).sum(1).view(P, K)


def frozen_logp(batch):
    """(S, T) token log-probs of a 'frozen reference model': the batch's head with a perturbed weight."""
    hidden, weight, bias, targets, _ = batch
    other = weight + 0.3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    return reference_logprobs(hidden, other, targets, bias=bias).detach()


def sampling_logp(batch):
    """(S, T) token log-probs of 'the policy that sampled', a few updates ago: another perturbed weight, far enough
    from the batch's that a good share of the ratios fall outside the clip range."""
    hidden, weight, bias, targets, _ = batch
    other = weight + 0.15 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(2))
    return reference_logprobs(hidden, other, targets, bias=bias).detach()


def engine_logp(batch):
    """(S, T) an inference engine's log-probs of the sampled tokens: :func:`sampling_logp`'s policy computed a little
    differently (another small perturbation), 0 at the reference answers, which the engine did not sample."""
    hidden, weight, bias, targets, _ = batch
    drift = 0.15 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(2))
    drift = drift + 0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
    logp = reference_logprobs(hidden, weight + drift, targets, bias=bias).detach()
    return torch.where(torch.arange(P * K)[:, None] % K == G, 0.0, logp)


def run(loss, batch, splits, *, counts=True, old=False, engine=False, **head):
    """The step's loss (the micro-batches' shares summed) and its gradients w.r.t. hidden, weight, bias;
    ``old``: pass :func:`sampling_logp` as ``LossBatch.old["logp"]``; ``head``: the LossBatch's logit_scale /
    softcap / temperature."""
    hidden, weight, bias, targets, rewards = batch
    h, w, b = leaves(hidden, weight, bias)
    total, metrics = 0.0, {}
    for groups in splits:
        rows = slice(groups.start * K, groups.stop * K)
        out = loss(
            LossBatch(
                h[rows],
                w,
                b,
                targets[rows],
                rewards[groups.start : groups.stop],
                group_size=G,
                groups=groups,
                num_groups=P,
                step_token_counts=token_counts(targets) if counts else None,
                reference_logp=frozen_logp(batch)[rows],
                old={"logp": sampling_logp(batch)[rows]} if old else None,
                sampling_logp=engine_logp(batch)[rows] if engine else None,
                **head,
            )
        )
        total = total + out.loss
        for key, value in out.metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value
    return total.detach(), grads(total, h, w, b), metrics


def oracle(formula, batch, **head):
    """``formula(hidden, weight, bias, targets, rewards, **head)`` in float64 and its gradients."""
    hidden, weight, bias, targets, rewards = batch
    h, w, b = leaves(hidden, weight, bias, dtype=torch.float64)
    value = formula(h, w, b, targets, rewards, **head)
    return value, grads(value, h, w, b)


def grao_without(*dropped, exploration=1.0):
    """The float64 GRAO loss (reference_grao's terms) with the ``dropped`` terms removed."""

    def formula(h, w, b, targets, rewards, **head):
        ref = reference_grao(h, w, targets, rewards, bias=b, beta=BETA, lam=LAM, **head)
        weights = {"exploration": exploration, "imitation": 1.0, "alignment": 1.0}
        return -sum(weights[t] * ref[t] for t in GRAO.TERMS if t not in dropped)

    return formula


def sft_formula(h, w, b, targets, rewards, **head):
    return reference_sft(h, w, targets, torch.arange(P * K) % K == G, bias=b, **head)


def grpo_formula(loss_type, *, kl_beta=0.0, clipped=False, clip_epsilon=0.2, clip_epsilon_high=None, is_cap=0.0):
    """reference_grpo on the batch's samples; with ``clipped`` the ratio to :func:`sampling_logp`, with ``kl_beta``
    the KL to :func:`frozen_logp`, with ``is_cap`` the truncated importance weights to :func:`engine_logp`."""

    def formula(h, w, b, targets, rewards, **head):
        samples = torch.arange(P * K) % K != G  # GRPO's groups hold the G samples only
        batch = (h, w, b, targets, rewards)
        return reference_grpo(
            h[samples],
            w,
            targets[samples],
            rewards[:, :G],
            bias=b,
            loss_type=loss_type,
            max_completion_length=T,
            old_logp=sampling_logp(batch)[samples] if clipped else None,
            clip_epsilon=clip_epsilon,
            clip_epsilon_high=clip_epsilon_high,
            kl_beta=kl_beta,
            reference_logp=frozen_logp(batch)[samples],
            sampling_logp=engine_logp(batch)[samples],
            importance_sampling_cap=is_cap,
            **head,
        )

    return formula


def dpo_formula(h, w, b, targets, rewards, **head):
    frozen = frozen_logp((h, w, b, targets, rewards))
    return reference_dpo(h, w, targets, rewards, frozen, beta=0.7, bias=b, **head)


CASES = {
    "grao-no-exploration": (GRAO(BETA, LAM, exploration=0.0, backend="torch"), grao_without("exploration")),
    "grao-no-imitation": (GRAO(0.0, LAM, backend="torch"), grao_without("imitation")),
    "grao-no-alignment": (GRAO(BETA, 0.0, backend="torch"), grao_without("alignment")),
    "grao-exploration-0.3": (
        GRAO(BETA, LAM, exploration=0.3, backend="torch"),
        grao_without(exploration=0.3),
    ),
    "sft": (SFT("torch"), sft_formula),
    "grpo": (GRPO("grpo", backend="torch"), grpo_formula("grpo")),
    "dr_grpo": (GRPO("dr_grpo", max_completion_length=T, backend="torch"), grpo_formula("dr_grpo")),
    "dapo": (GRPO("dapo", backend="torch"), grpo_formula("dapo")),
    "grpo-kl": (GRPO("grpo", kl_beta=0.3, backend="torch"), grpo_formula("grpo", kl_beta=0.3)),
    "grpo-clipped": (GRPO("grpo", backend="torch"), grpo_formula("grpo", clipped=True)),
    "dr_grpo-clipped-kl": (
        GRPO("dr_grpo", max_completion_length=T, kl_beta=0.3, clip_epsilon_high=0.28, backend="torch"),
        grpo_formula("dr_grpo", kl_beta=0.3, clipped=True, clip_epsilon_high=0.28),
    ),
    "dapo-clipped-kl": (
        GRPO("dapo", kl_beta=0.3, clip_epsilon=0.1, clip_epsilon_high=0.3, backend="torch"),
        grpo_formula("dapo", kl_beta=0.3, clipped=True, clip_epsilon=0.1, clip_epsilon_high=0.3),
    ),
    "grpo-clipped-is": (
        GRPO("grpo", importance_sampling_cap=1.1, backend="torch"),
        grpo_formula("grpo", clipped=True, is_cap=1.1),
    ),
    "dapo-clipped-kl-is": (
        GRPO("dapo", kl_beta=0.3, importance_sampling_cap=2.0, backend="torch"),
        grpo_formula("dapo", kl_beta=0.3, clipped=True, is_cap=2.0),
    ),
    "dpo": (DPO(0.7, backend="torch"), dpo_formula),
}
CLIPPED = {name for name in CASES if "clipped" in name}  # their batches carry the sampling policy's log-probs
ENGINE = {name for name in CASES if name.endswith("-is")}  # and the inference engine's


@pytest.mark.parametrize("splits", [WHOLE, SPLIT], ids=["one-batch", "micro-batches"])
@pytest.mark.parametrize("name", list(CASES))
def test_method_loss_and_gradients_match_the_float64_formula(batch, name, splits):
    loss, formula = CASES[name]
    want, want_grads = oracle(formula, batch)
    got, got_grads, _ = run(loss, batch, splits, old=name in CLIPPED, engine=name in ENGINE)
    assert_close(got, want, rtol=1e-5, atol=1e-6, name=f"{name} loss")
    assert_grads_close(got_grads, want_grads)
    assert float(want_grads[0].abs().sum()) > 0  # the batch has signal: a zero gradient would not pass unnoticed


@pytest.mark.parametrize(
    "head",
    [{"logit_scale": 0.5, "softcap": 3.0}, {"temperature": 0.7}, {"softcap": 3.0, "temperature": 1.3}],
    ids=["scale-softcap", "temperature", "softcap-temperature"],
)
@pytest.mark.parametrize("name", list(CASES))
def test_methods_use_the_model_logit_head(batch, name, head):
    # a Granite-like scale and a Gemma-like soft cap on the logits, and the log-prob temperature, through the LossBatch
    loss, formula = CASES[name]
    want, want_grads = oracle(formula, batch, **head)
    got, got_grads, _ = run(loss, batch, SPLIT, old=name in CLIPPED, engine=name in ENGINE, **head)
    assert_close(got, want, rtol=1e-5, atol=1e-6, name=f"{name} loss")
    assert_grads_close(got_grads, want_grads)
    plain, _ = oracle(formula, batch)
    assert abs(float(plain) - float(want)) > 1e-3  # the head changes the loss: ignoring it would not pass


@pytest.mark.parametrize("exploration", [0.0, 1.0])
def test_grao_logs_the_weighted_terms_and_weight_one_is_grao_loss(batch, exploration):
    got, got_grads, terms = run(GRAO(BETA, LAM, exploration=exploration, backend="torch"), batch, SPLIT)
    assert float(got) == pytest.approx(-sum(terms.values()), rel=1e-5, abs=1e-6)
    ref = reference_grao(*[t.double() for t in batch[:2]], batch[3], batch[4], bias=batch[2].double())
    assert terms["objective/exploration"] == pytest.approx(exploration * float(ref["exploration"]), abs=1e-6)
    if exploration == 1.0:
        # the library's one-call grao_loss, as a benchmark plugs it in, gives the same loss, gradients and terms
        base, base_grads, base_terms = run(GRAO(BETA, LAM, "torch", fn=grao_loss), batch, SPLIT)
        assert float(got) == pytest.approx(float(base), rel=1e-5, abs=1e-7)
        assert_grads_close(got_grads, base_grads)
        assert terms == pytest.approx(base_terms, rel=1e-5, abs=1e-7)


def test_dapo_needs_the_step_token_count_for_micro_batches(batch):
    whole, _, _ = run(GRPO("dapo", backend="torch"), batch, WHOLE, counts=False)  # one batch counts its own tokens
    want, _ = oracle(grpo_formula("dapo"), batch)
    assert float(whole) == pytest.approx(float(want.detach()), rel=1e-5)
    with pytest.raises(ValueError, match="step_token_counts"):
        run(GRPO("dapo", backend="torch"), batch, SPLIT, counts=False)


def test_grpo_arguments_are_checked():
    with pytest.raises(ValueError, match="loss_type must be one of grpo, dr_grpo, dapo"):
        GRPO("ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPO("dr_grpo")
    for kw, name in [
        ({"kl_beta": -0.1}, "kl_beta"),
        ({"kl_beta": math.nan}, "kl_beta"),
        ({"clip_epsilon": 0.0}, "clip_epsilon"),
        ({"clip_epsilon": None}, "clip_epsilon"),
        ({"clip_epsilon_high": -1.0}, "clip_epsilon_high"),
    ]:
        with pytest.raises(ValueError, match=f"^{name} must be a finite number"):
            GRPO(**kw)
    assert GRPO().needs_reference_model is False  # no KL: no frozen model is loaded
    assert GRPO(kl_beta=0.01).needs_reference_model is True


def _sample_ratios(batch, clip_low, clip_high):
    """(clipped, inside) token counts of the batch's samples with a nonzero advantage: clipped where the ratio to
    sampling_logp is past the clip bound in the advantage's direction (no policy gradient), inside where in range."""
    hidden, weight, bias, targets, rewards = batch
    ratio = torch.exp(reference_logprobs(hidden, weight, targets, bias=bias) - sampling_logp(batch))
    adv = torch.cat([reference_advantages(rewards[:, :G]), torch.zeros(P, 1, dtype=torch.float64)], 1).reshape(-1, 1)
    live = (targets != -100) & (adv != 0)
    clipped = live & (((ratio < clip_low) & (adv < 0)) | ((ratio > clip_high) & (adv > 0)))
    inside = live & (ratio >= clip_low) & (ratio <= clip_high)
    return int(clipped.sum()), int(inside.sum())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_batch_has_clipped_tokens_and_the_loss_logs_their_share(batch, loss_type):
    clipped, inside = _sample_ratios(batch, 0.8, 1.2)
    assert clipped > 0 and inside > 0  # both branches of the min are exercised by the oracle comparisons
    _, _, metrics = run(GRPO(loss_type, backend="torch"), batch, SPLIT, old=True)
    sample_tokens = int(token_counts(batch[3])[:, :G].sum())
    assert metrics["grpo/clip_ratio"] == pytest.approx(clipped / sample_tokens)
    # the clipped tokens change the gradient: the ratio-1 (on-policy) gradient differs
    _, clipped_grads, _ = run(GRPO(loss_type, backend="torch"), batch, SPLIT, old=True)
    _, linear_grads, _ = run(GRPO(loss_type, backend="torch"), batch, SPLIT)
    assert rel_l2(clipped_grads[0], linear_grads[0]) > 1e-2


@pytest.mark.parametrize("kl_beta", [0.0, 0.3])
def test_grpo_snapshot_of_the_same_policy_gives_the_on_policy_gradient(batch, kl_beta):
    # num_iterations > 1, first iteration: the snapshot is the current policy, every ratio is 1 and nothing is clipped
    hidden, weight, bias, targets, rewards = batch
    loss = GRPO("dr_grpo", max_completion_length=T, kl_beta=kl_beta, backend="torch")
    h, w, b = leaves(hidden, weight, bias)
    whole = LossBatch(h, w, b, targets, rewards, group_size=G, groups=range(P), num_groups=P, temperature=0.7)
    old = loss.snapshot(whole)
    assert old.keys() == {"logp"} and not old["logp"].requires_grad
    assert_close(old["logp"], reference_logprobs(hidden, weight, targets, bias=bias, temperature=0.7), **FP32_VALUES)
    batches = [
        LossBatch(
            h[g.start * K : g.stop * K],
            w,
            b,
            targets[g.start * K : g.stop * K],
            rewards[g.start : g.stop],
            group_size=G,
            groups=g,
            num_groups=P,
            step_token_counts=token_counts(targets),
            reference_logp=frozen_logp(batch)[g.start * K : g.stop * K],
            temperature=0.7,
            old=None if old is None else {"logp": old["logp"][g.start * K : g.stop * K]},
        )
        for g in SPLIT
    ]
    outs = [loss(x) for x in batches]
    got = grads(sum(o.loss for o in outs), h, w, b)
    assert sum(o.metrics["grpo/clip_ratio"] for o in outs) == 0.0
    on_policy = [loss(dataclasses.replace(x, old=None)) for x in batches]
    assert_grads_close(got, grads(sum(o.loss for o in on_policy), h, w, b))
    # the policy term's value is TRL's, -sum_t w_t A_i (the ratios are 1), not the linear surrogate's
    assert sum(o.metrics["objective/policy"] for o in outs) != pytest.approx(
        sum(o.metrics["objective/policy"] for o in on_policy), abs=1e-4
    )


def test_grpo_needs_the_reference_and_sampling_log_probs_it_uses(batch):
    hidden, weight, bias, targets, rewards = batch
    plain = LossBatch(hidden, weight, bias, targets, rewards, group_size=G, groups=range(P), num_groups=P)
    with pytest.raises(ValueError, match="KL to the reference model: LossBatch.reference_logp is None"):
        GRPO(kl_beta=0.1, backend="torch")(plain)
    with pytest.raises(ValueError, match=r'clipped ratio: LossBatch.old\["logp"\] is None'):
        GRPO(backend="torch")(dataclasses.replace(plain, old={"values": targets.float()}))
    with pytest.raises(ValueError, match=r'old\["logp"\] shape \(12, 6\) does not match targets \(12, 7\)'):
        GRPO(backend="torch")(dataclasses.replace(plain, old={"logp": torch.zeros(P * K, T - 1)}))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("grpo.kl_beta", -0.5, r"'grpo.kl_beta' must be a finite number in \[0, 1000\]"),
        ("num_iterations", 0, "'num_iterations' must be >= 1"),
        ("clip_epsilon", 0.0, r"'clip_epsilon' must be a finite number in \(0, 1\]"),
        ("clip_epsilon", 1.5, r"'clip_epsilon' must be a finite number in \(0, 1\]"),
        ("clip_epsilon_high", 0.0, r"'clip_epsilon_high' must be a finite number in \(0, 1000\]"),
        ("logprob_temperature", "0.7", "'logprob_temperature' must be one of 1, sampling"),
    ],
)
def test_grpo_and_temperature_keys_are_validated(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{key: value})
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config.load(overrides={key: str(value)})


def test_grpo_keys_reach_the_loss_and_resume_may_not_change_them():
    cfg = TrainConfig(method="grpo", grpo_kl_beta=0.04, clip_epsilon=0.1, clip_epsilon_high=0.28, num_iterations=2)
    loss = from_config(cfg)
    assert (loss.kl_beta, loss.clip_low, loss.clip_high) == (0.04, 0.9, 1.28) and loss.needs_reference_model
    assert from_config(TrainConfig(method="grpo", clip_epsilon=0.3)).clip_high == pytest.approx(1.3)
    assert (
        config.load(overrides={"clip_epsilon_high": "none", "logprob_temperature": "sampling"}).clip_epsilon_high
        is None
    )
    for key, value in [
        ("grpo.kl_beta", 0.1),
        ("num_iterations", 3),
        ("clip_epsilon", 0.3),
        ("clip_epsilon_high", 0.3),
        ("logprob_temperature", "sampling"),
    ]:
        assert config.resume_conflicts(TrainConfig(), TrainConfig(**{key: value})) == [
            f"{key}: {config.to_dict(TrainConfig())[key]!r} -> {value!r}"
        ]


def test_lr_schedule_counts_optimizer_steps():
    # num_iterations optimizer steps per training step: the same schedule over training steps, stepped n times
    one, two = TrainConfig(steps=10, warmup_steps=3), TrainConfig(steps=10, warmup_steps=3, num_iterations=2)
    f1, f2 = lr_lambda(one), lr_lambda(two)
    # warmup over 3 x 2 optimizer steps: after 2i + 2 of them, the lr of one-step training step i
    assert [f2(2 * i + 1) for i in range(3)] == pytest.approx([f1(i) for i in range(3)])
    assert f2(0) == pytest.approx(1 / 6)  # each optimizer step of the warmup raises the lr
    assert [f2(2 * i) for i in range(3, 10)] == pytest.approx([f1(i) for i in range(3, 10)])  # the decay, likewise
    assert f2(19) < f2(18) < f2(17)  # and each one of the decay lowers it


def test_method_is_a_validated_config_key_that_resume_may_not_change():
    with pytest.raises(ConfigError, match="'method' must be one of grao, grao-no-exploration"):
        TrainConfig(method="reinforce")
    with pytest.raises(ConfigError, match="'grpo.loss_type' must be one of grpo, dr_grpo, dapo"):
        TrainConfig(grpo_loss_type="bnpo")
    assert config.resume_conflicts(TrainConfig(), TrainConfig(method="sft")) == ["method: 'grao' -> 'sft'"]
    assert config.resume_conflicts(TrainConfig(), TrainConfig(grpo_loss_type="dapo")) == [
        "grpo.loss_type: 'grpo' -> 'dapo'"
    ]
    cfg = TrainConfig(method="grao-no-imitation", beta=0.3, lam=0.2)
    loss = from_config(cfg)
    assert isinstance(loss, GRAO) and (loss.beta, loss.lam, loss.exploration) == (0.0, 0.2, 1.0)
    assert isinstance(from_config(TrainConfig()), GRAO)


# The demo, a few steps of each method (grao itself is trained in test_trainer.py).
FLAGS = {
    "steps": 2,
    "prompts_per_step": 2,
    "group_size": 2,
    "max_new_tokens": 3,
    "demo_train_size": 16,
    "eval_size": 2,
    "eval_every": 2,
    "save_every": 2,
    "warmup_steps": 1,
    "progress": False,
}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "grao"])
def test_each_method_trains_the_demo(tmp_path, method):
    cfg = TrainConfig(**FLAGS, method=method, micro_batch_prompts=1, plot=True, output_dir=str(tmp_path / "run"))
    assert Trainer(cfg).train() is True
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [ln["loss"] for ln in lines if "loss" in ln]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "run" / "plot.png").stat().st_size > 0  # the plot copes without GRAO's terms


KL_ITERATIONS = {
    "grpo_kl_beta": 0.05,
    "num_iterations": 2,
    "clip_epsilon_high": 0.28,
    "logprob_temperature": "sampling",
}


@pytest.mark.parametrize("loss_type, extra", [("dr_grpo", {}), ("dapo", {}), ("grpo", KL_ITERATIONS)])
def test_grpo_from_the_command_line(tmp_path, loss_type, extra):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**FLAGS, **extra}.items()]
    out = tmp_path / "run"
    argv = ["train", *flags, "--method", "grpo", "--grpo-loss-type", loss_type, "--plot", "false"]
    assert cli.main([*argv, "--micro-batch-prompts", "1", "--output-dir", str(out)]) == 0
    saved = config.load(out / "config.yaml")
    assert saved.grpo_loss_type == loss_type
    assert {k: getattr(saved, k) for k in extra} == extra
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(ln["loss"]) for ln in lines if "loss" in ln)
    assert all(("grpo/kl" in ln) == bool(extra) for ln in lines if "loss" in ln)


def test_dpo_starts_at_log_2_against_its_frozen_reference_which_stays_frozen(tmp_path):
    cfg = TrainConfig(**FLAGS, method="dpo", dpo_beta=0.5, lr=1e-2, plot=False, output_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg)
    frozen = {n: p.detach().clone() for n, p in trainer.reference_model.named_parameters()}
    first = trainer.train_step(1)
    # before its first update the policy is the starting model: every margin is 0 and -log sigmoid(0) = log 2
    assert first["objective/dpo"] == pytest.approx(math.log(2), rel=1e-5)
    assert first["dpo/margin"] == pytest.approx(0.0, abs=1e-5)
    second = trainer.train_step(2)
    assert second["objective/dpo"] != pytest.approx(math.log(2), rel=1e-4)  # the policy moved away from it
    for name, p in trainer.reference_model.named_parameters():
        assert torch.equal(p, frozen[name]), name
    with pytest.raises(ValueError, match="reference_logp is None"):
        DPO()(LossBatch(*[None] * 3, targets=None, rewards=None, group_size=1, groups=range(1), num_groups=1))


class RecordingGRPO(GRPO):
    """GRPO that keeps, for each micro-batch it is handed, its snapshot, its current token log-probs (at the batch's
    temperature and at 1), its reference log-probs and its temperature."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def __call__(self, batch: LossBatch):
        with torch.no_grad():
            now = fused_linear_logprobs(batch.hidden, batch.weight, batch.targets, **batch.head())
            at_one = fused_linear_logprobs(
                batch.hidden, batch.weight, batch.targets, **{**batch.head(), "temperature": 1.0}
            )
        self.calls.append((batch.old, now, at_one, batch.reference_logp, batch.temperature))
        return super().__call__(batch)


def test_grpo_iterations_see_the_sampling_policy_and_the_reference_at_the_log_prob_temperature(tmp_path):
    flags = dict(FLAGS, micro_batch_prompts=1, lr=1e-2, plot=False, output_dir=str(tmp_path / "run"))
    cfg = TrainConfig(**flags, method="grpo", grpo_kl_beta=0.1, num_iterations=2, logprob_temperature="sampling")
    loss = RecordingGRPO(kl_beta=0.1, backend="torch")
    trainer = Trainer(cfg, loss=loss)
    reference_forwards = []
    models.backbone(trainer.reference_model).register_forward_hook(lambda *_: reference_forwards.append(1))
    metrics = trainer.train_step(1)
    assert trainer.scheduler.last_epoch == 2  # two optimizer steps on the step's rollout
    assert len(loss.calls) == 4  # 2 iterations x 2 micro-batches
    assert len(reference_forwards) == 2  # the frozen model runs once per micro-batch of the rollout, not per iteration
    first, second = loss.calls[:2], loss.calls[2:]
    for (old, now, at_one, ref, temperature), (old2, now2, _, ref2, _) in zip(first, second):
        assert ref2 is ref
        assert temperature == cfg.temperature == 0.7
        # iteration 1: the snapshot and the frozen model are the policy itself, at the same temperature
        torch.testing.assert_close(old["logp"], now, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ref, now, rtol=1e-5, atol=1e-6)
        assert (at_one - now).abs().max() > 1e-2  # at temperature 1 they would be others
        # iteration 2: the same snapshot, and a policy one optimizer step further
        assert old2 is old
        assert (now2 - old["logp"]).abs().max() > 1e-3
    assert metrics["grpo/kl"] > 0  # the mean of iteration 1's 0 and iteration 2's KL to the moved policy
    assert math.isfinite(metrics["grpo/clip_ratio"]) and math.isfinite(metrics["loss"])


def test_grpo_with_kl_and_iterations_trains_and_resumes_exactly(tmp_path):
    kw = dict(FLAGS, steps=4, save_every=2, micro_batch_prompts=1, lr=1e-2, plot=False)
    grpo = dict(method="grpo", grpo_kl_beta=0.1, num_iterations=2, grpo_loss_type="dapo")
    full = Trainer(TrainConfig(**kw, **grpo, output_dir=str(tmp_path / "a")))
    frozen = {n: p.detach().clone() for n, p in full.reference_model.named_parameters()}
    assert full.train() is True
    assert full.scheduler.last_epoch == 8
    for name, p in full.reference_model.named_parameters():
        assert torch.equal(p, frozen[name]), name

    def stop_after_3(trainer, step, metrics):
        if step == 3:
            trainer.request_stop()

    cfg = TrainConfig(**kw, **grpo, output_dir=str(tmp_path / "b"))
    assert Trainer(cfg, callbacks=[stop_after_3]).train() is False
    # resume from step 2, as if the process died during step 3: its rollout and both iterations are redone
    (tmp_path / "b" / "checkpoints" / "step-000003").rename(tmp_path / "b" / "checkpoints" / "x")
    second = Trainer(cfg, resume=True)
    assert second.step == 2 and second.scheduler.last_epoch == 4
    assert second.train() is True

    a = assert_same_run(tmp_path / "a", tmp_path / "b", (full.model, second.model))
    assert [ln["step"] for ln in a] == [0, 1, 2, 2, 3, 4, 4]
    assert all(math.isfinite(ln["grpo/kl"]) and math.isfinite(ln["loss"]) for ln in a if "loss" in ln)


def test_truncated_importance_weights_change_the_loss_and_some_reach_the_cap(batch):
    """The -is cases above would pass with the correction ignored if the weights were all 1 or never capped."""
    hidden, weight, bias, targets, rewards = batch
    lb = LossBatch(
        hidden,
        weight,
        bias,
        targets,
        rewards,
        group_size=G,
        groups=range(P),
        num_groups=P,
        old={"logp": sampling_logp(batch)},
        sampling_logp=engine_logp(batch),
    )
    from grao.losses.base import truncated_importance_weights

    w = truncated_importance_weights(lb, 1.1)[targets != -100]
    assert (w == 1.1).any() and (w < 0.95).any()
    with_is, _, _ = run(CASES["grpo-clipped-is"][0], batch, WHOLE, old=True, engine=True)
    without, _, _ = run(CASES["grpo-clipped"][0], batch, WHOLE, old=True, engine=True)
    assert abs(float(with_is) - float(without)) > 1e-4
