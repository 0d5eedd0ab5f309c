"""Prompt/reference data: JSONL files in two formats, detected per line.

- ``{"prompt": ..., "reference": ...}``
- Anthropic HH-RLHF ``{"chosen": ..., "rejected": ...}``: the prompt is the
  ``chosen`` transcript up to and including its last ``"\\n\\nAssistant:"``;
  the reference is the rest of ``chosen``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HH_ASSISTANT = "\n\nAssistant:"


class DataError(ValueError):
    """A data file the trainer cannot read; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    reference: str


def split_hh(chosen: str) -> tuple[str, str]:
    """(prompt, reference) of an HH-RLHF ``chosen`` transcript; ValueError without an assistant turn."""
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"'chosen' has no {HH_ASSISTANT!r} turn")
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:]


def parse_record(record) -> Example:
    """One decoded JSON line -> Example; ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "prompt" in record and "reference" in record:
        prompt, reference = record["prompt"], record["reference"]
        if not isinstance(prompt, str) or not isinstance(reference, str):
            raise ValueError("'prompt' and 'reference' must be strings")
        return Example(prompt, reference)
    if "chosen" in record:
        chosen = record["chosen"]
        if not isinstance(chosen, str):
            raise ValueError("'chosen' must be a string")
        return Example(*split_hh(chosen))
    raise ValueError(
        f"expected keys 'prompt' and 'reference' (or HH-RLHF 'chosen' and 'rejected'), got {sorted(record)}"
    )


def load_jsonl(path: str | Path) -> list[Example]:
    """All examples of a JSONL file; blank lines are skipped, any other bad line raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    examples = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            try:
                examples.append(parse_record(record))
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: {exc}") from None
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples
