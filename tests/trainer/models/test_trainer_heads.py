"""The trainer's loss uses the model's own logits transform (Granite, Cohere, Falcon-H1, Gemma-2/3, ...), read
from its config, and refuses a head it does not reproduce. Tiny random models built from transformers configs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from utils import TINY_DECODER, small  # noqa: E402

from grao import models  # noqa: E402
from grao.losses import GRAO  # noqa: E402
from grao.train.trainer import IGNORE_INDEX, Trainer, build_batch  # noqa: E402
from grao_kernels import fused_linear_logprobs, grao_loss  # noqa: E402

# model_type, config fields, the head the trainer must read from them
FAMILIES = [
    ("granite", dict(logits_scaling=8.0), models.LogitHead(1 / 8, None)),
    ("cohere", dict(logit_scale=0.25), models.LogitHead(0.25, None)),
    ("falcon_h1", dict(lm_head_multiplier=0.3), models.LogitHead(0.3, None)),
    ("hyperclovax", dict(logits_scaling=3.0), models.LogitHead(3.0, None)),  # multiplies, where Granite divides
    ("gemma2", dict(final_logit_softcapping=3.0), models.LogitHead(1.0, 3.0)),
    ("gemma3_text", dict(final_logit_softcapping=3.0), models.LogitHead(1.0, 3.0)),
    ("recurrent_gemma", dict(logits_soft_cap=3.0), models.LogitHead(1.0, 3.0)),
]


def tiny_model(model_type: str, vocab_size: int = 61, seed: int = 0, **fields):
    """A random one-layer model of ``model_type``; its lm_head drawn with std 1 so that its logits reach ~6,
    where a logit scale or soft cap left out changes the log-probs by far more than float32 rounding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if model_type == "xlstm":
        config = AutoConfig.for_model(
            "xlstm", hidden_size=32, embedding_dim=32, num_heads=2, num_blocks=1, vocab_size=vocab_size, **ids, **fields
        )
    elif model_type == "gemma3":  # multimodal: the head's settings live in its text config
        text = dict(TINY_DECODER, vocab_size=vocab_size, **ids, **fields)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)
        config = AutoConfig.for_model("gemma3", text_config=text, vision_config=dict(vision, patch_size=14), **ids)
    else:
        config = AutoConfig.for_model(model_type, **TINY_DECODER, vocab_size=vocab_size, **ids, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        torch.nn.init.normal_(model.get_output_embeddings().weight, std=1.0)
    return model


def own_logprobs(model, ids, mask, targets) -> torch.Tensor:
    """The model's own log_softmax(logits) at ``targets`` (0 where ignored), in float32."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    keep = targets != IGNORE_INDEX
    logp = logits.log_softmax(-1).gather(-1, torch.where(keep, targets, 0)[..., None])[..., 0]
    return torch.where(keep, logp, 0.0)


@pytest.mark.parametrize("model_type,fields,head", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_head_is_read_from_the_config_and_matches_the_models_logits(model_type, fields, head):
    model = tiny_model(model_type, **fields)
    assert models.logit_head(model) == pytest.approx(head)  # the load-time check on the model passed
    ids = torch.arange(2, 14)[None]
    mask, targets = torch.ones_like(ids), torch.roll(ids, -1)
    want = own_logprobs(model, ids, mask, targets)
    with torch.no_grad():
        hidden = models.backbone(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    weight, bias = models.output_head(model)
    got = fused_linear_logprobs(hidden, weight, targets, bias=bias, logit_scale=head.logit_scale, softcap=head.softcap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = fused_linear_logprobs(hidden, weight, targets, bias=bias)
    assert (plain - want).abs().max() > 0.1  # a plain linear head would train on other log-probs


def test_multimodal_gemma3_applies_no_softcap_its_forward_does_not():
    # Gemma3ForConditionalGeneration never reads its text config's final_logit_softcapping
    model = tiny_model("gemma3", final_logit_softcapping=3.0)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert model.config.get_text_config().final_logit_softcapping == 3.0
    assert models.logit_head(model) == models.LogitHead(1.0, None)


class Recording:
    """``grao_loss`` as the trainer's GRAO calls it, keeping each result."""

    def __init__(self):
        self.outputs = []

    def __call__(self, *args, **kwargs):
        self.outputs.append(grao_loss(*args, **kwargs))
        return self.outputs[-1]


class RecordingGRAO(GRAO):
    """The trainer's default loss, keeping each micro-batch it is handed."""

    def __init__(self, fn):
        super().__init__(fn=fn)
        self.batches = []

    def __call__(self, batch):
        self.batches.append(batch)
        return super().__call__(batch)


def _save(tmp_path, model_type: str, **fields):
    """A tiny ``model_type`` model with the demo tokenizer, saved as a local model directory."""
    tok = models.build_demo_tokenizer()
    model = tiny_model(model_type, vocab_size=len(tok), **fields)
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.save_pretrained(tmp_path / model_type)
    tok.save_pretrained(tmp_path / model_type)
    return str(tmp_path / model_type)


@pytest.mark.parametrize(
    "model_type,fields,head",
    [
        ("gemma2", dict(final_logit_softcapping=3.0), models.LogitHead(1.0, 3.0)),
        ("granite", dict(logits_scaling=8.0), models.LogitHead(1 / 8, None)),
    ],
    ids=["gemma2-softcap", "granite-logits_scaling"],
)
def test_trainer_logprobs_equal_the_models_own_log_softmax(tmp_path, model_type, fields, head):
    fn = Recording()
    loss = RecordingGRAO(fn)
    # Gemma-2's soft-capped attention has no sdpa path
    cfg = small(tmp_path, model=_save(tmp_path, model_type, **fields), attn_implementation="eager")
    trainer = Trainer(cfg, loss=loss)
    assert trainer.head == pytest.approx(head)
    rollout = trainer.rollout(trainer.prompts_for_step(1), 1)
    trainer.accumulate_gradients(rollout)
    (batch,), (out,) = loss.batches, fn.outputs
    assert (batch.logit_scale, batch.softcap) == pytest.approx((head.logit_scale, head.softcap))

    P = rollout.rewards.shape[0]
    ids, mask, targets = build_batch(rollout, range(P), trainer.tokenizer.pad_token_id, trainer.runtime.device)
    assert torch.equal(targets, batch.targets)
    want = own_logprobs(trainer.model, ids, mask, targets)  # the model's forward, lm_head and its transform
    n = (targets != IGNORE_INDEX).sum(1)
    torch.testing.assert_close(out.seq_logp, want.sum(1) / n.clamp(min=1), rtol=1e-5, atol=1e-5)
    args = (batch.hidden.detach(), batch.weight.detach(), batch.targets)
    got = fused_linear_logprobs(*args, bias=batch.bias, logit_scale=batch.logit_scale, softcap=batch.softcap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (fused_linear_logprobs(*args, bias=batch.bias) - want).abs().max() > 0.1  # the head matters here


def test_unsupported_head_is_refused_naming_its_config_field(tmp_path):
    # xLSTM soft-caps its logits with output_logit_soft_cap (30 by default), a transform the trainer does not know
    with pytest.raises(
        models.ModelError, match=r"xLSTMForCausalLM \(model_type 'xlstm'\) sets output_logit_soft_cap=30"
    ):
        Trainer(small(tmp_path, model=_save(tmp_path, "xlstm"), attn_implementation="eager"))


def test_a_transform_the_config_does_not_describe_is_refused_by_the_check_on_the_model():
    model = tiny_model("granite", logits_scaling=8.0)
    model.get_output_embeddings().register_forward_hook(lambda mod, args, out: out + 1.0 * torch.arange(out.shape[-1]))
    with pytest.raises(
        models.ModelError, match=r"GraniteForCausalLM's own log-probs differ by up to .*logits_scaling=8"
    ):
        models.logit_head(model)


@pytest.mark.parametrize(
    "model_type,fields", [("gemma2", dict(final_logit_softcapping=3.0)), ("granite", dict(logits_scaling=8.0))]
)
def test_reference_logprobs_equal_the_frozen_models_own_log_softmax(tmp_path, model_type, fields):
    # grpo with a KL keeps a frozen reference model; its log-probs go through the same head as the policy's
    cfg = small(tmp_path, model=_save(tmp_path, model_type, **fields), attn_implementation="eager")
    cfg.method, cfg.grpo_kl_beta, cfg.micro_batch_prompts = "grpo", 0.1, 1
    trainer = Trainer(cfg)
    rollout = trainer.rollout(trainer.prompts_for_step(1), 1)
    got = trainer.reference_logps(rollout)
    assert len(got) == rollout.rewards.shape[0]  # one (S, T) per micro-batch of one prompt
    for p, logp in enumerate(got):
        ids, mask, targets = build_batch(
            rollout, range(p, p + 1), trainer.tokenizer.pad_token_id, trainer.runtime.device
        )
        want = own_logprobs(trainer.reference_model, ids, mask, targets)
        torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
