"""Prompt/reference data: JSONL files in two formats, detected per line.

- ``{"prompt": ..., "reference": ...}``
- Anthropic HH-RLHF ``{"chosen": ..., "rejected": ...}``: the prompt is the
  ``chosen`` transcript up to and including its last ``"\\n\\nAssistant:"``;
  the reference is the rest of ``chosen``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

HH_ASSISTANT = "\n\nAssistant:"


class DataError(ValueError):
    """A data file the trainer cannot read; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    reference: str
    where: str = field(default="", compare=False)  # "file:line" for error messages; empty for generated examples


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
            examples.append(Example(ex.prompt, ex.reference, f"{path}:{lineno}"))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def load_examples(cfg) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples of a TrainConfig's ``data`` and ``eval_data``.

    ``eval_data`` unset: the demo's own held-out set for demo data, else the
    last ``eval_size`` examples of the data file (removed from training).
    """
    from . import demo_task  # it builds Examples: imported here, not at the top

    held_out = None
    if cfg.data == "demo":
        train, held_out = demo_task.make_splits(cfg.demo_train_size, cfg.eval_size, cfg.seed)
    else:
        train = load_jsonl(cfg.data)
    if cfg.eval_data == "demo":
        held_out = demo_task.make_splits(0, cfg.eval_size, cfg.seed)[1]
    elif cfg.eval_data is not None:
        held_out = load_jsonl(cfg.eval_data)[: cfg.eval_size]
    elif held_out is None:
        if len(train) < 2:
            raise DataError(f"{cfg.data} has {len(train)} example(s): too few to hold some out")
        k = min(cfg.eval_size, len(train) // 2)
        train, held_out = train[:-k], train[-k:]
    return train, held_out


def check_prompts(examples: list[Example], encode) -> None:
    """DataError naming the first example whose prompt ``encode`` turns into no tokens (nothing to generate from)."""
    for i, ex in enumerate(examples):
        if not encode(ex.prompt):
            where = ex.where or f"example {i}"
            raise DataError(
                f"{where}: the prompt {ex.prompt!r} tokenises to nothing; a prompt needs at least one token"
            )
