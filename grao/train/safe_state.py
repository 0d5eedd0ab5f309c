"""The trainer state file (``trainer_state.pt``) in a form that loads without running code.

``torch.load(weights_only=True)`` unpickles only tensors, numbers, strings and containers: a checkpoint from someone
else cannot execute anything when it is resumed. Everything the trainer stores (optimizer and scheduler state dicts,
counters, the evaluation baseline, the config) is of those types; the RNG states, which Python and NumPy give as
tuples holding a NumPy array, are stored as tensors and numbers (:func:`rng_state`).

Checkpoints written before this format hold NumPy's state as a pickled array: they are read with only NumPy's array
reconstruction allowed in addition (what ``torch.serialization`` documents for arrays), which builds data, never
calls anything else.

A sharded checkpoint's ``distributed/.metadata`` is a plain pickle that ``torch.distributed.checkpoint`` reads with
``pickle.load``; :func:`check_dcp_metadata` unpickles it first allowing only DCP's own dataclasses and enums, torch
dtypes, sizes and layouts, and paths, so a crafted file is refused before DCP reads it.
"""

from __future__ import annotations

import dataclasses
import enum
import pickle
import random
from pathlib import Path, PurePath

import numpy as np
import torch


def save(state: dict, path: Path) -> None:
    torch.save(state, path)


def load(path: Path) -> dict:
    """The state in ``path``; an ``UnpicklingError`` naming the refused global for anything but plain data."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "numpy" not in str(exc):
            raise
    with torch.serialization.safe_globals(_NUMPY_ARRAY):  # an older checkpoint's RNG state
        return torch.load(path, map_location="cpu", weights_only=True)


_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
_NUMPY_ARRAY = [_multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def rng_state() -> dict:
    """Python's, NumPy's, torch's (and CUDA's) generator states as tensors and numbers."""
    version, words, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(rng: dict) -> None:
    """Restore :func:`rng_state`'s states (or an older checkpoint's tuples)."""
    py, npy = rng["python"], rng["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss"])
    if isinstance(npy, dict):
        key = npy["key"].numpy().astype(np.uint32)
        npy = (npy["kind"], key, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata and nothing else: a global is looked up only in the modules DCP's metadata uses, and
    must be data (a DCP dataclass or enum, a dtype, ``torch.Size``, a path class, a layout by name)."""

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint.") or module in ("torch", "torch.serialization", "pathlib"):
            obj = super().find_class(module, name)  # these modules are imported already: no import runs code
            if module.startswith("torch.distributed.checkpoint."):
                if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                    return obj
            elif module == "torch" and (obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout))):
                return obj
            elif module == "torch.serialization" and name == "_get_layout":
                return obj
            elif module == "pathlib" and isinstance(obj, type) and issubclass(obj, PurePath):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def check_dcp_metadata(path: Path) -> None:
    """UnpicklingError unless ``path`` (a DCP ``.metadata`` file) holds only checkpoint metadata (see
    :class:`_DCPMetadataUnpickler`); nothing in it is called but data constructors."""
    import torch.distributed.checkpoint.metadata  # noqa: F401  (the classes the file names)

    with open(path, "rb") as fh:
        _DCPMetadataUnpickler(fh).load()
