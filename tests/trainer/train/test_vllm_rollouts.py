"""grao train sampling on vLLM (grao.train.engines) on CPU: the engine decodes greedily as the policy does before and
after an optimizer step and its sync (and not while stale), for the tiny MoE and for a dense model under LoRA (its
adapters merged for the sync); its log-probs match the trainer's; the demo trains on it to the hf engine's reward
band; a resumed run samples what an uninterrupted one did; auto says which engine runs and why."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("vllm")

from utils import assert_same_run, read_lines, save_tiny_llama, small  # noqa: E402

from grao import cli  # noqa: E402
from grao.config import ConfigError  # noqa: E402
from grao.models import generation  # noqa: E402
from grao.train import engines  # noqa: E402
from grao.train.checkpoint import latest as latest_checkpoint  # noqa: E402
from grao.train.trainer import Trainer  # noqa: E402

# vLLM's CPU attention has no head_dim 16 (the demo model's): the tests give the tiny MoE 32; a small KV cache.
VLLM = dict(rollout_engine="vllm", vllm_kv_cache_bytes=32 << 20)
HEAD_32 = {"head_dim": 32}


def greedy_both(trainer, n_tokens: int) -> tuple[list, list]:
    """(the engine's, the policy's own) greedy completions of the held-out prompts."""
    prompts = [
        generation.encode_prompt(trainer.tokenizer, ex.prompt, trainer.max_prompt_tokens)
        for ex in trainer.eval_examples
    ]
    on_engine = trainer.engine.respond(prompts, greedy=True, temperature=1.0, max_new_tokens=n_tokens, seed=0)
    on_policy = trainer.policy.generate(trainer.tokenizer, prompts, sample=False, max_new_tokens=n_tokens)
    return on_engine, on_policy


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for s, t in zip(a, b) for x, y in zip(s, t))
    return same / max(1, sum(max(len(s), len(t)) for s, t in zip(a, b)))


def check_sync_after_a_step(trainer) -> dict:
    """Greedy equality before training; one training step; the stale engine disagrees, the synced one agrees.
    Returns the step's metrics."""
    trainer.engine.sync(trainer.model)
    engine_out, policy_out = greedy_both(trainer, 8)
    assert engine_out == policy_out
    metrics = trainer.train_step(1)
    assert trainer.engine.stale
    trainer.engine.stale = False  # generate on the weights from before the step
    stale_out, policy_out = greedy_both(trainer, 8)
    assert agreement(stale_out, policy_out) < 0.9, "the step did not change the greedy completions: no test"
    trainer.engine.stale = True
    assert trainer.engine.sync(trainer.model) > 0
    engine_out, policy_out = greedy_both(trainer, 8)
    assert engine_out == policy_out
    return metrics


def test_moe_engine_decodes_as_the_policy_after_a_step_and_sync_and_its_logprobs_match(tmp_path):
    # log-probs at the sampling temperature (0.7): the engine's temperature-scaled ones (the demo test below
    # compares those of the model's own distribution, logprob_temperature 1)
    cfg = small(
        tmp_path,
        **VLLM,
        model_overrides=HEAD_32,
        lr=0.05,
        eval_size=16,
        max_new_tokens=8,
        logprob_temperature="sampling",
    )
    trainer = Trainer(cfg)
    assert isinstance(trainer.engine, engines.VLLMEngine)
    metrics = check_sync_after_a_step(trainer)
    trainer.close()
    # the step's sampled rollout: the engine's log-probs of its tokens against the loss's (fp32)
    assert 0 <= metrics["rollout/logp_gap"] <= 1e-3
    assert metrics["time/sync"] >= 0


def test_fsdp_sharded_policy_is_gathered_layer_by_layer_into_the_engine(tmp_path):
    cfg = small(
        tmp_path, **VLLM, model_overrides=HEAD_32, lr=0.05, eval_size=16, max_new_tokens=8, fsdp_cpu_offload=True
    )
    trainer = Trainer(cfg)
    assert trainer.sharding is not None
    check_sync_after_a_step(trainer)
    trainer.close()


def test_lora_dense_model_syncs_its_merged_adapters(tmp_path):
    save_tiny_llama(tmp_path / "llama", head_dim=32, max_position_embeddings=64)
    cfg = small(
        tmp_path,
        **VLLM,
        model=str(tmp_path / "llama"),
        lora_rank=4,
        lr=0.2,
        eval_size=16,
        max_new_tokens=8,
        lora_target_modules="q_proj,v_proj,up_proj,down_proj",
    )
    trainer = Trainer(cfg)
    check_sync_after_a_step(trainer)
    trainer.close()
    # the model itself was never merged: its adapters are still separate and trainable
    assert any("lora_B" in n and p.requires_grad and p.abs().sum() > 0 for n, p in trainer.model.named_parameters())


@pytest.mark.slow
def test_demo_trains_on_vllm_to_the_hf_reward_band_and_resumes_with_the_same_samples(tmp_path, capsys):
    """The demo task on the vLLM engine reaches the held-out reward the hf engine reaches in as many steps (same
    model, same seed); a run interrupted after 20 steps and resumed writes the same lines as the uninterrupted one
    (the engine's per-request seeds come from (seed, step, rank, prompt))."""
    steps = ["--steps", "40", "--eval-every", "20", "--save-every", "20", "--progress", "false"]
    model = ["--model-overrides", json.dumps(HEAD_32)]
    flags = [*model, "--rollout-engine", "vllm", "--vllm-kv-cache-bytes", str(32 << 20)]
    full = tmp_path / "full"
    assert cli.main(["train", "--output-dir", str(full), *steps, *flags]) == 0
    assert "rollout engine: vLLM" in capsys.readouterr().err
    assert cli.main(["train", "--output-dir", str(tmp_path / "hf"), *steps, *model, "--rollout-engine", "hf"]) == 0

    def final(run):
        evals = [ln for ln in read_lines(run) if "eval/reward" in ln]
        assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
        return evals[0]["eval/reward"], evals[-1]["eval/reward"]

    (start, on_vllm), (_, on_hf) = final(full), final(tmp_path / "hf")
    assert on_vllm > start + 0.25 and abs(on_vllm - on_hf) <= 0.15, (start, on_vllm, on_hf)
    assert all(0 <= ln["rollout/logp_gap"] <= 1e-3 for ln in read_lines(full) if "loss" in ln)

    part = tmp_path / "part"
    assert cli.main(["train", "--output-dir", str(part), *steps, *flags, "--steps", "20"]) == 0
    assert latest_checkpoint(part).name == "step-000020"
    assert cli.main(["train", "--output-dir", str(part), *steps, *flags, "--resume"]) == 0
    assert_same_run(full, part)


def test_auto_falls_back_to_hf_for_the_demo_model_and_says_why(tmp_path, capsys):
    trainer = Trainer(small(tmp_path, rollout_engine="auto"))
    assert trainer.engine.name == "hf"
    err = capsys.readouterr().err
    assert "rollout engine: hf, transformers' generate (auto: vLLM's CPU attention has no kernel for head_dim 16" in err
    with pytest.raises(ConfigError, match="'rollout_engine' vllm: vLLM's CPU attention has no kernel for head_dim 16"):
        Trainer(small(tmp_path / "b", rollout_engine="vllm"))
