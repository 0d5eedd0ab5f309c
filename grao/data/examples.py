"""Prompt/reference data: JSONL files in two formats, detected per line.

- ``{"prompt": ..., "reference": ...}``
- Anthropic HH-RLHF ``{"chosen": ..., "rejected": ...}``: the prompt is the
  ``chosen`` transcript up to and including its last ``"\\n\\nAssistant:"``;
  the reference is the rest of ``chosen``, and the example's ``rejected``
  answer the rest of the ``rejected`` transcript, which must start with the
  same prompt.

Either format may carry a worse answer to the same prompt as ``rejected``
(optional; DPO's rejected answer, see ``dpo_rejected`` in :mod:`grao.config`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import ConfigError
from ..losses import DPO_REJECTED

HH_ASSISTANT = "\n\nAssistant:"


class DataError(ValueError):
    """A data file the trainer cannot read; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    reference: str
    where: str = field(default="", compare=False)  # "file:line" for error messages; empty for generated examples
    rejected: str | None = None  # a worse answer to the same prompt (HH-RLHF's), for DPO; None when the data has none


def split_hh(chosen: str) -> tuple[str, str]:
    """(prompt, reference) of an HH-RLHF ``chosen`` transcript; ValueError without an assistant turn."""
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"'chosen' has no {HH_ASSISTANT!r} turn")
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:]


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def split_rejected(prompt: str, rejected: str) -> str:
    """The answer of an HH-RLHF ``rejected`` transcript to ``prompt`` (the ``chosen`` one's): the transcript
    minus that prompt; ValueError saying where they part when it does not start with it."""
    if not rejected.startswith(prompt):
        at = _first_difference(prompt, rejected)
        raise ValueError(
            f"'rejected' does not continue the prompt of 'chosen' (the conversation up to its last "
            f"{HH_ASSISTANT!r}): they differ from character {at} ({prompt[at : at + 30]!r} vs "
            f"{rejected[at : at + 30]!r}); DPO needs both answers to the same prompt"
        )
    return rejected[len(prompt) :]


def parse_record(record) -> Example:
    """One decoded JSON line -> Example; ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    rejected = record.get("rejected")
    if rejected is not None and not isinstance(rejected, str):
        raise ValueError(f"'rejected' must be a string, got {type(rejected).__name__}")
    if "prompt" in record and "reference" in record:
        prompt, reference = record["prompt"], record["reference"]
        if not isinstance(prompt, str) or not isinstance(reference, str):
            raise ValueError("'prompt' and 'reference' must be strings")
        if not reference.strip():  # GRAO imitates the reference: an empty one teaches the model to stop at once
            raise ValueError("'reference' is empty; every example needs a reference answer")
        return Example(prompt, reference, rejected=rejected)
    if "chosen" in record:
        chosen = record["chosen"]
        if not isinstance(chosen, str):
            raise ValueError("'chosen' must be a string")
        prompt, reference = split_hh(chosen)
        return Example(prompt, reference, rejected=None if rejected is None else split_rejected(prompt, rejected))
    raise ValueError(
        f"expected keys 'prompt' and 'reference' (or HH-RLHF 'chosen' and 'rejected'), got {sorted(record)}"
    )


def load_jsonl(path: str | Path) -> list[Example]:
    """All examples of a JSONL file; blank lines are skipped, any other bad line raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    examples = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            try:
                ex = parse_record(record)
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: {exc}") from None
            examples.append(replace(ex, where=f"{path}:{lineno}"))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def check_prompts(examples: list[Example], encode) -> None:
    """DataError naming the first example whose prompt ``encode`` turns into no tokens (nothing to generate from)."""
    for i, ex in enumerate(examples):
        if not encode(ex.prompt):
            where = ex.where or f"example {i}"
            raise DataError(
                f"{where}: the prompt {ex.prompt!r} tokenises to nothing; a prompt needs at least one token"
            )


def rejected_source(choice: str, examples: list[Example]) -> str:
    """Where DPO's rejected answers come from under ``dpo_rejected`` = ``choice``: ``"data"`` (every example's
    own ``rejected``) or ``"sampled"`` (the lowest-scored sample). ``auto`` is data when every example has
    one; ``data`` with an example that has none is a ConfigError naming it."""
    assert choice in DPO_REJECTED, choice  # TrainConfig checks the key
    if choice == "sampled":
        return "sampled"
    missing = next((i for i, ex in enumerate(examples) if ex.rejected is None), None)
    if missing is None:
        return "data"
    if choice == "data":
        where = examples[missing].where or f"example {missing}"
        raise ConfigError(
            f"'dpo.rejected' is data but {where} has no 'rejected' answer ({sum(ex.rejected is None for ex in examples)} "
            f"of {len(examples)} training examples lack one); use sampled or auto, or add 'rejected' to every line"
        )
    return "sampled"
