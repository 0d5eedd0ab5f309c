"""Training data: prompt/reference examples from JSONL files or the built-in demo task, and their
train/held-out split."""

from .examples import (
    HH_ASSISTANT,
    DataError,
    Example,
    check_prompts,
    load_jsonl,
    parse_record,
    rejected_source,
    split_hh,
    split_rejected,
)
from .splits import load_examples, validation_split

__all__ = [
    "DataError",
    "Example",
    "HH_ASSISTANT",
    "check_prompts",
    "load_examples",
    "load_jsonl",
    "parse_record",
    "rejected_source",
    "split_hh",
    "split_rejected",
    "validation_split",
]
