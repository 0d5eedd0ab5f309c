"""verl's own registries, fed a rollout batch with the reference answers injected, shuffled and split into
micro-batches, reproduce grao_loss's loss and gradients (and the float64 oracle's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from utils import FP32_GRAD_REL_L2, rel_l2

pytest.importorskip("verl")
pytest.importorskip("verl.trainer.ppo.core_algos")

from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

from grao_kernels import grao_loss  # noqa: E402
from grao_kernels.integrations import verl as grao_verl  # noqa: E402
from grao_kernels.testing import reference_grao  # noqa: E402

PAD = 0


def rollout_batch(group_sizes, P_len=5, R=7, V=50):
    """A rollout DataProto as verl's generation returns it: left-padded prompts, right-padded responses, uids."""
    rows, uids = [], []
    for g, size in enumerate(group_sizes):
        prompt_len = 2 + g % 3
        prompt = torch.randint(1, V, (prompt_len,))
        for _ in range(size):
            rows.append((prompt, torch.randint(1, V, (int(torch.randint(1, R + 1, ())),))))
            uids.append(f"uid-{g}")
    bs = len(rows)
    prompts = torch.full((bs, P_len), PAD)
    responses = torch.full((bs, R), PAD)
    attention = torch.zeros((bs, P_len + R), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        prompts[i, P_len - len(p) :] = p
        responses[i, : len(r)] = r
        attention[i, P_len - len(p) : P_len] = 1
        attention[i, P_len : P_len + len(r)] = 1
    position = torch.clip(torch.cumsum(attention, -1) - 1, min=0)
    tensors = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention,
        "position_ids": position,
    }
    non_tensors = {"uid": np.array(uids, dtype=object), "ground_truth": np.array([f"gt-{u}" for u in uids])}
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


def test_add_reference_responses_appends_one_row_per_group():
    batch = rollout_batch([3, 2])
    refs = {"uid-0": [4, 5, 6], "uid-1": list(range(1, 20))}  # the second is longer than R: cut
    out = grao_verl.add_reference_responses(batch, refs, pad_token_id=PAD)
    assert len(out) == 7
    assert list(out.non_tensor_batch["uid"][5:]) == [grao_verl.reference_uid("uid-0"), grao_verl.reference_uid("uid-1")]
    assert list(out.non_tensor_batch["ground_truth"][5:]) == ["gt-uid-0", "gt-uid-1"]  # scored like its group
    R = batch.batch["responses"].shape[1]
    assert out.batch["responses"][5, :3].tolist() == [4, 5, 6] and (out.batch["responses"][5, 3:] == PAD).all()
    assert out.batch["responses"][6].tolist() == list(range(1, R + 1))
    assert torch.equal(out.batch["prompts"][5], batch.batch["prompts"][0])
    assert torch.equal(out.batch["input_ids"][5], torch.cat([out.batch["prompts"][5], out.batch["responses"][5]]))
    P = batch.batch["prompts"].shape[1]
    assert out.batch["attention_mask"][5, P:].tolist() == [1, 1, 1] + [0] * (R - 3)
    # positions continue from the prompt's last one, as verl's rollout writes them
    assert out.batch["position_ids"][5, P] == out.batch["position_ids"][5, P - 1] + 1
    group_ids, is_ref = grao_verl.groups_from_uids(out.non_tensor_batch["uid"])
    assert group_ids.tolist() == [0, 0, 0, 1, 1, 0, 1] and is_ref.tolist() == [False] * 5 + [True, True]


def test_add_reference_responses_bad_input():
    batch = rollout_batch([2, 2])
    with pytest.raises(ValueError, match="uid-1"):
        grao_verl.add_reference_responses(batch, {"uid-0": [1]}, pad_token_id=PAD)
    out = grao_verl.add_reference_responses(batch, {"uid-0": [1], "uid-1": [2]}, pad_token_id=PAD)
    with pytest.raises(ValueError, match="already holds reference rows"):
        grao_verl.add_reference_responses(out, {"uid-0": [1], "uid-1": [2]}, pad_token_id=PAD)


def test_estimator_needs_one_reference_per_group():
    rewards = torch.zeros(3, 4)
    mask = torch.ones(3, 4)
    fn = core_algos.get_adv_estimator_fn("grao")
    with pytest.raises(ValueError, match="exactly one reference"):
        fn(token_level_rewards=rewards, response_mask=mask, index=np.array(["a", "a", "b"], dtype=object))


@pytest.mark.parametrize("beta,lam", [(0.5, 0.6), (1.5, 0.0)])
def test_registered_grao_reproduces_grao_loss_over_shuffled_micro_batches(beta, lam):
    H, V = 16, 50
    batch = rollout_batch([4, 3, 5], V=V)
    refs = {f"uid-{g}": torch.randint(1, V, (n,)).tolist() for g, n in enumerate([3, 9, 1])}
    data = grao_verl.add_reference_responses(batch, refs, pad_token_id=PAD)
    S, R = data.batch["responses"].shape
    data.batch["response_mask"] = data.batch["attention_mask"][:, -R:]
    # Outcome reward on the last response token, as verl's reward managers write it.
    rewards = torch.randn(S)
    rewards[-2] = rewards[4]  # ties are fine
    last = data.batch["response_mask"].sum(1) - 1
    token_level = torch.zeros(S, R)
    token_level[torch.arange(S), last] = rewards
    data.batch["token_level_rewards"] = token_level
    data.batch["row"] = torch.arange(S)

    # The call verl's compute_advantage makes for a registered estimator.
    config = {"grao_beta": beta, "grao_lam": lam}
    adv, returns = core_algos.get_adv_estimator_fn("grao")(
        token_level_rewards=data.batch["token_level_rewards"],
        response_mask=data.batch["response_mask"],
        config=config,
        index=data.non_tensor_batch["uid"],
    )
    data.batch["advantages"], data.batch["returns"] = adv, returns

    hidden = torch.randn(S, R, H, requires_grad=True)  # hidden[:, t] predicts responses[:, t]
    weight = (torch.randn(V, H) / H**0.5).requires_grad_(True)
    data = data.select_idxs(torch.randperm(S))  # verl shuffles / balances rows across ranks
    policy_loss = core_algos.get_policy_loss_fn("grao")
    total = 0.0
    for mb in data.split(8):  # two micro-batches of 8 and 7 rows: groups are split between them
        h = hidden[mb.batch["row"]]
        logp_all = (h @ weight.T).log_softmax(-1)
        log_prob = logp_all.gather(-1, mb.batch["responses"][..., None])[..., 0]
        loss, metrics = policy_loss(
            old_log_prob=log_prob.detach(),
            log_prob=log_prob,
            advantages=mb.batch["advantages"],
            response_mask=mb.batch["response_mask"],
            loss_agg_mode="token-mean",
            config=None,
        )
        assert metrics["actor/ppo_kl"] == 0.0
        loss.backward()
        total = total + loss.detach()

    batch_uids = data.non_tensor_batch["uid"]
    group_ids, is_ref = grao_verl.groups_from_uids(batch_uids)
    order = data.batch["row"]
    targets = torch.where(data.batch["response_mask"].bool(), data.batch["responses"], -100)
    h_, w_ = hidden.detach()[order].requires_grad_(True), weight.detach().clone().requires_grad_(True)
    ours = grao_loss(
        h_,
        w_,
        targets,
        rewards[order],
        group_ids=group_ids,
        is_reference=is_ref,
        beta=beta,
        lam=lam,
        backend="torch",
    )
    ours.loss.backward()
    h64, w64 = hidden.detach()[order].double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    oracle = reference_grao(
        h64, w64, targets, rewards[order].double(), group_ids=group_ids, is_reference=is_ref, beta=beta, lam=lam
    )
    oracle["loss"].backward()
    assert len(batch_uids) == S
    torch.testing.assert_close(total, ours.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.double(), oracle["loss"].detach(), rtol=1e-5, atol=1e-6)
    assert rel_l2(weight.grad, w64.grad) < FP32_GRAD_REL_L2
    assert rel_l2(weight.grad, w_.grad) < FP32_GRAD_REL_L2
    assert rel_l2(hidden.grad[order], h64.grad) < FP32_GRAD_REL_L2
    assert rel_l2(hidden.grad[order], h_.grad) < FP32_GRAD_REL_L2


def test_policy_loss_scales_by_data_parallel_size():
    class Config:
        global_batch_info = {"dp_size": 4}

    log_prob = torch.randn(2, 3, requires_grad=True)
    adv, mask = torch.randn(2, 3), torch.tensor([[1, 1, 0], [1, 0, 0]])
    fn = core_algos.get_policy_loss_fn("grao")
    one, _ = fn(log_prob.detach(), log_prob, adv, mask, "token-mean", None)
    four, _ = fn(log_prob.detach(), log_prob, adv, mask, "token-mean", Config())
    torch.testing.assert_close(four, 4 * one)
    torch.testing.assert_close(one, -(adv * log_prob * mask).sum())
