"""LoRA through peft: a frozen base with trained low-rank adapters; the lm_head stays a plain frozen Linear."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes next to the adapter weights


def unwrap(model):
    """The Hugging Face model inside a peft wrapper (``PeftModel.base_model.model``), else ``model`` itself."""
    peft = sys.modules.get("peft")  # not imported: ``model`` cannot be a PeftModel
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def is_adapter(directory: str | Path) -> bool:
    """Whether ``directory`` holds a peft adapter (a LoRA checkpoint) rather than a whole model."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def lora_base_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: bf16 or fp32 as set; 'auto' is bf16 on CUDA and fp32 elsewhere."""
    if setting == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return torch.bfloat16 if setting == "bf16" else torch.float32


def _head_name(model) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def add_lora(model, rank: int, alpha: float, dropout: float, targets: list[str], seed: int = 0):
    """``model`` wrapped by peft with rank-``rank`` LoRA adapters on the Linear modules named ``targets``
    (and, where peft maps those names onto a fused MoE experts tensor, on the experts), initialised from ``seed``.

    peft freezes every base parameter (the lm_head included: the fused loss
    reads its weight, which gets no adapter) and keeps the adapters in fp32
    over a bf16 base. ModelError when a target is the lm_head or matches no
    module.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ModuleNotFoundError:
        raise ModelError("lora_rank > 0 needs peft: pip install peft (it is in the train extra)") from None

    head = _head_name(model)
    if head in targets or head.rsplit(".", 1)[-1] in targets:
        raise ModelError(
            f"lora_target_modules names the output head {head!r}; the fused loss reads its weight directly, "
            "so it must stay adapter-free"
        )
    lora = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, exclude_modules=[head], bias="none"
    )
    try:
        with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global RNG
            torch.manual_seed(seed)
            wrapped = get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(f"lora_target_modules {','.join(targets)} on {type(model).__name__}: {exc}") from None
    assert isinstance(wrapped.get_base_model().get_output_embeddings(), torch.nn.Linear), "lm_head got an adapter"
    return wrapped


def load_adapter(base, directory: str | Path, trainable: bool):
    """The base model with the peft adapter saved in ``directory`` (trainable for a resumed run)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, directory, is_trainable=trainable)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load the LoRA adapter in {directory} onto {type(base).__name__}: {exc}") from None
