"""Loading models and tokenizers: the built-in tiny MoE or a local Hugging Face directory, in fp32 master weights.

Nothing here downloads: local directories are opened with ``local_files_only``
and the demo tokenizer is trained offline on the task's own text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .demo import TINY_MOE, build_demo_tokenizer, tiny_moe
from .errors import ModelError


def remote_code_files(path: str | Path) -> list[str]:
    """The files of a local directory whose ``auto_map`` asks for the directory's own Python code."""
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        file = Path(path) / name
        try:
            if file.is_file() and json.loads(file.read_text(encoding="utf-8")).get("auto_map"):
                found.append(name)
        except (OSError, ValueError, AttributeError):
            continue  # unreadable or not a JSON object: transformers reports it when it loads the file
    return found


def _load_error(what: str, path: Path, exc: Exception, trust_remote_code: bool) -> ModelError:
    """The ModelError for a failed load; names the ``trust_remote_code`` key when the directory ships code it is off for."""
    custom = remote_code_files(path)
    if custom and not trust_remote_code:
        return ModelError(
            f"cannot load {what} from {path}: its {' and '.join(custom)} map classes to code in the directory "
            "(auto_map), which runs only with trust_remote_code: true (--trust-remote-code true); "
            f"set it if you trust that code. transformers said: {exc}"
        )
    return ModelError(f"cannot load {what} from {path}: {exc}")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"tokenizer directory {str(path)!r} does not exist (no hub downloads: give a local path)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error("a tokenizer", path, exc, trust_remote_code) from None
    if tok.eos_token_id is None:
        raise ModelError(f"the tokenizer in {path} has no eos token; completions need one to stop")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def check_source(model: str, tokenizer: str | None) -> None:
    """ModelError unless ``model`` is 'tiny-moe' or a directory with a config.json and ``tokenizer`` unset or a directory."""
    if model != TINY_MOE and not (Path(model) / "config.json").is_file():
        raise ModelError(
            f"model {model!r} is neither 'tiny-moe' nor a local Hugging Face model directory with a config.json"
        )
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise ModelError(f"tokenizer directory {tokenizer!r} does not exist (no hub downloads: give a local path)")


def load_model(
    path: str | Path, attn_implementation: str = "sdpa", trust_remote_code: bool = False, safetensors: bool = False
):
    """The causal LM in the local directory ``path`` in fp32; ``safetensors``: its weights from safetensors files
    only (a directory with only pickled ``.bin`` weights is an error, never unpickled)."""
    from transformers import AutoModelForCausalLM

    check_source(str(path), None)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            dtype=torch.float32,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            **({"use_safetensors": True} if safetensors else {}),
        )
    except (OSError, ValueError) as exc:
        raise _load_error("a causal LM", Path(path), exc, trust_remote_code) from None


def load(
    model: str,
    tokenizer: str | None,
    overrides: dict,
    runtime,
    seed: int,
    trust_remote_code: bool = False,
    task: str = "demo",
):
    """(model, tokenizer) on ``runtime.device`` in fp32 master weights; tiny-moe's tokenizer is the embedded
    ``task``'s unless ``tokenizer`` names one."""
    if model == TINY_MOE:
        tok = load_tokenizer(tokenizer, trust_remote_code) if tokenizer else build_demo_tokenizer(task)
        net = tiny_moe(tok, overrides, runtime.attn_implementation, seed)
    else:
        tok = load_tokenizer(tokenizer or model, trust_remote_code)
        net = load_model(model, runtime.attn_implementation, trust_remote_code)
        if net.config.pad_token_id is None:
            net.config.pad_token_id = tok.pad_token_id
    return net.to(runtime.device), tok


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter elements of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
