"""What a reward is: a callable ``reward(prompts, completions, references) -> list[float]``, the error that names a
reward that misbehaves, and the check of the numbers it returns."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import numpy as np

Reward = Callable[[list[str], list[str], list[str]], list[float]]


class RewardError(RuntimeError):
    """A reward function that raised or returned something other than one finite number per completion."""


def qualified_name(reward: Reward) -> str:
    """``module.qualname`` of a reward function (or of its class, for a callable object)."""
    target = reward if hasattr(reward, "__qualname__") else type(reward)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def is_number(value) -> bool:
    # bool is an int and "0.5" converts with float(): neither is a score, both hide a bug in the reward
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def pop_metrics(reward: Reward) -> dict[str, float]:
    """What ``reward`` counted since the last call (a reward with a ``pop_metrics()`` method, such as
    :class:`JudgeReward`), for the metrics line; {} for a plain function."""
    pop = getattr(reward, "pop_metrics", None)
    return dict(pop()) if callable(pop) else {}


def check_judged(metrics: dict[str, float], reward: Reward) -> None:
    """RewardError when a judge answered none of the comparisons of an evaluation: every one scored as a tie would
    report RAS 1.0 and NAG 0 for a judge that never judged."""
    asked, unparsed = metrics.get("judge/asked", 0), metrics.get("judge/unparsed", 0)
    if asked and unparsed >= asked:
        raise RewardError(
            f"the judge of reward {qualified_name(reward)} gave no verdict (better, worse or tie) in any of its "
            f"{int(asked)} replies in this evaluation, so RAS and NAG would be meaningless; check judge_template and "
            "the judge model"
        )
