"""The embedded demo's synthetic task: reverse a short word.

A prompt is ``"<word>="``, the answer is the word reversed (``"cab=" -> "bac"``).
Words are 3 to 5 letters from a small alphabet, drawn deterministically from a
seed; the held-out set shares no word with the training set. The checker gives
partial credit: the share of positions holding the right letter, over the
longer of answer and response, so a random model scores near 0 and an exact
answer scores 1.
"""

from __future__ import annotations

import random

from .examples import Example
from .tasks import disjoint_draws

ALPHABET = "abcdefghij"
MIN_LEN, MAX_LEN = 3, 5
SEP = "="
REWARD = "demo"  # the default reward of this task (grao.eval.rewards): the share of letters in place


def solve(prompt: str) -> str:
    """The correct answer to a demo prompt."""
    word = prompt[: -len(SEP)] if prompt.endswith(SEP) else prompt
    return word[::-1]


def score(answer: str, response: str) -> float:
    """Partial credit in [0, 1]: matching positions over the longer length."""
    response = response.strip()
    n = max(len(answer), len(response))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(answer, response)) / n


def reward(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """The demo checker: scores each completion against the answer computed from its prompt."""
    return [score(solve(p), c) for p, c in zip(prompts, completions)]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def make_splits(train_size: int, eval_size: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples; deterministic in ``seed``, the two sets share no word."""
    rng = random.Random(f"grao-demo-{seed}")
    capacity = sum(len(ALPHABET) ** n for n in range(MIN_LEN, MAX_LEN + 1))
    if eval_size >= capacity:
        raise ValueError(f"eval_size {eval_size} exceeds the {capacity} distinct demo words")
    train, held_out = disjoint_draws(lambda: _word(rng), train_size, eval_size)
    as_examples = lambda words: [Example(w + SEP, solve(w + SEP)) for w in words]  # noqa: E731
    return as_examples(train), as_examples(held_out)


def tokenizer_corpus() -> list[str]:
    """Text the demo tokenizer is trained on: every symbol the task can produce."""
    return [ALPHABET + SEP]
