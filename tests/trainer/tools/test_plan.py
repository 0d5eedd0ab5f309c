"""``grao plan``: exact parameter counts of the presets, the memory parts' arithmetic, and the plan's step memory
checked against the peak measured while the trainer takes real steps on the tiny models on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from grao import cli, config
from grao.tools import plan
from grao_kernels.testing import peak_meter

ROOT = Path(__file__).resolve().parents[3]
PAPER = ROOT / "configs" / "paper_hh_qwen2.5-7b.yaml"
# A dense Llama large enough that its step memory stands well above the process's allocator noise.
LLAMA = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# P prompts, G samples each plus the reference, prompt and completion lengths of the fixed rollout measured.
P, G, PROMPT, COMPLETION = 8, 7, 24, 40


def test_preset_parameter_counts_are_the_published_models():
    # Qwen2.5-7B: 7,615,616,512 parameters (its model card's 7.61B); Moonlight-16B-A3B: 15.96B.
    qwen = plan.architecture("qwen2.5-7b")
    assert qwen.params == 7_615_616_512
    assert qwen.embed_head == 2 * 152064 * 3584 + 3584
    moon = plan.architecture("moonlight-16b-a3b")
    assert 15.9e9 < moon.params < 16.0e9
    assert moon.mlp_dims[0] == 11264 and set(moon.mlp_dims[1:]) == {0}  # the first layer dense, then MoE
    assert (moon.experts, moon.top_k, moon.shared_intermediate) == (64, 6, 2 * 1408)


def test_sharding_divides_the_state_and_options_include_one_that_fits():
    arch = plan.architecture("qwen2.5-7b")
    one = plan.plan(arch, plan.Settings(devices=8, fsdp=1, prompts_per_step=64, micro_batch_prompts=1, seq_len=2560))
    eight = plan.plan(arch, replace(one.settings, fsdp=8))
    assert one.parameters == arch.params * 4 and one.optimizer == arch.params * 8
    assert eight.parameters == arch.params * 4 // 8 and eight.gradients == arch.params * 4 // 8
    assert eight.fsdp_buffers == (arch.embed_head + 2 * arch.largest_layer) * 4
    bf16 = plan.plan(arch, replace(one.settings, param_dtype="bf16"))
    assert bf16.parameters == arch.params * 2 and bf16.optimizer == arch.params * 12  # m, v and the fp32 master
    ckpt = plan.plan(arch, replace(one.settings, gradient_checkpointing=True))
    assert ckpt.activations < one.activations / 10
    lora = plan.plan(arch, replace(one.settings, lora_rank=16))
    assert lora.trainable == 16 * arch.lora_per_rank and lora.optimizer == lora.trainable * 8
    # the avoided logits: 2 x fp32 (N, V) with N = micro-batch prompts x (G + 1) x T
    assert one.full_logits_avoided == 2 * 4 * 1 * 9 * 2560 * 152064
    assert one.loss_workspace < one.full_logits_avoided / 10
    fitting = [p.settings for p in plan.options(arch, one.settings) if p.fits()]
    assert not one.fits() and replace(one.settings, fsdp=8, gradient_checkpointing=True) in fitting


@pytest.mark.parametrize(
    "method, extra, keeps",
    [
        ("grao", {}, False),
        ("sft", {}, False),
        ("grpo", {}, False),
        ("grpo", {"grpo_kl_beta": 0.04}, True),
        ("dpo", {}, True),
        ("ppo", {}, True),
    ],
)
def test_the_frozen_reference_model_is_planned_for_the_methods_that_keep_one(tmp_path, method, extra, keeps):
    from grao.train.trainer import Trainer

    cfg = config.TrainConfig(method=method, **extra, progress=False, plot=False, output_dir=str(tmp_path / "run"))
    s = plan.settings_from_config(cfg, devices=8, memory_gb=80)
    assert s.reference_model is keeps
    arch = plan.architecture(cfg.model)
    got = plan.plan(arch, s)
    without = plan.plan(arch, replace(s, reference_model=False))
    assert got.step_total - without.step_total == got.reference == (arch.params * 4 // 8 if keeps else 0)
    assert plan.plan(arch, replace(s, cpu_offload=True)).reference == 0  # offloaded with the rest
    if keeps:  # the bytes of the trainer's own frozen model, in one process
        trainer = Trainer(cfg)
        frozen = sum(t.numel() * t.element_size() for t in trainer.reference_model.parameters())
        assert plan.plan(arch, replace(s, fsdp=1)).reference == frozen
    else:
        assert "frozen reference model" not in plan.markdown(arch, got, [])


def test_plan_cli_paper_config_on_8x80_uses_the_preset_offline(capsys):
    assert cli.main(["plan", "--config", str(PAPER), "--devices", "8", "--memory-gb", "80"]) == 0
    out = capsys.readouterr()
    assert "planning with the preset architecture 'qwen2.5-7b'" in out.err
    assert "### qwen2.5-7b: 7,615,616,512 parameters" in out.out and "| **total**" in out.out
    assert cli.main(["plan", "moonlight-16b-a3b", "--devices", "8", "--memory-gb", "80", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["settings"]["fsdp"] == 8 and data["options"]
    assert data["plan"]["parameters"] == data["architecture"]["params"] * 4 // 8


def test_plan_says_which_rollout_engine_a_run_would_use_and_why(capsys):
    assert cli.main(["plan"]) == 0  # the demo's head_dim 16: no CPU attention kernel of vLLM's
    err = capsys.readouterr().err
    assert "rollout engine (auto) on cuda: " in err
    if importlib.util.find_spec("vllm") is not None:
        assert "cpu: hf (auto: vLLM's CPU attention has no kernel for head_dim 16" in err
        assert cli.main(["plan", "moonlight-16b-a3b"]) == 0
        assert "cuda: hf (auto: vLLM's DeepSeek-V3 (MLA) does not reproduce" in capsys.readouterr().err
    else:
        assert "cpu: hf (auto: vLLM is not installed" in err


def test_plan_cli_rejects_an_unknown_model(capsys):
    assert cli.main(["plan", "no-such-model"]) == cli.EXIT_CONFIG
    assert "neither a preset" in capsys.readouterr().err


def measure(model_dir: str, out_dir: str, checkpointing: bool) -> dict:
    """Train 3 steps on one fixed rollout in this (fresh) process; the peak resident memory above the state after
    the model loaded, and the bytes of the parameters, gradients and optimizer state."""
    from grao.train.trainer import Rollout, Trainer

    torch.set_num_threads(1)
    cfg = config.TrainConfig(
        model=model_dir,
        steps=3,
        prompts_per_step=P,
        group_size=G,
        demo_train_size=32,
        eval_size=4,
        progress=False,
        plot=False,
        loss_backend="torch",
        gradient_checkpointing=checkpointing,
        output_dir=out_dir,
    )
    trainer = Trainer(cfg)
    vocab = trainer.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist()  # noqa: E731 - above the special tokens
    rollout = Rollout(
        prompt_ids=[ids(PROMPT) for _ in range(P)],
        completion_ids=[[ids(COMPLETION) for _ in range(G + 1)] for _ in range(P)],
        rewards=torch.rand(P, G + 1, generator=gen),
        completions=[[""] * G for _ in range(P)],
    )
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    import gc

    gc.collect()
    peak = peak_meter("cpu")
    for _ in range(3):
        trainer.update(rollout)
    measured = peak()
    params = list(trainer.model.parameters())
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if v.dim() > 0]
    return dict(
        peak=measured,
        parameters=nbytes(params),
        gradients=nbytes(p.grad for p in params if p.grad is not None),
        optimizer=nbytes(state),
    )


@pytest.mark.parametrize(
    "kind, checkpointing", [("tiny-moe", False), ("llama", False), ("tiny-moe", True), ("llama", True)]
)
def test_planned_step_memory_is_the_measured_peak_within_20_percent(kind, checkpointing, tmp_path):
    from utils import save_tiny_llama

    model = "tiny-moe"
    if kind == "llama":
        model = str(tmp_path / "llama")
        save_tiny_llama(model, **LLAMA)
    code = (
        f"import sys, json; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}, {str(Path(__file__).parent)!r}]; "
        "import test_plan; "
        f"print(json.dumps(test_plan.measure({model!r}, {str(tmp_path / 'run')!r}, {checkpointing})))"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])

    arch = plan.architecture(model)
    s = plan.Settings(
        prompts_per_step=P,
        group_size=G,
        seq_len=PROMPT + COMPLETION,
        compute_dtype="fp32",
        loss_backend="torch",
        gradient_checkpointing=checkpointing,
    )
    want = plan.plan(arch, s)
    # the state, from the tensors themselves: exact
    assert (want.parameters, want.gradients, want.optimizer) == (got["parameters"], got["gradients"], got["optimizer"])
    # the step: gradients, optimizer state, activations and the loss, above the loaded model
    step = want.gradients + want.optimizer + want.activations + want.loss_workspace
    print(
        f"{kind}, checkpointing {checkpointing}: planned {step / 2**20:.1f} MiB, measured {got['peak'] / 2**20:.1f} MiB"
    )
    assert abs(step - got["peak"]) <= 0.2 * got["peak"], (step, got)


def test_paper_preset_loads_and_validates_offline():
    cfg = config.load(PAPER)
    assert (cfg.group_size, cfg.temperature, cfg.beta, cfg.lam) == (8, 0.7, 0.5, 0.6)
    assert (cfg.lr, cfg.weight_decay, cfg.prompts_per_step, cfg.max_new_tokens) == (1e-6, 0.01, 64, 2048)
    assert cfg.method == "grao" and plan.resolve_model(cfg.model)[0] == "qwen2.5-7b"
