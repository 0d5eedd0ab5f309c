"""MoE families in the trainer: Qwen3-MoE, Mixtral, OLMoE and DeepSeek-V3 as tiny random models (CPU, seconds).

Expert-load metrics count the experts each router actually chose; DeepSeek-V3's
auxiliary-loss-free balancing moves its per-expert router bias by
``rate * sign(mean load - load)`` after each step (arXiv 2412.19437 Sec. 2.1.2).
Also: ``trust_remote_code`` for directories that ship code, and the warmup warning.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from utils import read_lines, save_tiny_llama, small  # noqa: E402

from grao import models  # noqa: E402
from grao.config import ConfigError  # noqa: E402
from grao.train.trainer import Trainer  # noqa: E402

# Hidden 32, 2 layers, 4 routed experts, top-2: the smallest config of each family that still routes.
COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=32, head_dim=8, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4)),
    # layer 0 dense (first_k_dense_replace), layer 1 MoE with a shared expert; two groups of two experts, one
    # group per token (group-limited routing), sigmoid scores with the correction bias; MLA attention.
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            n_routed_experts=4,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.0,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_key_value_heads=4,
        ),
    ),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """A local model directory (random weights, the demo tokenizer) per family, saved once for the module."""
    import transformers

    tok = models.build_demo_tokenizer()
    dirs = {}
    for name, (config_class, fields) in FAMILIES.items():
        cfg = getattr(transformers, config_class)(
            **{**COMMON, **fields},
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.eos_token_id,
        )
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        dirs[name] = path
    return dirs


def _forward_routing(model, tok):
    """The routing records of one training-mode forward over a few demo prompts, and the attention mask."""
    batch = tok(["abc=cba", "ba=ab", "cab=bac"], return_tensors="pt", padding=True)
    with models.capture_routing(model, models.moe_info(model).top_k) as routing, torch.no_grad():
        models.backbone(model)(**batch, use_cache=False)
    return routing, batch["attention_mask"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_three_steps_with_expert_load(tmp_path, family_dirs, family):
    cfg = small(
        tmp_path, model=str(family_dirs[family]), steps=3, eval_every=3, save_every=3, router_aux_loss_coef=0.01
    )
    trainer = Trainer(cfg)
    assert trainer.moe == (4, 2)
    assert len(models.routers(trainer.model)) == (1 if family == "deepseek_v3" else 2)  # DeepSeek's layer 0 is dense
    assert trainer.router_scoring == ("sigmoid" if family == "deepseek_v3" else "softmax")
    gate = models.routers(trainer.model)[0].weight
    before = gate.detach().clone()
    assert trainer.train() is True
    train = [ln for ln in read_lines(tmp_path / "run") if "loss" in ln]
    assert [ln["step"] for ln in train] == [1, 2, 3]
    for ln in train:
        load = ln["moe/expert_load"]
        assert len(load) == 4 and sum(load) == pytest.approx(1.0, abs=1e-3) and min(load) >= 0
        assert ln["moe/aux_loss"] > 0
        terms = ln["objective/exploration"] + ln["objective/imitation"] + ln["objective/alignment"]
        assert ln["loss"] == pytest.approx(-terms + 0.01 * ln["moe/aux_loss"], rel=1e-4, abs=1e-5)
    assert not torch.equal(before, gate.detach())  # the router trained


@pytest.mark.parametrize("family", list(FAMILIES))
def test_expert_load_counts_the_experts_the_router_chose(family_dirs, family):
    model = models.load_model(family_dirs[family])
    tok = models.load_tokenizer(family_dirs[family])
    if family == "deepseek_v3":
        # the bias only chooses: a large one on expert 3 sends every token there (and, as groups are {0, 1} and
        # {2, 3} with one group per token, to expert 2 as its second), whatever the logits say
        models.correction_biases(model)[0].copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    routing, mask = _forward_routing(model, tok)
    layers = len(models.routers(model))
    assert [r.layer for r in routing] == list(range(layers))
    scoring = models.router_scoring(model)
    counts = models.expert_counts(routing, layers, models.moe_info(model), mask, scoring)
    tokens = int(mask.sum())
    assert counts.sum() == tokens * 2 * layers
    for r in routing:
        assert r.chosen is not None and r.chosen.shape == (mask.numel(), 2)
        picked = r.chosen[mask.reshape(-1).bool()]
        manual = torch.stack([(picked == e).sum() for e in range(4)]).float()
        torch.testing.assert_close(counts[r.layer], manual)
        if family == "deepseek_v3":
            assert {tuple(p) for p in picked.sort(-1).values.tolist()} == {(2, 3)}
        else:  # a softmax router picks the top-k of its probabilities
            expected = torch.softmax(r.logits.float(), -1).topk(2, -1).indices.sort(-1).values
            torch.testing.assert_close(r.chosen.sort(-1).values, expected)


def test_deepseek_micro_batches_give_the_one_batch_gradient_and_load(tmp_path, family_dirs):
    cfg = small(tmp_path, model=str(family_dirs["deepseek_v3"]), prompts_per_step=4, router_aux_loss_coef=0.5)
    trainer = Trainer(cfg)
    rollout = trainer.rollout(trainer.prompts_for_step(1), 1)

    def grads():
        return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    whole = trainer.accumulate_gradients(rollout)
    g_whole = grads()
    assert any("gate.weight" in n for n in g_whole)  # the balance loss reaches the router
    for mb in (1, 3):
        trainer.cfg.micro_batch_prompts = mb
        split = trainer.accumulate_gradients(rollout)
        g_split = grads()
        for name, g in g_whole.items():
            torch.testing.assert_close(g_split[name], g, rtol=1e-4, atol=1e-6, msg=f"{name}, micro-batch {mb}")
        assert split["moe/aux_loss"] == pytest.approx(whole["moe/aux_loss"], rel=1e-5)
        torch.testing.assert_close(split["moe/layer_counts"], whole["moe/layer_counts"])


def test_deepseek_group_limited_choice_is_not_a_plain_top_k(family_dirs):
    model = models.load_model(family_dirs["deepseek_v3"])
    routing, mask = _forward_routing(model, models.load_tokenizer(family_dirs["deepseek_v3"]))
    (r,) = routing
    groups = (r.chosen // 2).tolist()  # experts {0, 1} are group 0, {2, 3} group 1
    assert all(a == b for a, b in groups)  # topk_group=1: both experts of a token come from one group


def test_sigmoid_balance_loss_is_deepseek_v3_sequence_wise_loss():
    # arXiv 2412.19437 Eq. 17-20 for one sequence of T tokens, written token by token:
    # L = sum_i f_i P_i, f_i = E / (K T) * #{t: i chosen at t}, P_i = 1/T sum_t s_it / sum_j s_jt; ours is K L.
    torch.manual_seed(1)
    T, E, K = 7, 4, 2
    logits = torch.randn(T, E)
    chosen = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    s = torch.sigmoid(logits)
    f = torch.zeros(E)
    P = torch.zeros(E)
    for t in range(T):
        for i in chosen[t]:
            f[i] += E / (K * T)
        P += s[t] / s[t].sum() / T
    expected = K * (f * P).sum()
    aux, load = models.load_balancing_loss((logits,), E, K, torch.ones(1, T), chosen=(chosen,), scoring="sigmoid")
    torch.testing.assert_close(aux[0], expected)
    torch.testing.assert_close(load, torch.bincount(chosen.reshape(-1), minlength=E).float() / (T * K))


def test_router_bias_update_on_a_hand_made_load():
    biases = [torch.zeros(4), torch.tensor([0.1, 0.0, 0.0, 0.0])]
    counts = torch.tensor([[10.0, 2.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]])  # layer 0: mean 5; layer 1 balanced
    models.update_router_bias(biases, counts, 0.01)
    # overloaded expert 0 falls by the rate, the underloaded ones rise by it; a balanced layer keeps its bias
    torch.testing.assert_close(biases[0], torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    torch.testing.assert_close(biases[1], torch.tensor([0.1, 0.0, 0.0, 0.0]))
    models.update_router_bias(biases, torch.tensor([[1.0, 7.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]]), 0.5)
    torch.testing.assert_close(biases[0], torch.tensor([0.49, -0.49, 0.01, 0.01]))  # a load at the mean: no move


def test_bias_balancing_in_a_two_step_run(tmp_path, family_dirs):
    rate = 0.01
    cfg = small(
        tmp_path, model=str(family_dirs["deepseek_v3"]), router_bias_update_rate=rate, eval_every=2
    )  # saves each step
    trainer = Trainer(cfg)
    (bias,) = models.correction_biases(trainer.model)
    seen = []
    update = trainer.update

    def recording_update(rollout):  # the step's per-layer counts, as the trainer computes them
        seen.append((bias.detach().clone(), trainer.accumulate_gradients(rollout)["moe/layer_counts"].clone()))
        return update(rollout)

    trainer.update = recording_update
    assert trainer.train() is True
    assert len(seen) == 2
    afters = [b for b, _ in seen[1:]] + [bias.detach().clone()]
    for (before, counts), after in zip(seen, afters):
        (layer,) = counts
        torch.testing.assert_close(after - before, rate * torch.sign(layer.mean() - layer))
        assert (after - before).abs().max() == pytest.approx(rate)  # some expert was off balance
    # the bias is model state: each checkpoint holds the bias after its step
    for step, after in enumerate(afters, 1):
        saved = models.load_model(tmp_path / "run" / "checkpoints" / f"step-{step:06d}")
        torch.testing.assert_close(models.correction_biases(saved)[0], after)


def test_bias_balancing_needs_a_router_bias(tmp_path):
    with pytest.raises(ConfigError, match="'router_bias_update_rate'.*e_score_correction_bias"):
        Trainer(small(tmp_path, router_bias_update_rate=0.001))


def _custom_code_dir(path):
    """A tiny Llama saved as a custom architecture whose config.json maps its classes to code in the directory."""
    save_tiny_llama(path)
    (path / "configuration_tinycustom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyCustomConfig(LlamaConfig):\n"
        '    model_type = "tinycustom"\n'
    )
    (path / "modeling_tinycustom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tinycustom import TinyCustomConfig\n\n\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n"
    )
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="tinycustom",
        architectures=["TinyCustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tinycustom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM",
        },
    )
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_trust_remote_code_is_an_explicit_key(tmp_path, family_dirs):
    path = _custom_code_dir(tmp_path / "custom")
    assert models.remote_code_files(path) == ["config.json"]
    with pytest.raises(models.ModelError, match="auto_map.*trust_remote_code: true"):
        Trainer(small(tmp_path / "a", model=str(path), steps=1))
    trainer = Trainer(small(tmp_path / "b", model=str(path), steps=1, trust_remote_code=True))
    assert type(trainer.model).__name__ == "TinyCustomForCausalLM"  # the directory's own class ran
    assert trainer.train() is True
    # a type transformers has (Moonlight ships code for deepseek_v3) loads natively with the key off
    native = tmp_path / "moonlight-like"
    shutil.copytree(family_dirs["deepseek_v3"], native)
    config = json.loads((native / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}  # a file not there
    (native / "config.json").write_text(json.dumps(config))
    assert type(models.load_model(native)).__name__ == "DeepseekV3ForCausalLM"


def test_warmup_longer_than_the_run_warns(tmp_path, capsys):
    Trainer(small(tmp_path / "a", steps=2, warmup_steps=2))
    assert "warmup_steps (2) >= steps (2)" in capsys.readouterr().err
    Trainer(small(tmp_path / "b", steps=2, warmup_steps=1))
    assert "warmup_steps" not in capsys.readouterr().err
