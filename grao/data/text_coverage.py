"""Text the tokenizer cannot represent: the demo's word-level tokenizer maps any word outside its vocabulary to
``<unk>``, so a data file in another vocabulary would train on ``<unk>`` runs without a word said. The trainer counts
the examples whose prompt or reference holds an unknown token and warns, naming the first."""

from __future__ import annotations


def unknown_examples(examples, tokenizer) -> tuple[int, str | None]:
    """(how many examples encode to ``tokenizer``'s unk token somewhere, a description of the first), or (0, None)
    for a tokenizer without an unk token (byte-level BPE represents any text)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return 0, None
    count, first = 0, None
    for i, ex in enumerate(examples):
        for field in ("prompt", "reference"):
            if unk in tokenizer(getattr(ex, field), add_special_tokens=False)["input_ids"]:
                count += 1
                first = first or f"{ex.where or f'example {i}'} ({field} {getattr(ex, field)[:60]!r})"
                break
    return count, first
