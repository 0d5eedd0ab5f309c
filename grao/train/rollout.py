"""Rollout: which prompts a step trains on, sampling G completions of each and scoring them and the prompt's
reference answer with the reward."""

from __future__ import annotations

import numpy as np
import torch

from ..data import Example
from ..eval import rewards
from ..models import generation
from ..models.generation import encode_prompt, encode_reference
from .batch import Rollout
from .engines import sampling_seed


class PromptOrder:
    """The P examples of each step (1-based): consecutive slices of per-epoch permutations seeded by (seed, epoch),
    so a resumed run sees the same prompts."""

    def __init__(self, examples: list[Example], per_step: int, seed: int):
        self.examples, self.per_step, self.seed = examples, per_step, seed
        self._cache: tuple[int, np.ndarray] | None = None

    def __call__(self, step: int) -> list[Example]:
        n, P = len(self.examples), self.per_step
        out = []
        for i in range((step - 1) * P, step * P):
            epoch, pos = divmod(i, n)
            out.append(self.examples[self._permutation(epoch)[pos]])
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
        return self._cache[1]


def sample_and_score(
    engine, tokenizer, examples: list[Example], reward, cfg, step: int, rank: int, rejected: str, max_prompt_tokens: int
):
    """Sample G completions per prompt with the rollout ``engine`` (:mod:`grao.train.engines`; seeded by step and
    rank, so a resumed run samples the same), then score them and each prompt's reference answer; a
    :class:`Rollout` with rewards (P, G+1), the reference's last, and the engine's log-probs of the samples.

    dpo on the data's preference pairs (``rejected == "data"``) samples nothing: each group's one completion
    (G = 1) is the example's rejected answer, ended by eos like the reference. Prompts keep their last
    ``max_prompt_tokens`` tokens (what the model's context leaves, :func:`grao.data.context_limits.prompt_budget`).
    """
    G = cfg.rollout.group_size
    prompt_ids = [encode_prompt(tokenizer, ex.prompt, max_prompt_tokens, cfg.dataset.chat_template) for ex in examples]
    sampled_logps = None
    if rejected == "data":
        G, texts = 1, [ex.rejected for ex in examples]
        sampled = [encode_reference(tokenizer, text) for text in texts]
    else:
        sampled, sampled_logps = engine.sample(
            prompt_ids,
            n=G,
            temperature=cfg.rollout.temperature,
            max_new_tokens=cfg.rollout.max_new_tokens,
            seed=sampling_seed(cfg.run.seed, step, rank),
        )
        texts = generation.decode(tokenizer, sampled)
    prompts, refs = [ex.prompt for ex in examples], [ex.reference for ex in examples]
    sample_rewards = rewards.score(
        reward, [p for p in prompts for _ in range(G)], texts, [r for r in refs for _ in range(G)]
    )
    ref_rewards = rewards.score(reward, prompts, refs, refs)
    r = torch.tensor(sample_rewards, dtype=torch.float32).view(len(examples), G)
    r = torch.cat([r, torch.tensor(ref_rewards, dtype=torch.float32)[:, None]], dim=1)
    completion_ids = [sampled[p * G : (p + 1) * G] + [encode_reference(tokenizer, ref)] for p, ref in enumerate(refs)]
    completions = [texts[p * G : (p + 1) * G] for p in range(len(examples))]
    logps = None if sampled_logps is None else [sampled_logps[p * G : (p + 1) * G] for p in range(len(examples))]
    return Rollout(prompt_ids, completion_ids, r, completions, logps)
