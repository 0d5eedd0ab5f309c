"""Prompts and completions that fit the model: ``max_prompt_tokens + max_new_tokens`` checked against the model's
context (``max_position_embeddings``), and prompts longer than their budget counted and reported.

A prompt longer than the context would otherwise be fed past the model's last position (silently wrong outputs);
``max_prompt_tokens`` (512 unless set) is lowered to what the model's context leaves after ``max_new_tokens``, so the
demo's 64-position model gets 56-token prompts without any setting; the trainer warns (and logs ``data/prompts_cut``)
when a prompt is actually cut.
"""

from __future__ import annotations

import sys

from ..config import ConfigError


def context_of(model_config) -> int | None:
    """The model's positions (``max_position_embeddings`` of its text config), or None when it has no such limit."""
    text = getattr(model_config, "get_text_config", lambda: model_config)()
    context = getattr(text, "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


def prompt_budget(model_config, max_prompt_tokens: int, max_new_tokens: int) -> tuple[int, str | None]:
    """(the tokens a prompt keeps, a warning when ``max_prompt_tokens`` was lowered to fit the context).

    ConfigError when ``max_new_tokens`` alone fills the context.
    """
    context = context_of(model_config)
    if context is None:
        return max_prompt_tokens, None
    if max_new_tokens >= context:
        raise ConfigError(
            f"'max_new_tokens' ({max_new_tokens}) leaves no room for a prompt in the model's context of {context} "
            "positions (max_position_embeddings); lower it"
        )
    room = context - max_new_tokens
    if max_prompt_tokens <= room:
        return max_prompt_tokens, None
    return room, (
        f"max_prompt_tokens ({max_prompt_tokens}) + max_new_tokens ({max_new_tokens}) exceed the model's context of "
        f"{context} positions: prompts are cut to their last {room} tokens"
    )


def count_longer(prompts, encode, budget: int) -> int:
    """How many of ``prompts`` ``encode`` (uncut) makes longer than ``budget`` tokens."""
    return sum(len(encode(p, sys.maxsize)) > budget for p in prompts)
