"""Several processes: ``torchrun --nproc-per-node K -m grao train`` shards the model with FSDP2.

PyTorch's own engine does the work: :func:`torch.distributed.fsdp.fully_shard`
on each decoder layer and then on the root shards parameters, gradients and
(the optimizer is built on the sharded parameters) AdamW's state across the
K ranks; ``torch.distributed.checkpoint`` (DCP) writes and reads the shards,
so a run saved by K processes resumes on any number. This module is the glue:

- :class:`World`: this process's rank among ``WORLD_SIZE`` (1 without
  torchrun) and the few collectives the trainer needs (sums, gathers);
- :func:`shard`: ``fully_shard`` on the decoder layers and on the root, the
  :class:`grao.train.policy.Policy`, whose named forward methods (the loss,
  ``generate``, evaluation) are registered with FSDP so that each runs with
  the root's parameters unsharded; nothing is gathered outside FSDP's own
  unshard;
- :class:`Sharding`: ``fully_shard`` with the memory options (CPU offload,
  bf16 parameters over fp32 master weights) and the checkpoint format of a
  sharded run.

Each rank takes a contiguous block of whole prompt groups of the step (P must
divide by K); the loss shares use the global P, so the gradient FSDP reduces
is a sum over ranks (its default average is turned off).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .. import models
from ..config import ConfigError
from . import checkpoint, safe_state
from .policy import Policy

DCP_DIR = "distributed"  # a sharded checkpoint's model and optimizer shards, in the step directory


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the ranks of the run (``rank`` 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The rank that writes the run directory (metrics, plot, config, checkpoint metadata)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def share(self, items: list, what: str = "prompts_per_step") -> list:
        """This rank's contiguous block of ``items`` (equal blocks; ConfigError naming ``what`` otherwise)."""
        if len(items) % self.size:
            raise ConfigError(f"'{what}' ({len(items)}) must divide by the number of processes ({self.size})")
        k = len(items) // self.size
        return items[self.rank * k : (self.rank + 1) * k]

    def padded_share(self, items: list) -> tuple[list, int]:
        """(this rank's block of ``items``, how many of them are real): every rank gets ceil(n / size) items, the
        last blocks padded with copies of ``items[0]``, so all ranks run the same number of generate calls."""
        k = -(-len(items) // self.size)
        block = items[self.rank * k : (self.rank + 1) * k]
        return block + [items[0]] * (k - len(block)), len(block)

    def sum(self, values: dict) -> dict:
        """``values`` (numbers) summed over ranks, ints staying ints."""
        if self.size == 1:
            return values
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return {k: type(v)(x) for (k, v), x in zip(values.items(), t.tolist())}

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (same shape on each) concatenated along dim 0, in rank order."""
        if self.size == 1:
            return t
        local = t.to(self._device())
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(t.device)

    def gather_objects(self, obj) -> list:
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def first(self, value):
        """The first rank's non-None ``value`` (e.g. a stop request one rank received), or None; so that all ranks
        stop at the same step."""
        return next((v for v in self.gather_objects(value) if v is not None), None)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )


def init(runtime, sharded: bool):
    """(World, runtime) of this process: under torchrun (``WORLD_SIZE`` > 1) the process group (gloo on CPU, nccl on
    CUDA, one GPU per rank: ``cuda:LOCAL_RANK``); with ``sharded`` and one process, a process group of one, so the
    memory options run through the same FSDP code. Without either, no process group: World(0, 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 and not sharded:
        return World(), runtime
    if runtime.device.type == "cuda":
        runtime = dataclasses.replace(runtime, device=torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
        torch.cuda.set_device(runtime.device)
    backend = "nccl" if runtime.device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        global _OWN_GROUP
        _OWN_GROUP = True
        if size == 1:  # no torchrun: an in-process store for the group of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size()), runtime


_OWN_GROUP = False  # whether init() created the process group (an in-process vLLM engine may create one of its own)


# How long :func:`shutdown` lets gloo's worker threads finish after the last collective (see there).
GLOO_SETTLE_S = 0.25


def shutdown(wait: bool = True) -> None:
    """Ends the process group :func:`init` created (one that an in-process vLLM engine made for itself stays: the
    engine still uses it). ``wait``: first wait until every rank gets here (a rank tearing down gloo's connections
    while another still works, rank 0 writing its files, can abort at exit); a rank that failed does not wait, as
    the others may never arrive.

    With several processes it then sleeps :data:`GLOO_SETTLE_S`, the GIL released. After a collective returns,
    the gloo worker thread that ran it still frees it, and the tensors of the collectives it waited on (FSDP's
    last all-gather), which takes the GIL. If the interpreter is already finalizing, that thread is stopped in a
    destructor and the process aborts ("terminate called without an active exception", torch issue 190489) after
    a run that succeeded; the pause lets that thread take the GIL first. The group itself outlives
    ``destroy_process_group`` (DTensor's caches hold every DeviceMesh), so its threads cannot be joined instead."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_available() and dist.is_initialized():
        several = dist.get_world_size() > 1
        if wait and several:
            dist.barrier()
        dist.destroy_process_group()
        if several:
            time.sleep(GLOO_SETTLE_S)
    _OWN_GROUP = False


def decoder_layers(model) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: the model's ``_no_split_modules`` classes (its decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise models.ModelError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard")
    return layers


def sharded(cfg) -> bool:
    """Whether the run shards its model: under torchrun (``WORLD_SIZE`` > 1) or with an fsdp_* memory option;
    ConfigError for settings a sharded run cannot use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 and not cfg.fsdp.cpu_offload and cfg.fsdp.param_dtype == "fp32":
        return False
    World(size=size).share(list(range(cfg.rollout.prompts_per_step)))
    return True


def shard(policy: Policy, device: torch.device, cpu_offload: bool, param_dtype: str) -> list[torch.nn.Module]:
    """``fully_shard`` on each decoder layer of ``policy.model``, then on ``policy`` (the root), with the memory
    options of :class:`Sharding`; the sharded modules. A frozen policy (the reference model of ``dpo``, ``ppo`` and
    ``grpo`` with a KL) is sharded the same way and only runs forward."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if param_dtype == "bf16" else None, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    layers = decoder_layers(models.unwrap(policy.model))
    sharded = [fully_shard(m, mp_policy=mp, offload_policy=offload) for m in (*layers, policy)]
    for name in Policy.FORWARD_METHODS:  # each runs like forward: the root's parameters unsharded
        register_fsdp_forward_method(policy, name)
    return sharded


class Sharding:
    """FSDP2 on a :class:`Policy`: ``fully_shard`` on each decoder layer, then on the root, with the memory options:
    ``cpu_offload`` keeps the sharded parameters, gradients and optimizer state in CPU memory (FSDP copies each
    layer's shard to the device for its all-gather); ``param_dtype='bf16'`` all-gathers and computes in bf16 while
    the sharded fp32 parameters stay the optimizer's master weights and gradients are reduced in fp32."""

    def __init__(self, policy: Policy, world: World, device: torch.device, cpu_offload: bool, param_dtype: str):
        self.policy, self.world = policy, world
        self.optimizer = None  # set by the trainer once it has built the optimizer on the sharded parameters
        inner = models.unwrap(policy.model)
        for module in shard(policy, device, cpu_offload, param_dtype):
            # Each rank's loss is its share of the step's loss (weighted by the global P): the step's gradient is the
            # SUM of the ranks' gradients, not FSDP's default average; a plain SUM reduction (gloo has no PREMUL_SUM).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
        # transformers' generate then runs with synced_gpus: a rank whose samples all ended keeps stepping the
        # forward (whose all-gathers every rank joins) until every rank is done.
        inner._is_fsdp_managed_module = True

    def full_model_state(self) -> dict | None:
        """The whole model's state dict in CPU memory on rank 0 (None elsewhere), Hugging Face names; every rank
        must call it (it all-gathers)."""
        return self.full_state("model")

    def full_state(self, part: str) -> dict | None:
        """The whole state dict of the policy's ``part`` (``model``, or ``loss`` when it has parameters) in CPU
        memory on rank 0, None elsewhere; every rank must call it (it all-gathers)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        prefix = part + "."
        return (
            {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)} if self.world.main else None
        )

    def save_checkpoint(self, run_dir, step: int, model, tokenizer, state: dict, keep: int) -> Path:
        """:func:`grao.train.checkpoint.save` for a sharded run, on every rank: the DCP shards of the model and optimizer
        (``distributed/``, written by all ranks) next to the consolidated Hugging Face model, the tokenizer and the
        trainer state (written by rank 0), committed together by rank 0's rename."""
        full = self.full_model_state()
        final = checkpoint.step_dir(run_dir, step)
        error = None
        if self.world.main:
            try:
                checkpoint.save(run_dir, step, model, tokenizer, state, keep, state_dict=full, before=self._save_shards)
            except checkpoint.CheckpointError as exc:
                error = str(exc)
        else:
            self._save_shards(checkpoint.tmp_dir(final))
        error = self.world.broadcast(error)
        if error is not None:
            raise checkpoint.CheckpointError(error)
        return final

    def _save_shards(self, tmp: Path) -> None:
        """Every rank writes its shards into rank 0's fresh ``tmp`` (a file system all ranks share)."""
        self.world.barrier()  # rank 0 has cleared ``tmp``
        save_shards(self.policy, self.optimizer, tmp / DCP_DIR)


def _state_dicts(policy, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(policy, optimizer)
    return {"model": model_state, "optim": optim_state}


def save_shards(policy: Policy, optimizer, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_dicts(policy, optimizer), checkpoint_id=directory)


def restore(policy: Policy, optimizer, directory: Path, state: dict) -> None:
    """The optimizer (and, from DCP shards, the model) of checkpoint ``directory`` into ``policy``/``optimizer``,
    sharded or not, whatever the number of processes that saved it: DCP reshards ``distributed/``; a one-process
    checkpoint's ``optimizer`` (indexed by parameter position) is loaded as a full state dict by parameter name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict, set_state_dict

    if "optimizer" in state:
        names = [n for n, p in policy.named_parameters() if p.requires_grad]  # the optimizer's order
        plain = state["optimizer"]
        full = {
            "state": {names[i]: v for i, v in plain["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in plain["param_groups"]],
        }
        set_optimizer_state_dict(
            policy, optimizer, optim_state_dict=full, options=StateDictOptions(full_state_dict=True)
        )
        return
    metadata = Path(directory) / DCP_DIR / ".metadata"
    try:  # DCP unpickles this file with pickle.load: it may hold nothing but metadata
        safe_state.check_dcp_metadata(metadata)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise checkpoint.CheckpointError(f"{metadata} is not checkpoint metadata the trainer wrote ({exc})") from None
    target = _state_dicts(policy, optimizer)
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is what this is for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, checkpoint_id=Path(directory) / DCP_DIR)
    set_state_dict(policy, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])


def local(value):
    """A DTensor result (e.g. the global gradient norm of DTensor gradients) as a plain tensor; others unchanged."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value
