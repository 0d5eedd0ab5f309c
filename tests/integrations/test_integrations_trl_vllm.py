"""GRAOTrainer sampling with an in-process vLLM engine (``use_vllm=True, vllm_mode="colocate"``): it trains, its loss
and gradients on a captured vLLM-generated batch equal the float64 GRAO oracle's, the engine runs in the policy's
float32 and follows the policy's weights after an optimizer step. One engine for the module (~20 s to start)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("vllm")
pytest.importorskip("datasets")

from test_integrations_trl import assert_step_matches_oracle, grao_trainer  # noqa: E402

from grao.models import build_demo_tokenizer, tiny_moe  # noqa: E402

# vLLM's CPU attention has no head_dim 16 (the demo model's); 32 is its smallest
ENGINE_MOE = {"head_dim": 32}
MAX_STEPS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A GRAOTrainer on the tiny Qwen3-MoE sampling with vLLM, after ``train()`` (2 optimizer steps)."""
    tok = build_demo_tokenizer()
    trainer = grao_trainer(
        "moe",
        tok,
        tmp_path_factory.mktemp("grao-vllm"),
        model=tiny_moe(tok, overrides=ENGINE_MOE),
        use_vllm=True,
        vllm_mode="colocate",
        max_steps=MAX_STEPS,
    )
    trainer.train()
    return trainer


def sample(trainer, prompts, **params):
    """The engine's completions (token ids) and their per-token log-probs, one request per prompt."""
    from vllm import SamplingParams

    llm = trainer.vllm_generation.llm
    sp = SamplingParams(max_tokens=8, logprobs=0, stop_token_ids=trainer.eos_token_ids, **params)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=sp, use_tqdm=False)
    completions = [list(o.outputs[0].token_ids) for o in outs]
    logps = [[next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs] for o in outs]
    return completions, logps


def policy_gap(trainer, prompts) -> float:
    """max |engine - policy| over the log-probs of the tokens the engine samples at temperature 1."""
    completions, engine = sample(trainer, prompts, temperature=1.0, seed=0)
    gap = 0.0
    with torch.no_grad():
        for p, c, e in zip(prompts, completions, engine):
            ids = torch.tensor([p + c])
            logits = trainer.model(input_ids=ids).logits[0, len(p) - 1 : -1].double()
            logp = logits.log_softmax(-1).gather(1, torch.tensor(c)[:, None])[:, 0]
            gap = max(gap, (logp - torch.tensor(e, dtype=torch.float64)).abs().max().item())
    return gap


def prompt_ids(trainer, n=8):
    data = trainer.train_dataset.select(range(n))
    return [trainer.processing_class(x["prompt"], add_special_tokens=False)["input_ids"] for x in data]


def test_engine_runs_in_float32_and_follows_the_policy(trained):
    trainer = trained
    assert trainer.vllm_generation.llm.llm_engine.model_config.dtype == torch.float32  # TRL's default: bfloat16
    prompts = prompt_ids(trainer)
    trainer.model.eval()
    # train() synced the engine before its last generation, then took one more optimizer step: the engine is stale
    assert trainer._last_loaded_step == MAX_STEPS - 1 and trainer.state.global_step == MAX_STEPS
    stale = policy_gap(trainer, prompts)
    assert stale > 1e-3, stale
    trainer.vllm_generation.sync_weights()
    assert policy_gap(trainer, prompts) < 1e-4
    greedy, _ = sample(trainer, prompts, temperature=0.0)
    eos, pad = trainer.eos_token_ids, trainer.processing_class.pad_token_id
    for p, g in zip(prompts, greedy):
        out = trainer.model.generate(
            torch.tensor([p]), do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=pad
        )
        assert out[0, len(p) :].tolist() == g


def test_grao_trainer_with_vllm_trains_and_its_loss_equals_the_oracle(trained):
    trainer = trained
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == MAX_STEPS and len(logs) == MAX_STEPS
    assert all(math.isfinite(h["loss"]) and h["grao/reward_reference"] > 0.4 for h in logs)
    # TRL's sampling/training mismatch: the engine's log-probs of the sampled tokens against the policy's
    assert all(h["sampling/sampling_logp_difference/max"] < 1e-4 for h in logs)
    # a generation batch sampled by the engine (synced after the last step), shuffled and split by TRL
    assert_step_matches_oracle(trainer, moe=True, temperature=1.0)
    assert trainer._last_loaded_step == trainer.state.global_step


def test_colocated_vllm_refuses_what_it_cannot_run(tmp_path):
    tok = build_demo_tokenizer()
    with pytest.raises(ValueError, match="vllm_mode='colocate'"):
        grao_trainer("moe", tok, tmp_path, model=tiny_moe(tok, overrides=ENGINE_MOE), use_vllm=True, vllm_mode="server")
    # the demo model's head size: refused before any engine is built
    with pytest.raises(ValueError, match="vLLM cannot run this model on cpu: .*head_dim 16"):
        grao_trainer("moe", tok, tmp_path, use_vllm=True, vllm_mode="colocate")
