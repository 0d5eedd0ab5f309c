"""Our fused log-probs inside verl's actor: the forward that ``patch_verl_model`` / ``patch_verl`` install gives the
log-probs and entropies (and their gradients) of verl's own paths, the fused ``forward_with_torch_backend`` and the
logits path (``logprobs_from_logits`` / ``entropy_from_logits``), and of a float64 recomputation from the logits."""

from __future__ import annotations

import copy

import pytest
import torch
from utils import FP32_GRAD_REL_L2, TINY_DECODER, rel_l2

pytest.importorskip("verl.trainer.ppo.core_algos")
pytest.importorskip("transformers")

from verl.models.transformers import dense_common  # noqa: E402
from verl.models.transformers.monkey_patch import patch_forward_with_backends  # noqa: E402
from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits  # noqa: E402

from grao_kernels.integrations import verl as grao_verl  # noqa: E402

V = 331  # odd, so no kernel tile divides it


def tiny_model(seed=0, bias=False):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**{**TINY_DECODER, "tie_word_embeddings": False}, vocab_size=V, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if bias:  # verl's own fused forwards ignore an lm_head bias; ours reads it
        model.lm_head.bias = torch.nn.Parameter(torch.randn(V) * 0.5)
    # A class of its own: verl's patch_forward_with_backends patches the model's class, not the instance.
    model.__class__ = type("TinyQwen3ForTest", (type(model),), {})
    return model


def batch(B=3, T=11, seed=1):
    """Right-padded rows of varying length and their positions, as verl's actor passes them without rmpad."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([T, T - 4, 5])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}


def run(model, forward, inputs, temperature, coefs):
    """(log_probs, entropy, grads of every parameter) of one forward and a backward of a weighted sum of both."""
    model.zero_grad(set_to_none=True)
    logp, ent = forward(model, inputs, temperature)
    ((logp * coefs[0]).sum() + (ent * coefs[1]).sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


def fused(model, inputs, temperature):
    out = model(**inputs, temperature=temperature, return_dict=True)
    return out.log_probs, out.entropy


def verl_fused(model, inputs, temperature):
    out = dense_common.forward_with_torch_backend(model, **inputs, temperature=temperature, return_dict=True)
    return out.log_probs, out.entropy


def verl_logits(model, inputs, temperature):
    """verl's actor without fused kernels: the full logits, scaled, then logprobs_from_logits / entropy_from_logits."""
    logits = model(**inputs).logits / temperature
    labels = torch.roll(inputs["input_ids"], shifts=-1, dims=-1)
    return logprobs_from_logits(logits, labels, inplace_backward=False), entropy_from_logits(logits)


def float64(model, inputs, temperature):
    logits = model.double()(**inputs).logits.double() / temperature
    logp_all = logits.log_softmax(-1)
    labels = torch.roll(inputs["input_ids"], shifts=-1, dims=-1)
    return logp_all.gather(-1, labels[..., None])[..., 0], -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_patched_forward_matches_verl_and_float64(temperature):
    model = tiny_model()
    inputs = batch()
    g = torch.Generator().manual_seed(2)
    coefs = (torch.randn(3, 11, generator=g), torch.randn(3, 11, generator=g))
    ours_model = grao_verl.patch_verl_model(copy.deepcopy(model), backend="torch")
    lp, ent, grads = run(ours_model, fused, inputs, temperature, coefs)
    assert lp.shape == ent.shape == (3, 11)
    for reference in (verl_fused, verl_logits):
        lp_v, ent_v, grads_v = run(copy.deepcopy(model), reference, inputs, temperature, coefs)
        torch.testing.assert_close(lp, lp_v, rtol=0, atol=1e-5)
        torch.testing.assert_close(ent, ent_v, rtol=0, atol=1e-5)
        assert grads.keys() == grads_v.keys()
        for name in grads:
            assert rel_l2(grads[name], grads_v[name]) < FP32_GRAD_REL_L2, (reference.__name__, name)
    lp64, ent64, grads64 = run(copy.deepcopy(model), float64, inputs, temperature, [c.double() for c in coefs])
    torch.testing.assert_close(lp.double(), lp64, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent64, rtol=0, atol=1e-5)
    for name in grads:
        assert rel_l2(grads[name], grads64[name]) < FP32_GRAD_REL_L2, name


def test_patched_forward_scores_shift_labels_and_the_head_bias():
    """verl's remove-padding path packs the rows into one and passes the rolled labels as shift_labels."""
    model = tiny_model(bias=True)
    inputs = batch()
    keep = inputs["attention_mask"].bool()
    packed = {
        "input_ids": inputs["input_ids"][keep][None],
        "position_ids": inputs["position_ids"][keep][None],
    }
    shift = torch.roll(packed["input_ids"], shifts=-1, dims=-1)
    shift[0, 3] = 7  # any label: it is scored as given, not re-derived from input_ids
    grao_verl.patch_verl_model(model, backend="torch")
    out = model(**packed, shift_labels=shift, temperature=0.9, return_dict=True)
    with torch.no_grad():
        hidden = model.model(**packed).last_hidden_state
        logp_all = ((model.lm_head(hidden)).double() / 0.9).log_softmax(-1)
    expected = logp_all.gather(-1, shift[..., None])[..., 0]
    torch.testing.assert_close(out.log_probs.double(), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="return_dict"):
        model(**packed, temperature=1.0)


def test_patch_verl_replaces_verls_torch_fused_backend(monkeypatch):
    monkeypatch.setattr(dense_common, "forward_with_torch_backend", dense_common.forward_with_torch_backend)
    model = tiny_model()
    inputs = batch()
    expected = verl_logits(copy.deepcopy(model), inputs, 0.8)
    grao_verl.patch_verl(backend="torch")
    # what verl's FSDP engine does with use_fused_kernels=True, fused_kernel_options.impl_backend=torch
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    assert type(model).forward.__module__ == grao_verl.__name__
    out = model(**inputs, temperature=0.8, return_dict=True)
    torch.testing.assert_close(out.log_probs, expected[0].detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy, expected[1].detach(), rtol=0, atol=1e-5)
