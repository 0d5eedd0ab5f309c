"""One table of model-head transforms (``grao_kernels.hf``), checked against transformers' own forward.

Every causal-LM family of the installed transformers whose config has a logit
scale, multiplier or soft-cap field is found by scanning (not listed by hand),
built as a tiny random model with that field set to 3, and run through every
path that loads a model: the trainer's load-time head (``grao.models.logit_head``),
TRL's fused-head seam (``install_fused_head``) and verl's fused-kernel forward
(``patch_verl_model``). Each path must either give
log-probs equal to the model's own ``log_softmax(logits)`` or refuse the model;
the paths must agree, and a family the table lists must not be refused.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from grao_kernels import fused_linear_logprobs, hf  # noqa: E402

# A config field through which a forward may transform its logits; attention and router caps are not the head's.
HEAD_FIELD = re.compile(r"(logit|lm_head|output).*(scal|multipl|cap)", re.IGNORECASE)
NOT_HEAD = re.compile(r"attn|attention|router|moe_", re.IGNORECASE)
WIDTHS = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    n_routed_experts=4,
    n_group=1,
    topk_group=1,
    vocab_size=300,
    vocab_size_per_layer_input=300,  # Gemma-3n's per-layer embeddings
    hidden_size_per_layer_input=8,
    tie_word_embeddings=False,
)
LAYERS = dict(num_hidden_layers=1, num_layers=1)


def _configs():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield model_type, CONFIG_MAPPING[model_type]()
        except Exception:  # a family whose default config cannot be built here has no fields to read
            continue


def _head_fields(config) -> list[str]:
    fields = set()
    for cfg in {id(c): c for c in (config, hf._text_config(config))}.values():
        fields |= {k for k in cfg.to_dict() if HEAD_FIELD.search(k) and not NOT_HEAD.search(k)}
    return sorted(fields)


def scanned_families() -> dict[str, list[str]]:
    """model_type -> its head fields, for every causal-LM family of the installed transformers that has one."""
    return {model_type: fields for model_type, config in _configs() if (fields := _head_fields(config))}


FAMILIES = scanned_families()


def tiny_model(model_type: str, fields: list[str], value: float = 3.0):
    """A random ``model_type`` causal LM of width 32 (one layer where the family allows it), its head fields set
    to ``value`` and its lm_head drawn with std 1, so a transform left out moves the log-probs by far more than
    float32 rounding."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    default = CONFIG_MAPPING[model_type]()
    text = hf._text_config(default)
    values = text.to_dict()
    sizes = {k: v for k, v in WIDTHS.items() if k in values and not isinstance(values[k], dict)}
    sizes.update({k: [v] * len(values[k]) for k, v in sizes.items() if isinstance(values[k], list)})  # per layer
    if not any(isinstance(v, (list, dict)) for k, v in values.items() if k in ("layer_types", "per_layer_config")):
        sizes.update({k: v for k, v in LAYERS.items() if k in values})  # per-layer lists keep their length
    if "mamba_n_heads" in values and model_type.startswith("granite"):
        sizes.update(mamba_n_heads=2, mamba_d_head=32, mamba_n_groups=1)
    if values.get("unpadded_vocab_size") is not None:
        sizes["unpadded_vocab_size"] = WIDTHS["vocab_size"]
    if values.get("rope_parameters") == {} and values.get("layer_types"):  # a default config without its rope
        rope = {"rope_type": "default", "rope_theta": 1e4}
        if model_type.startswith("cohere_compass"):  # splits the rotary dims by mrope_section (default: 128-wide)
            rope["mrope_section"] = [2, 2, WIDTHS["head_dim"] // 2 - 4]
        sizes["rope_parameters"] = {t: dict(rope) for t in set(values["layer_types"])}
    sizes.update(pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if text is default:
        config = AutoConfig.for_model(model_type, **sizes)
    else:  # multimodal: the head reads its text config
        name = next(n for n in default.sub_configs if getattr(default, n) is text)
        config = AutoConfig.for_model(model_type, **{name: {**values, **sizes}})
    for field in fields:
        for cfg in {id(c): c for c in (config, hf._text_config(config))}.values():
            if field in cfg.to_dict():
                setattr(cfg, field, value)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ImportError as exc:  # e.g. a vision tower that needs timm
            pytest.skip(f"{model_type} needs a library this environment lacks: {str(exc).strip().splitlines()[0]}")
        torch.nn.init.normal_(model.get_output_embeddings().weight, std=1.0)
    return model.eval()


def own_logprobs(model, ids, targets) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    return logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]


def test_the_scan_finds_the_families_with_head_fields():
    # the scan must not silently find nothing: these families transform their logits in transformers' forward
    for model_type in ("granite", "cohere", "falcon_h1", "gemma2", "gemma3", "hyperclovax"):
        assert model_type in FAMILIES, sorted(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_path_reproduces_the_models_logits_or_refuses_it(model_type):
    from grao import models
    from grao_kernels.integrations.trl import install_fused_head
    from grao_kernels.integrations.verl import patch_verl_model

    fields = FAMILIES[model_type]
    model = tiny_model(model_type, fields)
    V = min(model.get_output_embeddings().weight.shape[0], model.get_input_embeddings().num_embeddings)
    ids = (torch.arange(2, 14) * 31 % V)[None]
    targets = torch.roll(ids, -1)
    try:
        want = own_logprobs(model, ids, targets)
    except ValueError:  # a model that does not run on token ids alone (a draft model fed another's states)
        want = None

    # the trainer's path: the head read and checked at load, then the loss's log-probs from the backbone
    try:
        head = models.logit_head(model)
    except models.ModelError as exc:
        trainer_refused = str(exc)
    else:
        trainer_refused = None
        with torch.no_grad():
            hidden = models.backbone(model)(input_ids=ids, use_cache=False).last_hidden_state
        weight, bias = models.output_head(model)
        got = fused_linear_logprobs(hidden, weight, targets, bias=bias, **head.kwargs())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # (fails if want is None: never accepted)

    # TRL's seam: model(..., fused_lm_head=True) returns the fused log-probs
    try:
        install_fused_head(model)
    except ValueError as exc:
        trl_refused = str(exc)
    else:
        trl_refused = None
        labels = torch.cat([torch.full((1, 1), -100), targets[:, :-1]], 1)  # labels[t + 1] = targets[t]
        with torch.no_grad():
            got = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False).log_probs
        torch.testing.assert_close(got, want[:, :-1], rtol=1e-5, atol=1e-5)

    # verl's fused-kernel forward (use_fused_kernels), ours through patch_verl_model
    try:
        patch_verl_model(model)
    except ValueError as exc:
        verl_refused = str(exc)
    else:
        verl_refused = None
        with torch.no_grad():
            got = model(input_ids=ids, shift_labels=targets, return_dict=True, use_cache=False).log_probs
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    assert (trainer_refused is None) == (trl_refused is None) == (verl_refused is None), (
        trainer_refused,
        trl_refused,
        verl_refused,
    )
    if model_type in hf.HEADS:
        assert trainer_refused is None, trainer_refused  # a family the table lists is reproduced
    else:
        assert trainer_refused is not None  # one it does not list, with a head field set, is refused


@pytest.mark.parametrize(
    "model_type,field,head",
    [
        ("hyperclovax", "logits_scaling", hf.LogitHead(3.0, None)),  # multiplies, where Granite divides
        ("granite", "logits_scaling", hf.LogitHead(1 / 3, None)),
        ("gemma3", "final_logit_softcapping", hf.LogitHead(1.0, None)),  # the conditional model never soft-caps
        ("gemma3_text", "final_logit_softcapping", hf.LogitHead(1.0, 3.0)),
    ],
)
def test_the_table_reads_what_the_forward_does(model_type, field, head):
    if model_type not in FAMILIES:
        pytest.skip(f"{model_type} is not in the installed transformers")
    model = tiny_model(model_type, [field])
    assert hf.read_head(model.config) == pytest.approx(head)
    assert hf.check_head(model) == pytest.approx(head)


def test_a_head_field_of_an_unknown_family_is_refused_by_name():
    from transformers import LlamaConfig

    config = LlamaConfig(output_multiplier=2.0)
    with pytest.raises(hf.HeadError, match=r"model_type 'llama'.* sets output_multiplier=2.0"):
        hf.read_head(config)


def test_grao_plan_refuses_a_head_the_trainer_would_refuse(tmp_path):
    from transformers import LlamaConfig

    from grao.tools import plan

    LlamaConfig(
        output_multiplier=2.0, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)
    with pytest.raises(plan.PlanError, match=r"sets output_multiplier=2.0"):
        plan.architecture(str(tmp_path))
