"""LoRA through peft on the built-in tiny MoE: only the adapters train, the lm_head still feeds the fused loss,
checkpoints hold the adapter, which reloads onto the base and resumes (CPU, seconds per test)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from utils import read_lines, small  # noqa: E402

import grao_kernels.backends as kernel_backends  # noqa: E402
from grao import cli, models  # noqa: E402
from grao.config import ConfigError  # noqa: E402
from grao.eval import evaluate  # noqa: E402
from grao.models.generation import encode_prompt  # noqa: E402
from grao.train.checkpoint import latest as latest_checkpoint  # noqa: E402
from grao.train.trainer import TIME_KEYS, Trainer  # noqa: E402

LORA = dict(lora_rank=4, lora_alpha=8.0)


needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed (train extra)")


def _base_state(trainer) -> dict[str, torch.Tensor]:
    """The base model's parameters by name (adapters left out), cloned."""
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}


def _adapter_state(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@needs_peft
def test_lora_trains_only_the_adapters_and_the_head_gets_no_weight_gradient(tmp_path, monkeypatch, capsys):
    needs = []
    real_module = kernel_backends.module

    class Spy:  # records which gradients each kernel gradient sweep was asked for
        def __init__(self, mod):
            self.mod = mod

        def __getattr__(self, name):
            return getattr(self.mod, name)

        def grad(self, *args, needs: tuple, **kwargs):
            seen.append(needs)
            return self.mod.grad(*args, needs=needs, **kwargs)

    seen = needs
    monkeypatch.setattr(kernel_backends, "module", lambda name: Spy(real_module(name)))

    import peft

    trainer = Trainer(small(tmp_path, steps=3, **LORA))
    assert isinstance(trainer.model, peft.PeftModel)
    head_before = models.output_head(models.unwrap(trainer.model))[0].detach().clone()
    base_before, adapters_before = _base_state(trainer), _adapter_state(trainer)
    assert adapters_before, "no LoRA adapter was added"
    assert any(".q_proj." in n for n in adapters_before) and any(".experts." in n for n in adapters_before)
    assert trainer.train() is True

    base_after, adapters_after = _base_state(trainer), _adapter_state(trainer)
    assert base_after.keys() == base_before.keys()
    for name, before in base_before.items():
        assert torch.equal(before, base_after[name]), f"frozen base parameter {name} changed"
    head_after = models.output_head(models.unwrap(trainer.model))[0]
    assert torch.equal(head_before, head_after)
    assert any(not torch.equal(adapters_before[n], adapters_after[n]) for n in adapters_before if "lora_B" in n)

    # the lm_head weight reached the fused loss, which computed the hidden-state gradient only
    assert needs and all(n == (True, False, False) for n in needs), needs

    adapter_numel = sum(p.numel() for p in adapters_after.values())
    total = sum(p.numel() for p in trainer.model.parameters())
    assert trainer.trainable_params == adapter_numel
    assert trainer.total_params == total
    start = read_lines(tmp_path / "run")[0]
    assert start["step"] == 0 and start["params/trainable"] == adapter_numel and start["params/total"] == total
    assert f"trainable parameters: {adapter_numel:,} of {total:,}" in capsys.readouterr().err


@needs_peft
def test_saved_adapter_reloads_onto_the_base_and_reproduces_the_trained_logits(tmp_path, monkeypatch, capsys):
    trainer = Trainer(small(tmp_path, steps=2, max_new_tokens=3, eval_greedy=False, temperature=0.9, **LORA))
    assert trainer.train() is True
    ckpt = latest_checkpoint(tmp_path / "run")
    assert models.is_adapter(ckpt)
    assert not (ckpt / "model.safetensors").exists()  # the adapter only, not a copy of the frozen base

    import peft

    base = models.load_model(tmp_path / "run" / "initial")
    reloaded = peft.PeftModel.from_pretrained(base, ckpt)
    ids = (torch.arange(3, 11) % len(trainer.tokenizer))[None]
    torch.testing.assert_close(_logits(reloaded, ids), _logits(trainer.model, ids), rtol=1e-5, atol=1e-6)
    # and the adapter matters: the bare base gives other logits
    with reloaded.disable_adapter():
        assert not torch.allclose(_logits(reloaded, ids), _logits(trainer.model, ids), atol=1e-4)

    # grao eval loads the adapter onto the run's base and generates with the run's settings, also when given
    # only the checkpoint
    calls = []
    real_evaluate = evaluate.evaluate

    def spy(model, *args, **kwargs):
        calls.append((type(model).__name__, kwargs))
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate", spy)
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(tmp_path / "run")]) == 0
    assert cli.main(["eval", "--model", str(ckpt)]) == 0
    assert [name for name, _ in calls] == ["PeftModel", "Qwen3MoeForCausalLM"] * 2  # the checkpoint, then initial/
    for _, kwargs in calls:
        assert (kwargs["max_new_tokens"], kwargs["greedy"], kwargs["temperature"]) == (3, False, 0.9)
    err = capsys.readouterr().err
    assert err.count("generating up to 3 new tokens, sampling at temperature 0.9, as set by the run's") == 2


@needs_peft
def test_resume_from_a_lora_checkpoint_matches_an_uninterrupted_run(tmp_path):
    import peft

    full = Trainer(small(tmp_path / "a", steps=3, **LORA))
    assert full.train() is True

    torch.manual_seed(123)  # the adapters' initialisation must come from the config's seed, not the global RNG
    cfg = small(tmp_path / "b", steps=3, **LORA)
    stop_after_two = [lambda trainer, step, metrics: step == 2 and trainer.request_stop()]
    assert Trainer(cfg, callbacks=stop_after_two).train() is False
    resumed = Trainer(cfg, resume=True)
    assert isinstance(resumed.model, peft.PeftModel)
    assert resumed.step == 2
    assert resumed.trainable_params == full.trainable_params
    assert resumed.train() is True

    lines_a, lines_b = read_lines(tmp_path / "a" / "run"), read_lines(tmp_path / "b" / "run")
    assert [ln["step"] for ln in lines_a] == [ln["step"] for ln in lines_b]
    for la, lb in zip(lines_a, lines_b):
        for k in la.keys() - set(TIME_KEYS):
            assert la[k] == pytest.approx(lb[k], rel=1e-5, abs=1e-6), (la["step"], k)
    for (name, pa), pb in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


@needs_peft
def test_lora_targets_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="lm_head"):
        small(tmp_path, lora_rank=4, lora_target_modules="q_proj,lm_head")
    with pytest.raises(ConfigError, match="lora.dropout"):
        small(tmp_path, lora_rank=4, lora_dropout=1.0)
    with pytest.raises(ConfigError, match="router_bias_update_rate"):
        small(tmp_path, lora_rank=4, router_bias_update_rate=0.001)
    with pytest.raises(models.ModelError, match="no_such_proj"):
        Trainer(small(tmp_path, lora_rank=4, lora_target_modules="no_such_proj"))


TEMPLATE = "<eos>{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"


def test_chat_template_renders_prompts_only_when_switched_on(tmp_path):
    tok = models.build_demo_tokenizer()
    plain = encode_prompt(tok, "cab=", 512)
    assert encode_prompt(tok, "cab=", 512, chat_template=True) == plain  # no template: the prompt as written
    tok.chat_template = TEMPLATE
    rendered = tok("<eos>cab==", add_special_tokens=False)["input_ids"]
    assert rendered[0] == tok.eos_token_id and len(rendered) == len(plain) + 2
    assert encode_prompt(tok, "cab=", 512, chat_template=True) == rendered
    assert encode_prompt(tok, "cab=", 512) == plain
    assert encode_prompt(tok, "cab=", 3, chat_template=True) == rendered[-3:]

    tok.save_pretrained(tmp_path / "tok")
    trainer = Trainer(small(tmp_path, tokenizer=str(tmp_path / "tok"), chat_template=True))
    examples = trainer.prompts_for_step(1)
    rollout = trainer.rollout(examples, 1)
    for ex, ids in zip(examples, rollout.prompt_ids):
        assert ids == encode_prompt(trainer.tokenizer, ex.prompt, 512, chat_template=True)
        assert ids[0] == trainer.tokenizer.eos_token_id and ids != encode_prompt(trainer.tokenizer, ex.prompt, 512)


@needs_peft
def test_bf16_base_with_fp32_adapters_trains_with_checkpointing_and_micro_batches(tmp_path):
    cfg = small(tmp_path, steps=1, lora_base_dtype="bf16", gradient_checkpointing=True, micro_batch_prompts=1, **LORA)
    trainer = Trainer(cfg)
    adapters = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert {p.dtype for p in adapters.values()} == {torch.float32}
    assert {p.dtype for n, p in trainer.model.named_parameters() if n not in adapters} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in adapters.items()}
    assert trainer.train() is True
    line = [ln for ln in read_lines(tmp_path / "run") if "loss" in ln][0]
    assert torch.isfinite(torch.tensor(line["loss"])) and line["grad_norm"] > 0
    assert any(not torch.equal(before[n], p) for n, p in adapters.items())
