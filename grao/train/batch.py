"""A step's data on its way to the loss: the rollout (prompts, completions, rewards) and its micro-batches of whole
prompt groups, padded into tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..losses import LossBatch

IGNORE_INDEX = -100


@dataclass
class Rollout:
    """This rank's P prompt groups of one step: each prompt's G sampled completions and its reference answer."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[list[int]]]  # [P][G+1] token ids, the reference last
    rewards: torch.Tensor  # (P, G+1) float32
    completions: list[list[str]]  # [P][G] decoded samples
    sampling_logps: list[list[list[float]]] | None = None  # [P][G] the engine's log-prob of each sampled token


def sampling_logp(rollout: Rollout, groups: range, width: int, device) -> torch.Tensor | None:
    """(S, T) the engine's log-probs of the sampled tokens of ``groups``, laid out like :func:`build_batch`'s
    targets (0 at the reference answers and outside the completions); None when the engine gave none."""
    if rollout.sampling_logps is None:
        return None
    K = len(rollout.completion_ids[groups.start])
    out = torch.zeros((len(groups) * K, width), dtype=torch.float32)
    for i, p in enumerate(groups):
        start = len(rollout.prompt_ids[p]) - 1
        for j, logps in enumerate(rollout.sampling_logps[p]):
            out[i * K + j, start : start + len(logps)] = torch.tensor(logps, dtype=torch.float32)
    return out.to(device)


def build_batch(rollout: Rollout, groups: range, pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, targets) for the sequences of ``groups``, right-padded.

    Position t of a sequence predicts token t + 1, so ``targets[s, t]`` is that
    token where it is a completion token and IGNORE_INDEX elsewhere.
    """
    seqs, starts = [], []
    for p in groups:
        for comp in rollout.completion_ids[p]:
            seqs.append(rollout.prompt_ids[p] + comp)
            starts.append(len(rollout.prompt_ids[p]))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        row = torch.tensor(s, dtype=torch.long)
        ids[i, : len(s)] = row
        mask[i, : len(s)] = 1
        targets[i, start - 1 : len(s) - 1] = row[start:]
    return ids.to(device), mask.to(device), targets.to(device)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of whole prompt groups of this rank's rollout, and what its loss needs of the whole step."""

    groups: range  # this rank's groups (rows of the rollout)
    ids: torch.Tensor  # (S, T) input ids, S = len(groups) * (G+1), group-major, each group's reference last
    mask: torch.Tensor  # (S, T) attention mask
    targets: torch.Tensor  # (S, T) IGNORE_INDEX outside the completion tokens
    rewards: torch.Tensor  # (len(groups), G+1) the rollout's rewards of these groups
    first_group: int  # the step's number of this rank's first group (ranks hold contiguous blocks)
    step_token_counts: torch.Tensor  # (P, G+1) completion tokens of every sequence of the whole step (all ranks')
    old: dict[str, torch.Tensor] | None = None  # the loss's snapshot of the sampling policy (LossBatch.old)
    reference_logp: torch.Tensor | None = None  # (S, T) the frozen reference model's token log-probs
    sampling_logp: torch.Tensor | None = None  # (S, T) the rollout engine's log-probs of the sampled tokens

    @property
    def num_groups(self) -> int:
        """P: prompt groups in the whole step (all ranks')."""
        return self.step_token_counts.shape[0]

    def with_passes(self, old: dict | None, reference_logp: torch.Tensor | None) -> MicroBatch:
        return dataclasses.replace(self, old=old, reference_logp=reference_logp)

    def loss_batch(self, hidden, weight, bias, head: dict) -> LossBatch:
        """What the loss gets: the backbone's ``hidden`` states and the lm_head (``weight``, ``bias``) in the compute
        dtype, ``head`` (the logit transform and log-prob temperature, :attr:`grao.train.policy.Policy.logit_transform`), and
        the group layout of the whole step."""
        return LossBatch(
            hidden,
            weight,
            bias,
            targets=self.targets,
            rewards=self.rewards.to(hidden.device),
            group_size=self.rewards.shape[1] - 1,
            groups=range(self.first_group + self.groups.start, self.first_group + self.groups.stop),
            num_groups=self.num_groups,
            step_token_counts=self.step_token_counts,
            **head,
            old=self.old,
            reference_logp=self.reference_logp,
            sampling_logp=self.sampling_logp,
        )


def micro_batches(
    rollout: Rollout, size: int, pad_id: int, device, step_token_counts: torch.Tensor, first_group: int
) -> list[MicroBatch]:
    """The rollout's micro-batches of ``size`` prompt groups (0: all of them in one)."""
    P = rollout.rewards.shape[0]
    size = size or P
    out = []
    for start in range(0, P, size):
        groups = range(start, min(P, start + size))
        ids, mask, targets = build_batch(rollout, groups, pad_id, device)
        rewards = rollout.rewards[groups.start : groups.stop]
        engine_logp = sampling_logp(rollout, groups, ids.shape[1], device)
        out.append(
            MicroBatch(groups, ids, mask, targets, rewards, first_group, step_token_counts, None, None, engine_logp)
        )
    return out
