"""The embedded reasoning-style task: add two numbers, an answer a checker verifies.

A prompt is ``"<a>+<b>="`` with a and b in 0..99; the answer is the sum written units digit first
(``"37+58=" -> "59"``, the sum 95 reversed; ``"99+7=" -> "601"``), at most three digits, so it fits the demo's
8 new tokens. Units first, each digit the model writes depends only on the operands and on the carry out of
the digit it has just written, the order in which addition is computed (Lee et al., "Teaching Arithmetic to
Small Transformers", arXiv 2307.03381, train small transformers on reversed sums for this reason). Written
most significant digit first, the first digit already needs every carry, and the demo's 0.2M-parameter model
barely learns it in the default 200 steps (the README's addition task gives both measurements). The bare
number rather than a worked form: the 8 new tokens leave no room for one. Pairs are drawn deterministically from a seed; the held-out set
shares no (a, b) pair with the training set.

Two checkers, both computed from the prompt (the reference is not read): :func:`exact_reward`, 1 when the
response is the answer and 0 otherwise, and :func:`reward`, partial credit per digit: the share of place values
holding the right digit (the answer and the response both start at the units digit), over the longer of the
two.
"""

from __future__ import annotations

import random

from .examples import Example

MAX_OPERAND = 99
OP, SEP = "+", "="
REWARD = "addition"  # the default reward of this task (grao.eval.rewards): partial credit per digit


def solve(prompt: str) -> str:
    """The answer to an ``"a+b="`` prompt: the sum's digits, units first; ValueError for any other text."""
    body = prompt[: -len(SEP)] if prompt.endswith(SEP) else None
    parts = None if body is None else body.split(OP)
    if parts is None or len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"not an addition prompt 'a{OP}b{SEP}': {prompt!r}")
    return answer(int(parts[0]), int(parts[1]))


def answer(a: int, b: int) -> str:
    """``a + b`` written units digit first."""
    return str(a + b)[::-1]


def digit_score(answer: str, response: str) -> float:
    """Partial credit in [0, 1]: place values with the right digit (both strings start at the units digit) over
    the longer length."""
    response = response.strip()
    n = max(len(answer), len(response))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(answer, response)) / n


def reward(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """Per-digit partial credit (:func:`digit_score`) against the answer computed from each prompt."""
    return [digit_score(solve(p), c) for p, c in zip(prompts, completions)]


def exact_reward(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """1.0 when the stripped completion is the answer computed from its prompt, else 0.0."""
    return [float(c.strip() == solve(p)) for p, c in zip(prompts, completions)]


def _pair(rng: random.Random) -> tuple[int, int]:
    return rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)


def make_splits(train_size: int, eval_size: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples; deterministic in ``seed``, the two sets share no (a, b) pair."""
    rng = random.Random(f"grao-addition-{seed}")
    capacity = (MAX_OPERAND + 1) ** 2
    if eval_size >= capacity:
        raise ValueError(f"eval_size {eval_size} exceeds the {capacity} distinct addition prompts")
    held_out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    while len(held_out) < eval_size:
        pair = _pair(rng)
        if pair not in seen:
            seen.add(pair)
            held_out.append(pair)
    train = []
    while len(train) < train_size:
        pair = _pair(rng)
        if pair not in seen:  # repeats within the training set are fine, held-out pairs never appear
            train.append(pair)

    def as_examples(pairs):
        return [Example(f"{a}{OP}{b}{SEP}", answer(a, b)) for a, b in pairs]

    return as_examples(train), as_examples(held_out)


def tokenizer_corpus() -> list[str]:
    """Text the task's tokenizer is trained on: every symbol the task can produce, one token per digit."""
    return ["0123456789" + OP + SEP]
