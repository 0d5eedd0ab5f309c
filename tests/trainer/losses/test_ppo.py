"""PPO (grao.losses.ppo) against the float64 per-sequence oracle ``reference_ppo``, its GAE by hand, and in the trainer."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from utils import assert_close, assert_grads_close, assert_same_run, grads, leaves, make_batch, read_lines, small

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from oracles import reference_ppo  # noqa: E402

from grao.config import ConfigError, TrainConfig  # noqa: E402
from grao.losses import LossBatch, from_config  # noqa: E402
from grao.losses.ppo import PPO, gae, whiten_groups  # noqa: E402
from grao.train.trainer import Trainer  # noqa: E402
from grao_kernels.testing import reference_logprobs  # noqa: E402

P, G, T, H, V = 3, 3, 7, 8, 37  # V not a power of two; make_batch pads, ignores prompts, empties one row, ties a group
K = G + 1
WHOLE = [range(0, P)]
SPLIT = [range(0, 1), range(1, P)]
SAMPLES = torch.arange(P * K) % K != G  # the rows PPO trains on; each group's reference answer is last
HYPER = dict(kl_coef=0.3, gamma=0.9, lam=0.8, clip_epsilon=0.2, vf_clip=0.15, vf_coef=0.4)


def make_case(drift: float, **head):
    """A batch, a PPO loss on it, and the rollout's snapshot: the policy's log-probs and values moved by ``drift``
    (noise) from the current ones, so with drift > 0 some ratios and values fall outside their clip ranges."""
    hidden, weight, bias, targets, rewards = make_batch(P, G, T, H, V, bias=True, dtype=torch.float32)
    loss = PPO(H, **HYPER, seed=3, backend="torch")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        logp = reference_logprobs(hidden, weight, targets, bias=bias, **head)
        values = loss.values(hidden)
        old = {
            "logp": logp + drift * torch.randn(logp.shape, generator=gen),
            "values": values + drift * torch.randn(values.shape, generator=gen),
        }
        frozen = weight + 0.3 * torch.randn(weight.shape, generator=gen)
        ref_logp = reference_logprobs(hidden, frozen, targets, bias=bias, **head)
    return (hidden, weight, bias, targets, rewards), loss, old, ref_logp


def run(loss, batch, old, ref_logp, splits, **head):
    """The step's loss (micro-batch shares summed), its gradients w.r.t. hidden, weight, bias and the value head's
    weight and bias, and the summed metrics."""
    hidden, weight, bias, targets, rewards = batch
    h, w, b = leaves(hidden, weight, bias)
    counts = (targets != -100).sum(1).view(P, K)
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
                step_token_counts=counts,
                reference_logp=ref_logp[rows],
                old={k: v[rows] for k, v in old.items()},
                **head,
            )
        )
        total = total + out.loss
        for key, value in out.metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value
    vh = loss.value_head
    return total.detach(), grads(total, h, w, b, vh.weight, vh.bias), metrics


def oracle(loss, batch, old, ref_logp, hyper=HYPER, **kw):
    """reference_ppo on the G samples of each group in float64, with its gradients (hidden's scattered back to all
    rows: the reference answers' rows get 0); ``kw``: its other arguments (the head, importance sampling)."""
    hidden, weight, bias, targets, rewards = batch
    h, w, b, vw, vb = leaves(
        hidden[SAMPLES], weight, bias, loss.value_head.weight, loss.value_head.bias, dtype=torch.float64
    )
    out = reference_ppo(
        h,
        w,
        targets[SAMPLES],
        rewards[:, :G],
        vw,
        vb,
        old["logp"][SAMPLES].double(),
        old["values"][SAMPLES].double(),
        ref_logp[SAMPLES].double(),
        bias=b,
        **hyper,
        **kw,
    )
    gh, gw, gb, gvw, gvb = grads(out["loss"], h, w, b, vw, vb)
    full = torch.zeros(hidden.shape, dtype=torch.float64)
    full[SAMPLES] = gh
    return out, [full, gw, gb, gvw, gvb]


NAMES = ("hidden", "weight", "bias", "value weight", "value bias")


@pytest.mark.parametrize("splits", [WHOLE, SPLIT], ids=["one-batch", "micro-batches"])
@pytest.mark.parametrize("drift", [0.0, 0.6], ids=["ratio-1", "clipped"])
def test_ppo_loss_and_gradients_match_the_float64_oracle(splits, drift):
    batch, loss, old, ref_logp = make_case(drift)
    want, want_grads = oracle(loss, batch, old, ref_logp)
    got, got_grads, metrics = run(loss, batch, old, ref_logp, splits)
    assert_close(got, want["loss"], rtol=1e-5, atol=1e-6, name="ppo loss")
    assert_grads_close(got_grads, want_grads, NAMES)
    assert metrics["objective/policy"] == pytest.approx(float(want["policy"].detach()), rel=1e-5, abs=1e-6)
    assert metrics["objective/value"] == pytest.approx(float(want["value"].detach()), rel=1e-5, abs=1e-6)
    assert metrics["ppo/clip_frac"] == pytest.approx(want["clip_frac"], abs=1e-9)
    for g in want_grads:
        assert float(g.abs().sum()) > 0  # every input gets signal: a missing term would not pass unnoticed
    if drift == 0:
        assert metrics["ppo/clip_frac"] == 0 and metrics["ppo/value_clip_frac"] == 0
    else:
        # some but not all tokens clipped, and clipping changes the loss: dropping it would not pass
        assert 0 < want["clip_frac"] < 1 and 0 < metrics["ppo/value_clip_frac"] < 1
        unclipped, _ = oracle(loss, batch, old, ref_logp, {**HYPER, "clip_epsilon": 1e9, "vf_clip": 1e9})
        assert abs(float(unclipped["loss"].detach()) - float(want["loss"].detach())) > 1e-3


def test_ppo_uses_the_model_logit_head():
    head = {"logit_scale": 0.5, "softcap": 3.0}
    batch, loss, old, ref_logp = make_case(0.6, **head)
    want, want_grads = oracle(loss, batch, old, ref_logp, **head)
    got, got_grads, _ = run(loss, batch, old, ref_logp, SPLIT, **head)
    assert_close(got, want["loss"], rtol=1e-5, atol=1e-6, name="ppo loss")
    assert_grads_close(got_grads, want_grads, NAMES)
    plain, _ = oracle(loss, batch, old, ref_logp)
    assert abs(float(plain["loss"].detach()) - float(want["loss"].detach())) > 1e-3


def test_ppo_advantages_and_returns_match_the_oracle():
    batch, loss, old, ref_logp = make_case(0.6)
    hidden, weight, bias, targets, rewards = batch
    want, _ = oracle(loss, batch, old, ref_logp)
    lb = LossBatch(
        hidden, weight, bias, targets, rewards, group_size=G, groups=range(P), num_groups=P,
        reference_logp=ref_logp, old=old,
    )  # fmt: skip
    adv, returns, _ = loss.advantages(lb)
    assert_close(adv[SAMPLES], want["advantages"], rtol=1e-9, atol=1e-9, name="advantages")
    assert_close(returns[SAMPLES], want["returns"], rtol=1e-9, atol=1e-9, name="returns")
    assert float(adv[~SAMPLES].abs().sum()) == 0 and float(returns[~SAMPLES].abs().sum()) == 0


def test_gae_by_hand():
    # gamma 0.9, lam 0.5 (gamma lam = 0.45); positions off the mask (9s, 5, 7) must not count
    rewards = torch.tensor([[5.0, 0.1, -0.2, 1.0, 7.0], [0.0, 2.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[9.0, 0.5, 0.2, 0.4, 9.0], [1.0, 1.0, 9.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    # row 0: d3 = 1 - 0.4 = 0.6; d2 = -0.2 + 0.9 * 0.4 - 0.2 = -0.04; d1 = 0.1 + 0.9 * 0.2 - 0.5 = -0.22
    #        A3 = 0.6, A2 = -0.04 + 0.45 * 0.6 = 0.23, A1 = -0.22 + 0.45 * 0.23 = -0.1165
    # row 1: d1 = 2 - 1 = 1; d0 = 0 + 0.9 * 1 - 1 = -0.1; A1 = 1, A0 = -0.1 + 0.45 * 1 = 0.35
    want = torch.tensor([[0.0, -0.1165, 0.23, 0.6, 0.0], [0.35, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(gae(rewards, values, mask, 0.9, 0.5), want, rtol=0, atol=1e-12)
    # gamma = lam = 1: the advantage is the return to go minus the value (Monte Carlo)
    togo = torch.where(mask, rewards, 0.0).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(gae(rewards, values, mask, 1.0, 1.0), torch.where(mask, togo - values, 0.0))
    with pytest.raises(ValueError, match="one shape"):
        gae(rewards, values[:, :3], mask, 0.9, 0.5)


def test_whitening_is_within_each_group():
    adv = torch.tensor([[1.0, 2.0], [3.0, 99.0], [5.0, 5.0], [7.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    got = whiten_groups(adv, mask, 2)
    # group 0: tokens 1, 2, 3 -> mean 2, population var 2/3; group 1: tokens 5, 5 -> var 0, all 0
    s = math.sqrt(2 / 3 + 1e-8)
    want = torch.tensor([[-1 / s, 0.0], [1 / s, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(got, want)


def test_ppo_checks_its_inputs():
    with pytest.raises(ValueError, match="hidden_size"):
        PPO(0)
    with pytest.raises(ValueError, match="gamma"):
        PPO(4, gamma=1.5)
    with pytest.raises(ValueError, match="clip_epsilon"):
        PPO(4, clip_epsilon=0.0)
    batch, loss, old, ref_logp = make_case(0.0)
    hidden, weight, bias, targets, rewards = batch
    kw = dict(group_size=G, groups=range(P), num_groups=P)
    with pytest.raises(ValueError, match="reference_logp is None"):
        loss(LossBatch(hidden, weight, bias, targets, rewards, **kw, old=old))
    with pytest.raises(ValueError, match="LossBatch.old"):
        loss(LossBatch(hidden, weight, bias, targets, rewards, **kw, reference_logp=ref_logp, old={"logp": ref_logp}))
    # Without a snapshot (one update per rollout) the policy that sampled is the batch's own, detached.
    own = LossBatch(hidden, weight, bias, targets, rewards, **kw, reference_logp=ref_logp)
    with torch.no_grad():
        snap = loss.snapshot(own)
    torch.testing.assert_close(loss(own).loss, loss(dataclasses.replace(own, old=snap)).loss)
    with pytest.raises(ValueError, match=r"old values shape \(12, 6\)"):
        bad = {**old, "values": old["values"][:, :-1]}
        loss(LossBatch(hidden, weight, bias, targets, rewards, **kw, reference_logp=ref_logp, old=bad))


def test_ppo_config_keys_are_validated_and_build_the_loss():
    for key, value in [("ppo.gamma", 1.5), ("ppo.gae_lambda", -0.1), ("clip_epsilon", 0.0), ("ppo.vf_clip", 0.0)]:
        with pytest.raises(ConfigError, match=f"'{key}' must be"):
            TrainConfig(**{key: value})
    cfg = TrainConfig(method="ppo", ppo_kl_coef=0.2, ppo_gamma=0.99, clip_epsilon=0.1, ppo_vf_coef=0.5, seed=4)
    loss = from_config(cfg, hidden_size=H)
    assert isinstance(loss, PPO) and loss.value_head.weight.shape == (1, H)
    assert (loss.kl_coef, loss.gamma, loss.lam, loss.clip_epsilon, loss.vf_clip, loss.vf_coef) == (
        0.2,
        0.99,
        0.95,
        0.1,
        0.2,
        0.5,
    )
    assert torch.equal(from_config(cfg, hidden_size=H).value_head.weight, loss.value_head.weight)  # seeded
    with pytest.raises(ValueError, match="hidden_size"):
        from_config(cfg)


# The trainer on the demo (the tiny MoE).


def test_ppo_trains_the_demo_with_its_value_head(tmp_path):
    cfg = small(tmp_path, method="ppo", micro_batch_prompts=1, steps=2)
    trainer = Trainer(cfg)
    head = trainer.loss.value_head
    assert head.weight.device.type == trainer.runtime.device.type and head.weight.dtype == torch.float32
    assert any(p is head.weight for p in trainer.optimizer.param_groups[0]["params"])
    model_params = sum(p.numel() for p in trainer.model.parameters())
    assert trainer.trainable_params == trainer.total_params == model_params + head.weight.numel() + 1  # counted
    start = head.weight.detach().clone()
    assert trainer.train() is True
    assert not torch.equal(head.weight, start)  # the value head trains
    lines = [ln for ln in read_lines(tmp_path / "run") if "loss" in ln]
    assert len(lines) == 2
    for ln in lines:
        assert all(math.isfinite(ln[k]) for k in ("loss", "objective/policy", "objective/value", "ppo/kl"))
        assert len(ln["moe/expert_load"]) == trainer.moe.num_experts  # the router's load is still logged
        assert ln["ppo/clip_frac"] == 0  # one update per rollout: the ratio is 1
    # before the first update the policy is the frozen reference model: no KL yet
    assert lines[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-6)
    assert lines[1]["ppo/kl"] != pytest.approx(0.0, abs=1e-7)


def test_resumed_ppo_run_matches_an_uninterrupted_one(tmp_path):
    kw = dict(method="ppo", steps=4, save_every=4, eval_every=2)
    full = Trainer(small(tmp_path / "a", **kw))
    assert full.train() is True

    def stop(trainer, step, metrics):
        if step == 2:
            trainer.request_stop()

    cfg = small(tmp_path / "b", **kw)
    assert Trainer(cfg, callbacks=[stop]).train() is False
    second = Trainer(cfg, resume=True)
    assert second.step == 2
    fresh = from_config(cfg, hidden_size=second.loss.value_head.in_features)
    assert not torch.equal(second.loss.value_head.weight.cpu(), fresh.value_head.weight)  # restored, not re-initialised
    assert second.train() is True
    runs = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert_same_run(*runs, (full.model, second.model), (full.loss, second.loss))  # the loss: the value head
    state = torch.load(tmp_path / "b" / "run" / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=False)
    assert set(state["loss"]) == {"value_head.weight", "value_head.bias"}


def test_ppo_with_several_iterations_clips_against_the_rollout_snapshot(tmp_path):
    """With num_iterations > 1 the later updates see the snapshot of the policy that sampled: ratios move off 1."""
    cfg = small(tmp_path, method="ppo", steps=1, num_iterations=3, clip_epsilon=0.01, ppo_vf_clip=0.01)
    trainer = Trainer(cfg)
    seen = []
    loss = trainer.loss
    forward = loss.forward

    def spy(batch):
        seen.append(batch.old)
        return forward(batch)

    loss.forward = spy
    assert trainer.train() is True
    assert len(seen) == 3 and all(old is not None for old in seen)
    assert all(old is seen[0] for old in seen)  # one snapshot, reused by every iteration
    (line,) = [ln for ln in read_lines(tmp_path / "run") if "loss" in ln]
    assert line["ppo/clip_frac"] > 0  # the second and third updates are off-policy and clip
    assert line["ppo/value_clip_frac"] > 0


def test_ppo_truncated_importance_sampling_matches_the_float64_oracle():
    """With an inference engine's log-probs of the sampled tokens, the clipped policy loss of each token is weighted
    by min(exp(old - engine), cap); some weights reach the cap and some fall below 1, so ignoring them fails."""
    batch, _, old, ref_logp = make_case(0.6)
    cap = 1.2
    loss = PPO(H, **HYPER, seed=3, importance_sampling_cap=cap, backend="torch")
    hidden, weight, bias, targets, rewards = batch
    gen = torch.Generator().manual_seed(11)
    engine = torch.where(SAMPLES[:, None], old["logp"] + 0.3 * torch.randn(old["logp"].shape, generator=gen), 0.0)
    weights = torch.exp(old["logp"] - engine).clamp(max=cap)[SAMPLES][targets[SAMPLES] != -100]
    assert (weights == cap).any() and (weights < 0.9).any()
    h, w, b = leaves(hidden, weight, bias)
    out = loss(
        LossBatch(
            h,
            w,
            b,
            targets,
            rewards,
            group_size=G,
            groups=range(P),
            num_groups=P,
            reference_logp=ref_logp,
            old=old,
            sampling_logp=engine,
        )
    )
    vh = loss.value_head
    got_grads = grads(out.loss, h, w, b, vh.weight, vh.bias)
    want, want_grads = oracle(
        loss, batch, old, ref_logp, sampling_logp=engine[SAMPLES].double(), importance_sampling_cap=cap
    )
    assert_close(out.loss.detach(), want["loss"], rtol=1e-5, atol=1e-6, name="ppo loss with IS")
    assert_grads_close(got_grads, want_grads, NAMES)
    plain, _ = oracle(loss, batch, old, ref_logp)
    assert abs(float(plain["loss"].detach()) - float(want["loss"].detach())) > 1e-4
