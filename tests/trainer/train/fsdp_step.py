"""One trainer update on a fixed rollout, run by each of the processes torchrun starts (tests/trainer/train/test_distributed.py).

``python -m torch.distributed.run --standalone --nproc-per-node K tests/trainer/train/fsdp_step.py OUT RUN_DIR MODEL [METHOD
[LORA_RANK]]``: every rank updates on its block of the rollout's prompt groups; rank 0 writes the step's metrics and
the whole model's gradients and updated parameters (gathered from the shards) to OUT. :func:`one_step` is the same
in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: utils

from utils import small  # noqa: E402

from grao.models.generation import encode_prompt, encode_reference  # noqa: E402
from grao.train import distributed  # noqa: E402
from grao.train.trainer import Rollout, Trainer  # noqa: E402

P, G = 2, 3


def step_config(run_dir, model: str, method: str = "grao", lora_rank: int = 0):
    kw = dict(model=model, method=method, lora_rank=int(lora_rank), prompts_per_step=P, group_size=G, threads=1)
    return small(run_dir, **kw, weight_decay=0.0)


def fixed_rollout(trainer: Trainer) -> Rollout:
    """The step-1 prompts with seeded completions of 1 to 5 tokens (ending in eos) and fixed distinct rewards."""
    tok, cfg = trainer.tokenizer, trainer.cfg
    examples = trainer.prompts_for_step(1)
    gen = torch.Generator().manual_seed(1)
    completions = []
    for ex in examples:
        group = []
        for _ in range(G):
            n = int(torch.randint(1, 6, (1,), generator=gen))
            group.append(torch.randint(3, len(tok), (n - 1,), generator=gen).tolist() + [tok.eos_token_id])
        completions.append(group + [encode_reference(tok, ex.reference)])
    rewards = torch.arange(P * (G + 1), dtype=torch.float32).view(P, G + 1).remainder(3) / 2
    prompt_ids = [encode_prompt(tok, ex.prompt, cfg.max_prompt_tokens) for ex in examples]
    return Rollout(prompt_ids, completions, rewards, [["x"] * G for _ in examples])


def one_step(trainer: Trainer) -> dict:
    """This rank's share of the fixed rollout, one update; the metrics, the whole model's gradients and new
    parameters by name (on every rank: gathering the shards is collective) and the type and shape of each lm_head
    weight the loss got."""
    full = fixed_rollout(trainer)
    w = trainer.world
    block = w.share(list(range(P)))
    rollout = Rollout(
        [full.prompt_ids[p] for p in block],
        [full.completion_ids[p] for p in block],
        full.rewards[block[0] : block[-1] + 1],
        [full.completions[p] for p in block],
    )
    loss, seen = trainer.loss, []

    def recording(batch):  # what the loss kernels get: a plain tensor, the whole (V, H) lm_head weight
        seen.append((type(batch.weight).__name__, tuple(batch.weight.shape)))
        return loss(batch)

    trainer.loss = recording
    stats = trainer.update(rollout)
    trainer.loss = loss
    stats.pop("moe/layer_counts", None)
    named = list(trainer.policy.named_parameters())
    grads = {n: distributed.local(p.grad).detach().clone() for n, p in named if p.requires_grad}
    params = {n: distributed.local(p.detach()).clone() for n, p in named}
    frozen = trainer.reference_model  # ppo's reference model: sharded like the policy when the policy is
    reference = sorted({type(p).__name__ for p in frozen.parameters()}) if frozen is not None else None
    return {"stats": stats, "grads": grads, "params": params, "weights_seen": seen, "reference_params": reference}


if __name__ == "__main__":
    out, run_dir, model, *method = sys.argv[1:]
    trainer = Trainer(step_config(Path(run_dir), model, *method))
    result = one_step(trainer)
    if trainer.world.main:
        torch.save(result, out)
    distributed.shutdown()
