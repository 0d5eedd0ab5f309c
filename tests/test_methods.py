"""The training methods (grao.methods) against float64 references that materialise the logits, and in the trainer."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from utils import assert_close, assert_grads_close, grads, leaves, make_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from grao import cli, config  # noqa: E402
from grao.config import ConfigError, TrainConfig  # noqa: E402
from grao.losses import GRAO, LossBatch  # noqa: E402
from grao.methods import DPO, GRPO, METHODS, SFT, GRAOTerms, from_config  # noqa: E402
from grao.trainer import Trainer  # noqa: E402
from grao_kernels.reference import (  # noqa: E402
    reference_dpo,
    reference_grao,
    reference_grpo,
    reference_logprobs,
    reference_sft,
)

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


def run(loss, batch, splits, *, counts=True, **head):
    """The step's loss (the micro-batches' shares summed) and its gradients w.r.t. hidden, weight, bias;
    ``head``: the LossBatch's logit_scale / softcap."""
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


def grpo_formula(loss_type):
    def formula(h, w, b, targets, rewards, **head):
        samples = torch.arange(P * K) % K != G  # GRPO's groups hold the G samples only
        return reference_grpo(
            h[samples],
            w,
            targets[samples],
            rewards[:, :G],
            bias=b,
            loss_type=loss_type,
            max_completion_length=T,
            **head,
        )

    return formula


def dpo_formula(h, w, b, targets, rewards, **head):
    frozen = frozen_logp((h, w, b, targets, rewards))
    return reference_dpo(h, w, targets, rewards, frozen, beta=0.7, bias=b, **head)


CASES = {
    "grao-no-exploration": (GRAOTerms(BETA, LAM, exploration=0.0, backend="torch"), grao_without("exploration")),
    "grao-no-imitation": (GRAOTerms(0.0, LAM, backend="torch"), grao_without("imitation")),
    "grao-no-alignment": (GRAOTerms(BETA, 0.0, backend="torch"), grao_without("alignment")),
    "grao-exploration-0.3": (
        GRAOTerms(BETA, LAM, exploration=0.3, backend="torch"),
        grao_without(exploration=0.3),
    ),
    "sft": (SFT("torch"), sft_formula),
    "grpo": (GRPO("grpo", backend="torch"), grpo_formula("grpo")),
    "dr_grpo": (GRPO("dr_grpo", max_completion_length=T, backend="torch"), grpo_formula("dr_grpo")),
    "dapo": (GRPO("dapo", backend="torch"), grpo_formula("dapo")),
    "dpo": (DPO(0.7, backend="torch"), dpo_formula),
}


@pytest.mark.parametrize("splits", [WHOLE, SPLIT], ids=["one-batch", "micro-batches"])
@pytest.mark.parametrize("name", list(CASES))
def test_method_loss_and_gradients_match_the_float64_formula(batch, name, splits):
    loss, formula = CASES[name]
    want, want_grads = oracle(formula, batch)
    got, got_grads, _ = run(loss, batch, splits)
    assert_close(got, want, rtol=1e-5, atol=1e-6, name=f"{name} loss")
    assert_grads_close(got_grads, want_grads)
    assert float(want_grads[0].abs().sum()) > 0  # the batch has signal: a zero gradient would not pass unnoticed


@pytest.mark.parametrize("name", list(CASES))
def test_methods_use_the_model_logit_head(batch, name):
    # a Granite-like scale and a Gemma-like soft cap on the logits, through the LossBatch
    head = {"logit_scale": 0.5, "softcap": 3.0}
    loss, formula = CASES[name]
    want, want_grads = oracle(formula, batch, **head)
    got, got_grads, _ = run(loss, batch, SPLIT, **head)
    assert_close(got, want, rtol=1e-5, atol=1e-6, name=f"{name} loss")
    assert_grads_close(got_grads, want_grads)
    plain, _ = oracle(formula, batch)
    assert abs(float(plain) - float(want)) > 1e-3  # the head changes the loss: ignoring it would not pass


@pytest.mark.parametrize("exploration", [0.0, 1.0])
def test_grao_terms_log_the_weighted_terms_and_weight_one_is_grao(batch, exploration):
    got, got_grads, terms = run(GRAOTerms(BETA, LAM, exploration=exploration, backend="torch"), batch, SPLIT)
    assert float(got) == pytest.approx(-sum(terms.values()), rel=1e-5, abs=1e-6)
    ref = reference_grao(*[t.double() for t in batch[:2]], batch[3], batch[4], bias=batch[2].double())
    assert terms["objective/exploration"] == pytest.approx(exploration * float(ref["exploration"]), abs=1e-6)
    if exploration == 1.0:
        base, base_grads, base_terms = run(GRAO(BETA, LAM, backend="torch"), batch, SPLIT)
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


def test_method_is_a_validated_config_key_that_resume_may_not_change():
    with pytest.raises(ConfigError, match="'method' must be one of grao, grao-no-exploration"):
        TrainConfig(method="reinforce")
    with pytest.raises(ConfigError, match="'grpo_loss_type' must be one of grpo, dr_grpo, dapo"):
        TrainConfig(grpo_loss_type="bnpo")
    assert config.resume_conflicts(TrainConfig(), TrainConfig(method="sft")) == ["method: 'grao' -> 'sft'"]
    assert config.resume_conflicts(TrainConfig(), TrainConfig(grpo_loss_type="dapo")) == [
        "grpo_loss_type: 'grpo' -> 'dapo'"
    ]
    cfg = TrainConfig(method="grao-no-imitation", beta=0.3, lam=0.2)
    loss = from_config(cfg)
    assert isinstance(loss, GRAOTerms) and (loss.beta, loss.lam, loss.exploration) == (0.0, 0.2, 1.0)
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


@pytest.mark.parametrize("loss_type", ["dr_grpo", "dapo"])
def test_grpo_from_the_command_line(tmp_path, loss_type):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    out = tmp_path / "run"
    argv = ["train", *flags, "--method", "grpo", "--grpo-loss-type", loss_type, "--plot", "false"]
    assert cli.main([*argv, "--micro-batch-prompts", "1", "--output-dir", str(out)]) == 0
    assert config.load(out / "config.yaml").grpo_loss_type == loss_type
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(ln["loss"]) for ln in lines if "loss" in ln)


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
