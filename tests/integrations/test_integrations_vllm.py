"""A Hugging Face model's weights into an in-process vLLM engine (grao_kernels.integrations.vllm): vLLM's greedy
decoding equals transformers' token for token for a dense and an MoE model, before and after the weights change and
are synced (and differs while the engine is stale); the weights go over under the checkpoint's names and layouts,
LoRA merged; engine_supports names what the engine cannot run."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from grao_kernels.integrations import vllm as engine  # noqa: E402

VOCAB, EOS, PAD = 256, 1, 0
NEW_TOKENS = 16
PROMPTS = [[2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13], [20, 30]]
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    eos_token_id=EOS,
    bos_token_id=EOS,
    pad_token_id=PAD,
)


def spread(config):
    """The fp32 model of ``config`` from seed 0 (the caller's RNG untouched), every weight drawn from N(0, 0.2):
    wide enough that greedy decoding is far from ties (random init alone gives near-uniform logits)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
    return model.eval()


def build(kind: str, **fields):
    """A tiny random fp32 Qwen3 ('dense') or Qwen3-MoE ('moe'), its weights spread (:func:`spread`)."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    if kind == "dense":
        config = Qwen3Config(**dict(DECODER, **fields))
    else:
        config = Qwen3MoeConfig(
            **dict(DECODER, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, **fields)
        )
    return spread(config)


def hf_greedy(model) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        seq = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            pad_token_id=PAD,
        )
        out.append(seq[0, len(p) :].tolist())
    return out


def vllm_greedy(llm) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(r.outputs[0].token_ids) for r in results]


@pytest.fixture(scope="module", params=["dense", "moe"])
def model_and_engine(request, tmp_path_factory):
    model = build(request.param)
    llm = engine.create_llm(
        engine.engine_config(model),
        dtype=torch.float32,
        max_model_len=64,
        kv_cache_memory_bytes=32 << 20,
        directory=tmp_path_factory.mktemp(request.param),
        enforce_eager=True,
    )
    yield model, llm
    del llm


def test_greedy_equals_transformers_before_and_after_sync(model_and_engine):
    model, llm = model_and_engine
    assert engine.engine_supports(engine.engine_config(model)) is None
    engine.load_weights(llm, engine.checkpoint_tensors(model))
    assert vllm_greedy(llm) == hf_greedy(model)

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    expected = hf_greedy(model)
    stale = vllm_greedy(llm)
    assert sum(a == b for s, t in zip(stale, expected) for a, b in zip(s, t)) < len(PROMPTS) * NEW_TOKENS // 2

    engine.load_weights(llm, engine.checkpoint_tensors(model))
    assert vllm_greedy(llm) == expected


def test_checkpoint_tensors_are_what_save_pretrained_writes(tmp_path):
    """The MoE model's experts as one tensor per expert under the checkpoint's names, equal to the saved file."""
    from safetensors.torch import load_file

    model = build("moe")
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    sent = dict(engine.checkpoint_tensors(model))
    assert sorted(sent) == sorted(saved)
    assert any(".mlp.experts.3.down_proj.weight" in name for name in sent)
    for name, tensor in saved.items():
        torch.testing.assert_close(sent[name], tensor, rtol=0, atol=0, msg=name)


def test_tied_output_embedding_is_left_out():
    model = build("dense", tie_word_embeddings=True)
    names = [n for n, _ in engine.checkpoint_tensors(model)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_lora_weights_are_merged_and_the_model_stays_unmerged():
    peft = pytest.importorskip("peft")
    import copy

    model = build("dense")
    expected = dict(model.state_dict())  # the base model's names
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    merged = copy.deepcopy(lora).merge_and_unload().state_dict()
    sent = dict(engine.checkpoint_tensors(lora))
    assert sorted(sent) == sorted(expected)
    for name, tensor in merged.items():
        torch.testing.assert_close(sent[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.equal(
        sent["model.layers.0.self_attn.q_proj.weight"], expected["model.layers.0.self_attn.q_proj.weight"]
    )
    for name, p in lora.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"


@pytest.mark.parametrize(
    "kind, fields, device, max_len, reason",
    [
        ("dense", {"head_dim": 16}, "cpu", None, "head_dim 16"),
        ("dense", {"head_dim": 16}, "cuda", None, None),
        ("moe", {"moe_intermediate_size": 48}, "cpu", None, "moe_intermediate_size a multiple of 32, got 48"),
        ("dense", {}, "cpu", 65, "exceeds the model's max_position_embeddings 64"),
        ("dense", {}, "cpu", 64, None),
    ],
)
def test_engine_supports_names_what_the_engine_cannot_run(kind, fields, device, max_len, reason):
    from transformers import Qwen3Config, Qwen3MoeConfig

    arch = "Qwen3ForCausalLM" if kind == "dense" else "Qwen3MoeForCausalLM"
    fields = dict(DECODER, architectures=[arch], **fields)
    config = Qwen3Config(**fields) if kind == "dense" else Qwen3MoeConfig(num_experts=4, **fields)
    got = engine.engine_supports(config, device, max_model_len=max_len)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def moe_family(name: str):
    """A tiny random fp32 model of each MoE family the trainer routes (grao.models.moe), sized for vLLM's CPU
    kernels."""
    from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig

    fields = dict(DECODER, num_key_value_heads=2, intermediate_size=64)
    config = {
        "mixtral": lambda: MixtralConfig(**fields, num_local_experts=4, num_experts_per_tok=2),
        "olmoe": lambda: OlmoeConfig(**fields, num_experts=4, num_experts_per_tok=2),
        "deepseek_v3": lambda: DeepseekV3Config(
            **{k: v for k, v in fields.items() if k != "head_dim"},
            moe_intermediate_size=64,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_rope_head_dim=64,
            qk_nope_head_dim=32,
            v_head_dim=32,
        ),
    }[name]()
    return spread(config)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "deepseek_v3"])
def test_every_moe_family_syncs_exactly_or_is_refused_with_its_reason(family, tmp_path):
    """Qwen3-MoE is above; each other family the trainer routes either decodes as transformers does after a sync
    or is refused by engine_supports."""
    model = moe_family(family)
    config = engine.engine_config(model)
    reason = engine.engine_supports(config)
    if reason is not None:
        assert family == "deepseek_v3" and "does not reproduce" in reason
        return
    llm = engine.create_llm(
        config, dtype=torch.float32, max_model_len=64, kv_cache_memory_bytes=32 << 20, directory=tmp_path
    )
    engine.load_weights(llm, engine.checkpoint_tensors(model))
    assert vllm_greedy(llm) == hf_greedy(model)


def test_engine_config_names_the_class_and_spells_out_deepseek_routing():
    model = moe_family("deepseek_v3")
    config = engine.engine_config(model)
    assert config.architectures == ["DeepseekV3ForCausalLM"] and model.config.architectures is None
    assert (config.topk_method, config.scoring_func) == ("noaux_tc", "sigmoid")


def test_engine_supports_refuses_an_architecture_vllm_does_not_have():
    from transformers import Qwen3Config

    config = Qwen3Config(**DECODER, architectures=["NoSuchModelForCausalLM"])
    assert "no implementation" in engine.engine_supports(config)
