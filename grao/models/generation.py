"""Sampling and greedy decoding of completions, returned as token ids cut after the first eos."""

from __future__ import annotations

import torch

from .runtime import autocast


def encode_prompt(tokenizer, prompt: str, max_tokens: int, chat_template: bool = False) -> list[int]:
    """Prompt ids with the tokenizer's special tokens (e.g. BOS), keeping the last ``max_tokens``.

    With ``chat_template`` and a tokenizer that has one, the prompt is one
    user message rendered through the template with the assistant's turn
    opened (the template writes its own special tokens).
    """
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"][-max_tokens:]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"][-max_tokens:]


def encode_reference(tokenizer, reference: str) -> list[int]:
    """Reference answer ids followed by eos, as a sampled completion that stopped would end."""
    return tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def trim(tokens: list[int], eos_id: int) -> list[int]:
    """Tokens up to and including the first eos (the padding generate adds after it is dropped)."""
    try:
        return tokens[: tokens.index(eos_id) + 1]
    except ValueError:
        return tokens


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    runtime,
    *,
    num_return: int = 1,
    sample: bool = True,
    temperature: float = 0.7,
    max_new_tokens: int = 32,
    batch_size: int | None = None,
) -> list[list[int]]:
    """Completion token ids for each prompt, ``num_return`` per prompt, prompt-major.

    Plain temperature sampling (no top-k / top-p truncation) or greedy decoding.
    Seed torch's RNG before calling for reproducible samples.
    """
    from transformers import GenerationConfig

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    options = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, num_return_sequences=num_return)
    if sample:
        gen_cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, **options)
    else:
        gen_cfg = GenerationConfig(do_sample=False, **options)
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    step = batch_size or len(prompt_ids)
    try:
        for start in range(0, len(prompt_ids), step):
            chunk = prompt_ids[start : start + step]
            ids, mask = left_pad(chunk, pad, runtime.device)
            with autocast(runtime):
                seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            out.extend(trim(row, eos) for row in seqs[:, ids.shape[1] :].tolist())
    finally:
        model.train(was_training)
    return out


def decode(tokenizer, completions: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(completions, skip_special_tokens=True)
