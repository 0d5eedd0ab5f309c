"""Held-out evaluation: mean reward, RAS and NAG as defined in arXiv 2508.07750 (Sec. 4.1).

Per prompt, two responses are compared by their rewards: a win, a tie (equal
rewards) or a loss. Over n prompts:

- RAS (response alignment score), against the prompt's reference answer:
  ``RAS = (wins + ties) / n``, in [0, 1]: the share of responses at least as
  good as the reference.
- NAG (net alignment gain), the trained model against the starting model:
  ``NAG = (wins - losses) / n``, in [-1, 1]: negative when training made more
  responses worse than better.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Example
from ..models import generation
from . import rewards


def win_tie_loss(rewards: list[float], other: list[float], name: str) -> tuple[int, int, int]:
    """Counts of prompts where ``rewards`` beats, ties and loses to ``other`` (paired by position)."""
    if len(rewards) != len(other) or not rewards:
        raise ValueError(
            f"{name} needs two equally long, non-empty reward lists, got {len(rewards)} and {len(other)} values"
        )
    wins = sum(a > b for a, b in zip(rewards, other))
    ties = sum(a == b for a, b in zip(rewards, other))
    return wins, ties, len(rewards) - wins - ties


def ras(model_rewards: list[float], reference_rewards: list[float]) -> float:
    """(wins + ties) / n of the model's responses against the reference answers."""
    wins, ties, _ = win_tie_loss(model_rewards, reference_rewards, "ras")
    return (wins + ties) / len(model_rewards)


def nag(trained_rewards: list[float], baseline_rewards: list[float]) -> float:
    """(wins - losses) / n of the trained model's responses against the starting model's."""
    wins, _, losses = win_tie_loss(trained_rewards, baseline_rewards, "nag")
    return (wins - losses) / len(trained_rewards)


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
    chat_template: bool = False,
    engine=None,
) -> list[str]:
    """The model's response to each example; ``engine``: a rollout engine with ``respond`` (the vLLM one,
    :class:`grao.train.engines.VLLMEngine`, in sync with ``model``) answers instead of ``model.generate``."""
    prompt_ids = [generation.encode_prompt(tokenizer, ex.prompt, max_prompt_tokens, chat_template) for ex in examples]
    if engine is not None:
        ids = engine.respond(
            prompt_ids, greedy=greedy, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed
        )
        return generation.decode(tokenizer, ids)
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
