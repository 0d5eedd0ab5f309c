"""GRAO and the fused log-probs inside the real TRL: GRAOTrainer trains tiny dense and MoE models, and its loss
and gradients on a captured, shuffled, split generation batch equal the float64 GRAO oracle's; patch_trl gives a
stock GRPOTrainer (KL, two iterations, MoE) the same log-probs, entropies, loss and gradients as stock TRL."""

from __future__ import annotations

import math

import pytest
import torch
from utils import FP32_GRAD_REL_L2, TINY_DECODER, rel_l2

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from grao.data import demo_task  # noqa: E402
from grao.models import build_demo_tokenizer, tiny_moe  # noqa: E402
from grao_kernels.integrations.trl import GRAOConfig, GRAOTrainer, head_arguments, patch_trl  # noqa: E402
from grao_kernels.testing import reference_grao  # noqa: E402

MAX_COMPLETION = 6


def reward_reverse(prompts, completions, reference, **kwargs):
    """The demo task's partial credit against the dataset's reference answer."""
    return [demo_task.score(ref, c) for c, ref in zip(completions, reference)]


def reward_length(prompts, completions, **kwargs):
    return [-0.1 * len(c) for c in completions]


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def dataset(n=16):
    train, _ = demo_task.make_splits(n, 4, seed=1)
    return datasets.Dataset.from_list([{"prompt": ex.prompt, "reference": ex.reference} for ex in train])


def dense_model(tok, seed=0):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        **TINY_DECODER,
        vocab_size=len(tok),
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


MODELS = {"dense": dense_model, "moe": tiny_moe}


def common_args(tmp_path, **overrides):
    args = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=6,
        num_generations=3,
        steps_per_generation=2,
        gradient_accumulation_steps=2,
        max_completion_length=MAX_COMPLETION,
        learning_rate=3e-3,
        max_steps=3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # TRL's default is bf16 autocast; these tests compare in float32
        seed=0,
        temperature=1.0,
        dataloader_num_workers=0,
    )
    args.update(overrides)
    return args


def grao_trainer(kind, tok, tmp_path, train_dataset=None, logprob_temperature=1.0, model=None, **overrides):
    args = GRAOConfig(
        **common_args(tmp_path, **overrides),
        grao_backend="torch",
        grao_beta=0.7,
        grao_lam=0.4,
        grao_logprob_temperature=logprob_temperature,
    )
    return GRAOTrainer(
        model=MODELS[kind](tok) if model is None else model,
        reward_funcs=[reward_reverse, reward_length],
        args=args,
        train_dataset=dataset() if train_dataset is None else train_dataset,
        processing_class=tok,
    )


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_grao_trainer_trains(kind, tokenizer, tmp_path):
    trainer = grao_trainer(kind, tokenizer, tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3 and len(logs) == 3
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert all(math.isfinite(h["grao/reward_reference"]) and math.isfinite(h["grao/reward_samples"]) for h in logs)
    # demo references are exact answers: the reference scores 1 - 0.1 * its length
    assert all(h["grao/reward_reference"] > 0.4 for h in logs)
    if kind == "moe":
        assert all(h["aux_loss"] > 0 for h in logs)
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in moved and any("layers.0" in n for n in moved)


def captured_step(trainer):
    """One generation batch through TRL's own _prepare_inputs (generate, shuffle, split into steps_per_generation
    micro-batches), each micro-batch's loss backpropagated; the final hidden states kept with their gradients."""
    model = trainer.model
    model.train()
    model.zero_grad()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    batch = next(iter(trainer.get_train_dataloader()))
    hidden = []

    def keep(module, args, out):
        if out.requires_grad:  # the training forwards, not generation's
            out.retain_grad()
            hidden.append(out)

    hook = model.model.norm.register_forward_hook(keep)
    micro, total = [], 0.0
    try:
        for _ in range(trainer.args.steps_per_generation):
            inputs = trainer._prepare_inputs(batch)
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
            total = total + loss.detach()
            micro.append(inputs)
            trainer._step += 1
    finally:
        hook.remove()
    return micro, hidden, total


@pytest.mark.parametrize("kind,temperature", [("dense", 1.0), ("moe", 1.0), ("dense", 0.7)])
def test_grao_trainer_loss_and_gradients_equal_the_oracle(kind, temperature, tokenizer, tmp_path):
    # grao_logprob_temperature scores the completions at that temperature (TRL samples at 1.0 here)
    trainer = grao_trainer(kind, tokenizer, tmp_path, logprob_temperature=temperature)
    assert_step_matches_oracle(trainer, moe=kind == "moe", temperature=temperature)


def assert_step_matches_oracle(trainer, moe, temperature):
    """``captured_step`` of ``trainer`` (4 prompts x (3 samples + 1 reference), 2 micro-batches; built by
    ``grao_trainer``): its loss, the logged ``grao/loss`` and the gradients of the head and of the final hidden
    states equal the float64 GRAO oracle's on the captured batch."""
    logged = len(trainer._metrics["train"]["grao/loss"])
    micro, hidden, total = captured_step(trainer)
    assert len(micro) == 2 and len(hidden) == 2
    cat = {k: torch.cat([m[k] for m in micro]) for k in ("prompt_ids", "completion_ids", "completion_mask")}
    is_ref = torch.cat([m["grao_is_reference"] for m in micro])
    group = torch.cat([m["grao_group"] for m in micro])
    rewards = torch.cat([m["grao_rewards"] for m in micro])
    P = int(group.max()) + 1
    assert int(is_ref.sum()) == P == 4 and len(is_ref) == P * 4
    # TRL shuffled the rows: the references are spread over both micro-batches, and so are groups.
    assert 0 < int(micro[0]["grao_is_reference"].sum()) < P
    assert set(micro[0]["grao_group"].tolist()) & set(micro[1]["grao_group"].tolist())

    # Position t of the input predicts token t+1; only completion tokens are scored.
    input_ids = torch.cat([cat["prompt_ids"], cat["completion_ids"]], 1)
    C = cat["completion_ids"].shape[1]
    targets = torch.full_like(input_ids, -100)
    targets[:, -C:] = torch.where(cat["completion_mask"].bool(), cat["completion_ids"], -100)
    targets = targets[:, 1:]
    h_model = torch.cat([h for h in hidden])
    h64 = h_model.detach()[:, :-1].double().requires_grad_(True)
    weight = trainer.model.lm_head.weight
    w64 = weight.detach().double().requires_grad_(True)
    oracle = reference_grao(
        h64,
        w64,
        targets,
        rewards.double(),
        group_ids=group,
        is_reference=is_ref,
        beta=0.7,
        lam=0.4,
        temperature=temperature,
    )
    oracle["loss"].backward()

    expected = oracle["loss"].detach()
    if moe:  # GRPOTrainer's router term: coef * aux / accumulation steps, per micro-batch
        aux = trainer._metrics["train"]["aux_loss"][-2:]
        expected = expected + trainer.router_aux_loss_coef * sum(aux) / trainer.args.gradient_accumulation_steps
    torch.testing.assert_close(total.double(), expected, rtol=2e-5, atol=1e-6)
    # grao/loss: one entry per generation batch (not per micro-batch), the batch's whole GRAO loss
    assert len(trainer._metrics["train"]["grao/loss"]) == logged + 1
    torch.testing.assert_close(
        torch.tensor(trainer._metrics["train"]["grao/loss"][-1], dtype=torch.float64),
        oracle["loss"].detach(),
        rtol=2e-5,
        atol=1e-6,
    )
    assert rel_l2(weight.grad, w64.grad) < FP32_GRAD_REL_L2
    h_grad = torch.cat([h.grad for h in hidden])
    assert rel_l2(h_grad[:, :-1], h64.grad) < FP32_GRAD_REL_L2
    assert h_grad[:, -1].abs().max() == 0  # the last position predicts nothing


def test_grao_config_and_trainer_refuse_what_they_cannot_do(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="KL"):
        GRAOConfig(**common_args(tmp_path), beta=0.1)
    with pytest.raises(ValueError, match="grao_lam"):
        GRAOConfig(**common_args(tmp_path), grao_lam=float("nan"))
    with pytest.raises(ValueError, match="grao_logprob_temperature"):
        GRAOConfig(**common_args(tmp_path), grao_logprob_temperature=0.0)
    with pytest.raises(ValueError, match="vllm_kv_cache_bytes must be > 0"):
        GRAOConfig(**common_args(tmp_path), vllm_kv_cache_bytes=0)
    with pytest.raises(ValueError, match="split evenly"):
        # 2 prompts x (3 + 1) rows do not split into 3 micro-batches
        grao_trainer("dense", tokenizer, tmp_path, per_device_train_batch_size=2, steps_per_generation=3)
    # a dataset without the reference column is refused at construction, before any generation or reward
    answers = dataset().rename_column("reference", "answer")
    with pytest.raises(ValueError, match="train_dataset has no 'reference' column.*'answer'"):
        grao_trainer("dense", tokenizer, tmp_path, train_dataset=answers)


def test_grao_trainer_counts_the_references_it_cuts(tokenizer, tmp_path):
    limit = 5
    trainer = grao_trainer("dense", tokenizer, tmp_path, max_completion_length=limit)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    G = trainer.num_generations
    lengths = [len(tokenizer(x["reference"], add_special_tokens=False)["input_ids"]) + 1 for x in batch[::G]]
    expected = sum(n > limit for n in lengths)
    assert 0 < expected < len(lengths)  # the demo's references: some fit, some do not
    with pytest.warns(UserWarning, match=f"{expected} of {len(lengths)} reference answers .* were cut"):
        out = trainer._generate_and_score_completions(batch)
    assert trainer._metrics["train"]["reference/truncated"] == [expected]
    ref_lengths = out["completion_mask"][out["grao_is_reference"]].sum(1)
    assert ref_lengths.tolist() == [min(n, limit) for n in lengths]


# ---------------------------------------------------------------------------- the drop-in for stock TRL


def saved_moe(tok, path):
    model = tiny_moe(tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def grpo_trainer(model_path, tok, tmp_path, patched):
    args = GRPOConfig(
        **common_args(tmp_path / ("ours" if patched else "stock"), max_steps=2, temperature=0.8),
        beta=0.05,
        num_iterations=2,
        loss_type="dapo",
    )
    trainer = GRPOTrainer(
        model=model_path, reward_funcs=reward_reverse, args=args, train_dataset=dataset(), processing_class=tok
    )
    return patch_trl(trainer, backend="torch") if patched else trainer


def test_patch_trl_matches_stock_trl(tokenizer, tmp_path):
    path = saved_moe(tokenizer, tmp_path / "model")
    stock = grpo_trainer(path, tokenizer, tmp_path, patched=False)
    ours = grpo_trainer(path, tokenizer, tmp_path, patched=True)
    assert stock.aux_loss_enabled and ours.aux_loss_enabled and ours.ref_model is not None
    batch = next(iter(stock.get_train_dataloader()))
    outputs = []
    for trainer in (stock, ours):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
        torch.manual_seed(1)
        outputs.append(trainer._generate_and_score_completions([dict(x) for x in batch]))
    a, b = outputs
    assert torch.equal(a["completion_ids"], b["completion_ids"])
    # num_iterations=2: the old policy's log-probs are computed; beta > 0: the reference model's.
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)

    ids = torch.cat([a["prompt_ids"], a["completion_ids"]], 1)
    mask = torch.cat([a["prompt_mask"], a["completion_mask"]], 1)
    C = a["completion_ids"].shape[1]
    got = []
    for trainer in (stock, ours):
        logp, ent, aux = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, C, compute_entropy=True, compute_aux_loss=True
        )
        got.append((logp, ent, aux))
    (lp_s, ent_s, aux_s), (lp_o, ent_o, aux_o) = got
    valid = a["completion_mask"].bool()
    torch.testing.assert_close(lp_o[valid], lp_s[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_o[valid], ent_s[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(aux_o, aux_s)

    losses, grads = [], []
    for trainer in (stock, ours):
        trainer.model.zero_grad()
        inputs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append(trainer.model.lm_head.weight.grad.clone())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert rel_l2(grads[1], grads[0]) < 1e-5
    for name in ("entropy", "kl", "aux_loss"):
        torch.testing.assert_close(
            torch.tensor(ours._metrics["train"][name][-1]),
            torch.tensor(stock._metrics["train"][name][-1]),
            rtol=1e-5,
            atol=1e-6,
        )

    ours.train()  # the patched stock trainer trains the MoE model (KL, two iterations, router loss)
    logs = [h for h in ours.state.log_history if "loss" in h]
    assert ours.state.global_step == 2 and all(math.isfinite(h["loss"]) and h["kl"] >= 0 for h in logs)


def test_head_arguments_read_the_one_head_table():
    from transformers import AutoConfig, LlamaConfig

    from grao_kernels.hf import HeadError

    def head(model_type, **fields):
        return head_arguments(AutoConfig.for_model(model_type, **fields))

    assert head_arguments(LlamaConfig()) == {"logit_scale": 1.0, "softcap": None}
    assert head("gemma2", final_logit_softcapping=30.0) == {"logit_scale": 1.0, "softcap": 30.0}
    assert head("granite", logits_scaling=4.0)["logit_scale"] == 0.25  # Granite divides its logits
    assert head("hyperclovax", logits_scaling=4.0)["logit_scale"] == 4.0  # HyperCLOVAX multiplies them
    assert head("cohere", logit_scale=0.5)["logit_scale"] == 0.5
    assert head("gemma3")["softcap"] is None  # the conditional model never soft-caps, whatever its text config says
    with pytest.raises(HeadError, match="sets output_multiplier=2.0"):  # a family the table does not know
        head_arguments(LlamaConfig(output_multiplier=2.0))


def test_patch_trl_refuses_other_trainers():
    with pytest.raises(ValueError, match="GRPOTrainer"):
        patch_trl(object())
