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
from verl.trainer.config import AlgoConfig  # noqa: E402
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
    batch.batch["rm_scores"] = torch.ones(batch.batch["responses"].shape)  # scored during generation
    with pytest.raises(ValueError, match="already holds \\['rm_scores'\\].*score them"):
        grao_verl.add_reference_responses(batch, {"uid-0": [1], "uid-1": [2]}, pad_token_id=PAD)


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


def test_estimator_errors_name_the_uid_and_the_missing_config():
    fn = core_algos.get_adv_estimator_fn("grao")
    rewards, mask = torch.zeros(4, 3), torch.ones(4, 3)
    uids = np.array(["a", "a", grao_verl.reference_uid("a"), "b"], dtype=object)
    with pytest.raises(ValueError, match="uid 'b' has 0 reference rows"):
        fn(token_level_rewards=rewards, response_mask=mask, index=uids, config=None)
    only_ref = np.array(["a", grao_verl.reference_uid("a"), grao_verl.reference_uid("b"), "a"], dtype=object)
    with pytest.raises(ValueError, match="uid 'b' has 1 reference rows .* and 0 responses"):
        fn(token_level_rewards=rewards, response_mask=mask, index=only_ref, config=None)
    with pytest.raises(ValueError, match="non_tensor_batch\\['uid'\\]"):
        fn(token_level_rewards=rewards, response_mask=mask, config=None)  # verl passes no index without uids
    two_refs = np.array(["a", "a", grao_verl.reference_uid("a"), grao_verl.reference_uid("a")], dtype=object)
    with pytest.raises(ValueError, match="uid 'a' has 2 reference rows"):
        fn(token_level_rewards=rewards, response_mask=mask, index=two_refs, config=None)


def test_hyperparameters_come_from_verls_config_objects():
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    assert grao_verl.hyperparameters(None) == (0.5, 0.6)
    assert grao_verl.hyperparameters({"grao_beta": 1.5, "grao_lam": 0}) == (1.5, 0.0)
    assert grao_verl.hyperparameters(OmegaConf.create({"gamma": 1.0, "grao_beta": 2, "grao_lam": 0.25})) == (2.0, 0.25)
    # verl's hydra-to-dataclass conversion, with _target_ naming GRAOAlgoConfig: beta and lambda come along
    target = f"{grao_verl.__name__}.GRAOAlgoConfig"
    built = omega_conf_to_dataclass(
        OmegaConf.create({"_target_": target, "adv_estimator": "grao", "grao_beta": 1.25, "grao_lam": 0.1})
    )
    assert isinstance(built, AlgoConfig) and grao_verl.hyperparameters(built) == (1.25, 0.1)
    # verl's own AlgoConfig has neither: refused, not trained with the defaults
    with pytest.raises(ValueError, match="no grao_beta"):
        grao_verl.hyperparameters(AlgoConfig(adv_estimator="grao"))
    with pytest.raises(ValueError, match="no grao_lam"):
        grao_verl.hyperparameters({"grao_beta": 0.5})
    with pytest.raises(ValueError, match="grao_beta must be a finite number"):
        grao_verl.hyperparameters({"grao_beta": float("nan"), "grao_lam": 0.5})


def test_add_reference_responses_counts_what_it_cuts():
    batch = rollout_batch([2, 2, 2])
    R = batch.batch["responses"].shape[1]
    refs = {"uid-0": [1] * R, "uid-1": [2] * (R + 1), "uid-2": [3] * (R + 5)}
    with pytest.warns(UserWarning, match="2 of 3 reference answers are longer than the response length 7"):
        out = grao_verl.add_reference_responses(batch, refs, pad_token_id=PAD)
    assert out.meta_info["reference/truncated"] == 2
    assert out.batch["attention_mask"][6:, -R:].sum(1).tolist() == [R, R, R]
    fits = grao_verl.add_reference_responses(batch, {u: [5] for u in refs}, pad_token_id=PAD)
    assert fits.meta_info["reference/truncated"] == 0


@pytest.fixture(scope="module")
def tokenizer():
    from grao.models import build_demo_tokenizer

    return build_demo_tokenizer()


def with_references(batch, answers):
    """The dataset's fields as verl copies them onto each row: here the reference answer inside extra_info."""
    batch.non_tensor_batch["extra_info"] = np.array(
        [{"reference": answers[int(u.split("-")[1])], "index": 0} for u in batch.non_tensor_batch["uid"]], dtype=object
    )
    return batch


def test_reference_ids_from_batch_reads_the_dataset_field(tokenizer):
    batch = with_references(rollout_batch([2, 3], V=len(tokenizer)), ["cba", "fed"])
    ids = grao_verl.reference_ids_from_batch(batch, tokenizer, "extra_info.reference")
    eos = tokenizer.eos_token_id
    assert ids == {
        f"uid-{g}": tokenizer(a, add_special_tokens=False)["input_ids"] + [eos] for g, a in enumerate(["cba", "fed"])
    }
    with pytest.raises(ValueError, match="no non_tensor_batch\\['answers'\\]"):
        grao_verl.reference_ids_from_batch(batch, tokenizer, "answers.reference")
    with pytest.raises(ValueError, match="uid 'uid-0': field 'extra_info.answer' holds NoneType"):
        grao_verl.reference_ids_from_batch(batch, tokenizer, "extra_info.answer")


def tiny_lm(vocab_size, seed=0):
    from transformers import AutoModelForCausalLM, Qwen3Config
    from utils import TINY_DECODER

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(
        Qwen3Config(**{**TINY_DECODER, "tie_word_embeddings": False}, vocab_size=vocab_size, max_position_embeddings=64)
    )


def test_recipe_in_verls_order_equals_the_oracle(tokenizer):
    """The recipe through verl's own code, in its loop's order: references added after generation from the dataset
    field, verl's compute_advantage with GRAOAlgoConfig, mini-batches of 2 prompts' rows shuffled by verl's
    iterator, each split into micro-batches scored by a tiny model with our fused forward and verl's registered
    policy loss; the accumulated loss and lm_head gradient equal the float64 GRAO oracle's."""
    n, prompts, beta, lam = 3, 4, 0.7, 0.4
    V = len(tokenizer)
    data, rewards = recipe_batch(tokenizer, n, prompts, beta, lam)
    S, R = data.batch["responses"].shape
    P = data.batch["prompts"].shape[1]

    model = grao_verl.patch_verl_model(tiny_lm(V), backend="torch")
    rows = 2 * (n + 1)  # 2 prompts' rows: no ppo_mini_batch_size x n divides 4 x (3 + 1) rows
    with pytest.raises(AssertionError, match=f"{S} % {2 * n} != 0"):  # verl's own sizing: 2 prompts x n rows
        data.make_iterator(mini_batch_size=2 * n, epochs=1)
    policy_loss = core_algos.get_policy_loss_fn("grao")
    total, seen = 0.0, 0
    for mini in data.make_iterator(mini_batch_size=rows, epochs=1, seed=0, dataloader_kwargs={"shuffle": True}):
        for micro in mini.split(3):
            out = model(
                input_ids=micro.batch["input_ids"],
                attention_mask=micro.batch["attention_mask"],
                position_ids=micro.batch["position_ids"],
                temperature=1.0,
                return_dict=True,
            )
            log_prob = out.log_probs[:, P - 1 : -1]  # position t scores token t + 1: the response's tokens
            loss, _ = policy_loss(
                old_log_prob=log_prob.detach(),
                log_prob=log_prob,
                advantages=micro.batch["advantages"],
                response_mask=micro.batch["response_mask"],
                loss_agg_mode="token-mean",
                config=None,
            )
            loss.backward()
            total, seen = total + loss.detach(), seen + len(micro)
    assert seen == S == prompts * (n + 1)
    assert_equals_oracle(model, data, rewards, total, beta, lam)


def recipe_batch(tokenizer, n, prompts, beta, lam):
    """A rollout of ``prompts`` x ``n`` responses through the recipe up to verl's compute_advantage: references
    from the dataset field, verl's response mask, outcome rewards on each row's last token; and those rewards."""
    from verl.trainer.ppo.ray_trainer import compute_advantage, compute_response_mask

    batch = with_references(rollout_batch([n] * prompts, V=len(tokenizer)), ["cba", "fedc", "ih", "lkjm"][:prompts])
    data = grao_verl.add_reference_responses(
        batch, grao_verl.reference_ids_from_batch(batch, tokenizer, "extra_info.reference"), pad_token_id=PAD
    )
    data.batch["response_mask"] = compute_response_mask(data)
    S, R = data.batch["responses"].shape
    rewards = torch.rand(S)
    token_level = torch.zeros(S, R)
    token_level[torch.arange(S), data.batch["response_mask"].sum(1) - 1] = rewards
    data.batch["token_level_rewards"] = token_level
    config = grao_verl.GRAOAlgoConfig(adv_estimator="grao", grao_beta=beta, grao_lam=lam)
    data = compute_advantage(data, adv_estimator=config.adv_estimator, num_repeat=n, config=config)
    return data, rewards


def assert_equals_oracle(model, data, rewards, total, beta, lam):
    """``total`` (the summed micro-batch losses) and the accumulated lm_head gradient equal the float64 oracle's."""
    P = data.batch["prompts"].shape[1]
    model64 = tiny_lm(model.config.vocab_size).double()
    model64.load_state_dict(model.state_dict())
    with torch.no_grad():
        hidden = model64.model(
            input_ids=data.batch["input_ids"],
            attention_mask=data.batch["attention_mask"],
            position_ids=data.batch["position_ids"],
        ).last_hidden_state[:, P - 1 : -1]
    w64 = model64.lm_head.weight.detach().clone().requires_grad_(True)
    group_ids, is_ref = grao_verl.groups_from_uids(data.non_tensor_batch["uid"])
    targets = torch.where(data.batch["response_mask"].bool(), data.batch["responses"], -100)
    oracle = reference_grao(
        hidden, w64, targets, rewards.double(), group_ids=group_ids, is_reference=is_ref, beta=beta, lam=lam
    )
    oracle["loss"].backward()
    torch.testing.assert_close(total.double(), oracle["loss"].detach(), rtol=1e-5, atol=1e-6)
    assert rel_l2(model.lm_head.weight.grad, w64.grad) < FP32_GRAD_REL_L2


def test_verls_actor_loss_path_equals_the_oracle(tokenizer):
    """verl 0.9's actor update as its engine runs it, on CPU: the batch converted to no-padding
    (left_right_2_no_padding), mini-batches of verl's own size by its shuffling iterator, micro-batches by its
    prepare_micro_batches, the actor's ppo_loss with the grao policy loss on each micro-batch's packed log-probs
    (from our fused forward), one backward per micro-batch."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.config.actor import FSDPActorConfig, PolicyLossConfig
    from verl.workers.engine.utils import prepare_micro_batches
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import left_right_2_no_padding

    n, prompts, beta, lam = 2, 4, 1.5, 0.0
    data, rewards = recipe_batch(tokenizer, n, prompts, beta, lam)
    assert grao_verl.ppo_mini_batch_size_choices(prompts, n) == [1, 2, 3]  # m x 2 rows divide 4 x 3 rows
    data.batch["old_log_probs"] = torch.zeros(data.batch["responses"].shape)
    model = grao_verl.patch_verl_model(tiny_lm(len(tokenizer)), backend="torch")
    config = FSDPActorConfig(
        strategy="fsdp",
        ppo_mini_batch_size=3,
        ppo_micro_batch_size_per_gpu=3,
        use_dynamic_bsz=False,
        rollout_n=n,
        policy_loss=PolicyLossConfig(loss_mode="grao"),
    )
    td = left_right_2_no_padding(data.to_tensordict())
    rows = config.ppo_mini_batch_size * config.rollout_n  # verl's own sizing, with a value from the choices
    total, micro_count = 0.0, 0
    for mini in tu.make_iterator(td, mini_batch_size=rows, epochs=1, seed=0, dataloader_kwargs={"shuffle": True}):
        tu.assign_non_tensor(
            mini,
            use_dynamic_bsz=False,
            micro_batch_size_per_gpu=config.ppo_micro_batch_size_per_gpu,
            dp_size=1,
            batch_num_tokens=int(mini["loss_mask"].sum()),
            global_batch_size=rows,
        )
        micro_batches, _ = prepare_micro_batches(mini)
        for micro in micro_batches:
            # the packed sequences' log-probs, (total_nnz,), each sequence through the model on its own
            log_probs = torch.cat(
                [
                    model(input_ids=ids[None], position_ids=pos[None], temperature=1.0, return_dict=True).log_probs[0]
                    for ids, pos in zip(micro["input_ids"].unbind(), micro["position_ids"].unbind())
                ]
            )
            loss, _ = ppo_loss(config, {"log_probs": log_probs}, micro)
            loss.backward()
            total, micro_count = total + loss.detach(), micro_count + 1
    assert micro_count == 4  # 2 mini-batches of 6 rows, each 2 micro-batches of 3
    assert_equals_oracle(model, data, rewards, total, beta, lam)


def test_ppo_mini_batch_size_choices():
    # 256 prompts x (8 + 1) rows: m x 8 rows must divide 2304, m <= 256
    choices = grao_verl.ppo_mini_batch_size_choices(256, 8)
    assert choices == [m for m in range(1, 257) if 2304 % (8 * m) == 0] and 32 in choices and 256 not in choices
    assert grao_verl.ppo_mini_batch_size_choices(4, 3) == []  # n does not divide train_batch_size: none works
    assert grao_verl.ppo_mini_batch_size_choices(4, 2, dp_size=4) == [2]
    with pytest.raises(ValueError, match="dp_size must be a positive int"):
        grao_verl.ppo_mini_batch_size_choices(4, 2, dp_size=0)
