"""Held-out evaluation: mean reward, RAS and NAG (arXiv 2508.07750, made precise).

- RAS (reference alignment score): share of prompts whose model response gets a
  strictly higher reward than the prompt's reference answer.
- NAG (net alignment gain): share of prompts whose response from the trained
  model gets a strictly higher reward than the starting model's response.
Ties count as no win in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import generation, rewards
from .data import Example


def ras(model_rewards: list[float], reference_rewards: list[float]) -> float:
    if len(model_rewards) != len(reference_rewards) or not model_rewards:
        raise ValueError("ras needs two equally long, non-empty reward lists")
    return sum(m > r for m, r in zip(model_rewards, reference_rewards)) / len(model_rewards)


def nag(trained_rewards: list[float], baseline_rewards: list[float]) -> float:
    if len(trained_rewards) != len(baseline_rewards) or not trained_rewards:
        raise ValueError("nag needs two equally long, non-empty reward lists")
    return sum(t > b for t, b in zip(trained_rewards, baseline_rewards)) / len(trained_rewards)


@dataclass
class EvalResult:
    responses: list[str]
    rewards: list[float]
    reference_rewards: list[float]

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / len(self.rewards)

    @property
    def ras(self) -> float:
        return ras(self.rewards, self.reference_rewards)


def respond(
    model,
    tokenizer,
    examples: list[Example],
    runtime,
    *,
    max_new_tokens: int,
    max_prompt_tokens: int = 512,
    batch_size: int = 64,
    greedy: bool = True,
    temperature: float = 0.7,
    seed: int = 0,
) -> list[str]:
    prompt_ids = [generation.encode_prompt(tokenizer, ex.prompt, max_prompt_tokens) for ex in examples]
    with torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else []):
        torch.manual_seed(seed)
        ids = generation.generate(
            model,
            tokenizer,
            prompt_ids,
            runtime,
            sample=not greedy,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
    return generation.decode(tokenizer, ids)


def evaluate(model, tokenizer, examples: list[Example], reward, runtime, **kwargs) -> EvalResult:
    """Responses to ``examples`` (greedy by default) with their rewards and the references' rewards."""
    responses = respond(model, tokenizer, examples, runtime, **kwargs)
    prompts = [ex.prompt for ex in examples]
    refs = [ex.reference for ex in examples]
    return EvalResult(
        responses, rewards.score(reward, prompts, responses, refs), rewards.score(reward, prompts, refs, refs)
    )
