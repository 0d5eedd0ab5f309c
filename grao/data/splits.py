"""A config's training, validation and held-out examples: the demo task's splits or a JSONL file's."""

from __future__ import annotations

from . import tasks
from .examples import DataError, Example, load_jsonl


def load_examples(cfg) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples of a TrainConfig's ``data`` and ``eval_data``.

    ``demo`` (either key): the embedded task ``dataset.task``'s examples (:mod:`grao.data.tasks`). ``eval_data``
    unset: that task's own held-out set for demo data, else the last ``eval_size`` examples of the data file
    (removed from training).
    """
    held_out = None
    task = tasks.get(cfg.dataset.task)
    if cfg.dataset.data == "demo":
        train, held_out = task.make_splits(cfg.dataset.demo_train_size, cfg.evaluation.size, cfg.run.seed)
    else:
        train = load_jsonl(cfg.dataset.data)
    if cfg.evaluation.data == "demo":
        held_out = task.make_splits(0, cfg.evaluation.size, cfg.run.seed)[1]
    elif cfg.evaluation.data is not None:
        held_out = load_jsonl(cfg.evaluation.data)[: cfg.evaluation.size]
    elif held_out is None:
        if len(train) < 2:
            raise DataError(f"{cfg.dataset.data} has {len(train)} example(s): too few to hold some out")
        k = min(cfg.evaluation.size, len(train) // 2)
        train, held_out = train[:-k], train[-k:]
    return train, held_out


def validation_split(train: list[Example], held_out: list[Example], size: int) -> tuple[list[Example], list[Example]]:
    """(training examples without the validation prompts, ``size`` validation examples).

    The validation prompts are the first ``size`` distinct prompts of ``train`` (in its order, so deterministic in
    the data and seed) that the held-out set does not hold; every training example with one of them is taken out of
    training, so the three splits share no prompt. DataError when ``train`` has too few such prompts.
    """
    if size == 0:
        return train, []
    held = {ex.prompt for ex in held_out}
    chosen: dict[str, Example] = {}
    for ex in train:
        if len(chosen) == size:
            break
        if ex.prompt not in held and ex.prompt not in chosen:
            chosen[ex.prompt] = ex
    rest = [ex for ex in train if ex.prompt not in chosen]
    if len(chosen) < size or not rest:
        raise DataError(
            f"'validation_size' {size}: the {len(train)} training examples hold {len(chosen)} distinct prompts "
            "that are not held out, and training needs some left; lower validation_size"
        )
    return rest, list(chosen.values())
