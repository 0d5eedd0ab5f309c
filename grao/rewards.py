"""Rewards: any callable ``reward(prompts, completions, references) -> list[float]``.

Built-ins, selected by name in the config's ``reward`` key:

- ``demo``: the demo task's checker (:func:`grao.demo_task.reward`), partial credit in [0, 1];
- ``exact``: 1.0 when the stripped completion equals the stripped reference, else 0.0;
- ``edit``: normalised edit similarity ``1 - levenshtein(c, r) / max(len(c), len(r))`` in [0, 1];
- ``model:DIR``: a local ``AutoModelForSequenceClassification`` scoring prompt + completion;
- ``judge-model:DIR``: a local causal LM as a pairwise judge (:class:`ModelJudge`), R(o, y) in {-1, 0, 1};
- ``judge:package.module:function``: any importable pairwise judge (:class:`JudgeReward`);
- ``package.module:function``: any importable callable.

A pairwise judge (arXiv 2508.07750, Sec. 3 and appendix Tables 6-7) rates a
response o against the prompt's reference answer y: ``R(o, y) = 1`` when o is
better, ``0`` for a tie, ``-1`` when it is worse. The reference is the zero
point of that scale: compared with itself it ties, ``R(y, y) = 0``, which is
the reference answer's own reward in its group (the judge is not asked; see
:class:`JudgeReward`). With these rewards RAS, the share of responses with
``R >= R(y, y) = 0``, is the paper's share of responses that win or tie
against the reference.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
import string
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import demo_task
from .config import ConfigError

Reward = Callable[[list[str], list[str], list[str]], list[float]]


def exact_match(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    return [float(c.strip() == r.strip()) for c, r in zip(completions, references)]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    out = []
    for c, r in zip(completions, references):
        c, r = c.strip(), r.strip()
        n = max(len(c), len(r))
        out.append(1.0 if n == 0 else 1.0 - levenshtein(c, r) / n)
    return out


class RewardModel:
    """A local sequence-classification model; the reward is its logit (the last one if it has several)."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"'reward': reward model directory {str(path)!r} does not exist")
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(self.device)
        self.model.eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
        out: list[float] = []
        texts = [p + c for p, c in zip(prompts, completions)]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True, truncation=True)
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
            out.extend(logits[:, -1].float().tolist())
        return out


BUILTIN: dict[str, Reward] = {"demo": demo_task.reward, "exact": exact_match, "edit": edit_similarity}
JUDGE_MODEL, JUDGE = "judge-model:", "judge:"


def _import(spec: str, target: str):
    """The callable ``package.module:function`` names; ConfigError quoting the ``reward`` value ``spec``."""
    module, _, name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"'reward' {spec!r}: cannot import {name!r} from {module!r} ({exc})") from None
    if not callable(fn):
        raise ConfigError(f"'reward' {spec!r} is not callable")
    return fn


def resolve(
    spec: str,
    data: str = "demo",
    device: torch.device | str = "cpu",
    *,
    judge_template: str | None = None,
    judge_max_new_tokens: int = 16,
    judge_batch_size: int = 16,
) -> Reward:
    """The reward named by a config value (see the module docstring); ConfigError for an unknown one.

    ``judge_*``: the ``judge-model:DIR`` judge's template file (None: :data:`JUDGE_TEMPLATE`), verdict
    length in tokens and prompts per generate call (:func:`judge_options` reads them from a config).
    """
    if spec == "auto":
        spec = "demo" if data == "demo" else "edit"
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("model:"):
        return RewardModel(spec[len("model:") :], device=device)
    if spec.startswith(JUDGE_MODEL):
        template = JUDGE_TEMPLATE if judge_template is None else read_template(judge_template)
        judge = ModelJudge(
            spec[len(JUDGE_MODEL) :],
            device=device,
            template=template,
            max_new_tokens=judge_max_new_tokens,
            batch_size=judge_batch_size,
        )
        return JudgeReward(judge)
    if spec.startswith(JUDGE):
        return JudgeReward(_import(spec, spec[len(JUDGE) :]))
    if ":" in spec:
        return _import(spec, spec)
    raise ConfigError(
        f"unknown reward {spec!r}: use auto, {', '.join(BUILTIN)}, model:DIR, judge-model:DIR, "
        "judge:package.module:function or package.module:function"
    )


def judge_options(cfg) -> dict:
    """The keyword arguments of :func:`resolve` a TrainConfig's ``judge_*`` keys give."""
    return dict(
        judge_template=cfg.judge_template,
        judge_max_new_tokens=cfg.judge_max_new_tokens,
        judge_batch_size=cfg.judge_batch_size,
    )


def pop_metrics(reward: Reward) -> dict[str, float]:
    """What ``reward`` counted since the last call (a reward with a ``pop_metrics()`` method, such as
    :class:`JudgeReward`), for the metrics line; {} for a plain function."""
    pop = getattr(reward, "pop_metrics", None)
    return dict(pop()) if callable(pop) else {}


class RewardError(RuntimeError):
    """A reward function that raised or returned something other than one finite number per completion."""


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


def qualified_name(reward: Reward) -> str:
    """``module.qualname`` of a reward function (or of its class, for a callable object)."""
    target = reward if hasattr(reward, "__qualname__") else type(reward)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def _is_number(value) -> bool:
    # bool is an int and "0.5" converts with float(): neither is a score, both hide a bug in the reward
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def score(reward: Reward, prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """Call ``reward``; RewardError naming it unless it returns one finite real number per completion."""
    who = f"reward {qualified_name(reward)}"
    try:
        values = reward(prompts, completions, references)
    except RewardError:  # already names the culprit (a judge and its verdict)
        raise
    except Exception as exc:
        raise RewardError(f"{who} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(values, (torch.Tensor, np.ndarray)):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(f"{who} returned {values!r}; expected a list of {len(completions)} numbers")
    values = list(values)
    if len(values) != len(completions):
        raise RewardError(f"{who} returned {len(values)} values for {len(completions)} completions")
    for i, v in enumerate(values):
        if not _is_number(v):
            raise RewardError(f"{who} returned {v!r} ({type(v).__name__}) for completion {i}; expected a real number")
        if not math.isfinite(v):
            raise RewardError(f"{who} returned {v!r} for completion {i} ({completions[i]!r}); rewards must be finite")
    return [float(v) for v in values]


def statistics(rewards: torch.Tensor) -> dict[str, float]:
    """Per-step statistics of a (P, G+1) reward tensor (the G samples, then the reference), for the metrics line.

    ``reward/std`` and the quartiles ``reward/q25``, ``reward/q50``, ``reward/q75`` are over the P·G sampled
    rewards (population std). ``reward/zero_std_groups`` is the share of prompts whose G+1 rewards are all
    equal: their normalised advantages are all 0, so they give GRAO no gradient.
    """
    samples = rewards[:, :-1].double().flatten()
    q25, q50, q75 = torch.quantile(samples, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    tied = (rewards == rewards[:, :1]).all(1)
    return {
        "reward/std": float(samples.std(correction=0)),
        "reward/q25": q25,
        "reward/q50": q50,
        "reward/q75": q75,
        "reward/zero_std_groups": float(tied.double().mean()),
    }


# ---------------------------------------------------------------------- pairwise judges

Judge = Callable[[str, str, str], int]  # judge(prompt, response, reference) -> -1 | 0 | 1
VERDICTS = (-1, 0, 1)  # worse than the reference, a tie, better


class JudgeReward:
    """A pairwise judge as a :data:`Reward`: ``R(o, y) = judge(prompt, o, y)`` in {-1, 0, 1}.

    ``judge`` is any callable ``judge(prompt, response, reference) -> -1 | 0 | 1``
    (1: the response is better than the reference, 0: a tie, -1: worse). A
    judge with a method ``batch(prompts, responses, references) -> list`` is
    given all the pairs of a reward call at once instead (:class:`ModelJudge`
    batches its generation so). Each verdict must be -1, 0 or 1 (an int, or a
    float equal to one); anything else, or a judge that raises, is a
    RewardError naming the judge, the value and the completion.

    A response equal to its reference (up to surrounding whitespace) is a tie
    by definition and is not sent to the judge: the reference answer's own
    reward in its group is ``R(y, y) = 0``. That is what the paper's scale
    implies (a response is rated against the reference, so the reference sits
    at the tie); asking the judge instead would make the zero point depend on
    a model's position bias and cost a call per prompt.

    :meth:`pop_metrics` counts the pairs sent to the judge (``judge/asked``)
    and, for a judge that counts them, the verdicts it could not parse
    (``judge/unparsed``, scored as ties).
    """

    def __init__(self, judge: Judge):
        if not callable(judge) and not callable(getattr(judge, "batch", None)):
            raise TypeError(f"a judge must be callable as judge(prompt, response, reference), got {judge!r}")
        self.judge = judge
        self.who = f"reward judge {qualified_name(judge)}"
        self._asked = 0

    def __call__(self, prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
        out = [0.0] * len(completions)
        asked = [i for i, (c, r) in enumerate(zip(completions, references)) if c.strip() != r.strip()]
        if not asked:
            return out
        args = ([prompts[i] for i in asked], [completions[i] for i in asked], [references[i] for i in asked])
        try:
            batch = getattr(self.judge, "batch", None)
            verdicts = batch(*args) if callable(batch) else [self.judge(p, c, r) for p, c, r in zip(*args)]
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(f"{self.who} raised {type(exc).__name__}: {exc}") from exc
        if isinstance(verdicts, (torch.Tensor, np.ndarray)):
            verdicts = verdicts.tolist()
        if isinstance(verdicts, (str, bytes)) or not hasattr(verdicts, "__len__") or len(verdicts) != len(asked):
            got = f"{len(verdicts)} verdicts" if hasattr(verdicts, "__len__") else repr(verdicts)
            raise RewardError(f"{self.who} returned {got} for {len(asked)} pairs; expected one of -1, 0, 1 per pair")
        for i, v in zip(asked, verdicts):
            if not _is_number(v) or v not in VERDICTS:
                raise RewardError(
                    f"{self.who} returned {v!r} ({type(v).__name__}) for completion {i} ({completions[i][:80]!r}); "
                    "a judge returns -1 (worse than the reference), 0 (a tie) or 1 (better)"
                )
            out[i] = float(v)
        self._asked += len(asked)
        return out

    def pop_metrics(self) -> dict[str, float]:
        """``judge/asked`` (and the judge's own counts) since the last call; the counts restart at 0."""
        out = {"judge/asked": float(self._asked), **pop_metrics(self.judge)}
        self._asked = 0
        return out


# Our wording of a pairwise judge prompt in the manner of the paper's (arXiv 2508.07750, appendix Tables 6-7):
# the conversation, the candidate and the reference, criteria, then a one-word verdict. The answer format is
# restated at the end so that a prompt cut from the left (ModelJudge keeps the last tokens) still ends with it.
JUDGE_TEMPLATE = """You are an impartial judge. Read the conversation, then compare a candidate reply with a \
reference reply to its last turn. Judge which reply serves the user better: helpful and on topic, correct, \
honest, and harmless. Do not prefer a reply for its length or its position.

### Conversation
{prompt}

### Candidate reply
{response}

### Reference reply
{reference}

Is the candidate reply better than, worse than, or as good as the reference reply? Answer with one word: \
better, worse or tie.
Verdict:"""
TEMPLATE_FIELDS = ("prompt", "response", "reference")


def check_template(template: str, source: str = "the judge template") -> str:
    """``template`` if it is a str.format template with ``{response}`` and ``{reference}`` (and optionally
    ``{prompt}``) as its only fields; ValueError naming ``source`` otherwise. Write ``{{`` for a brace."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"{source} is not a format template ({exc}); write {{{{ and }}}} for braces") from None
    unknown, missing = fields - set(TEMPLATE_FIELDS), {"response", "reference"} - fields
    if unknown or missing:
        raise ValueError(
            f"{source} must use {{response}} and {{reference}} (and may use {{prompt}}) and no other field; "
            f"it has {sorted(fields)}"
        )
    return template


def read_template(path: str | Path) -> str:
    """The judge template in a UTF-8 text file (``judge_template``); ConfigError naming the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"'judge_template': cannot read {str(path)!r} ({exc})") from None
    try:
        return check_template(text, f"'judge_template' {str(path)!r}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


_NUMBER = re.compile(r"\s*\[*\s*([+-]?[01])\s*\]*\s*[.!]?\s*")
_WORDS = {"better": 1, "worse": -1, "tie": 0, "tied": 0, "equal": 0, "equally": 0, "same": 0, "draw": 0}
_WORD = re.compile(r"\b(" + "|".join(_WORDS) + r")\b", re.IGNORECASE)
_NEGATED = re.compile(r"(\bnot|\bno|n't)\s*$", re.IGNORECASE)


def parse_verdict(text: str) -> int | None:
    """The verdict -1, 0 or 1 in a judge's reply, or None when there is none.

    A reply that is only a number (``1``, ``-1``, ``0``, ``+1``, optionally in
    brackets or followed by a full stop) is that number. Otherwise the first
    line with one of the words better (1), worse (-1), tie / tied / equal /
    equally / same / draw (0), as a whole word in any case, decides, when it
    names one verdict only: a line with two ("better, worse or tie", a judge
    echoing the instructions) or a negated first word ("not better") is
    ambiguous and gives None.
    """
    number = _NUMBER.fullmatch(text)
    if number:
        return int(number.group(1))
    for line in text.splitlines():
        words = list(_WORD.finditer(line))
        if not words:
            continue
        verdicts = {_WORDS[w.group(1).lower()] for w in words}
        if len(verdicts) > 1 or _NEGATED.search(line[: words[0].start()]):
            return None
        return verdicts.pop()
    return None


class JudgeWarning(UserWarning):
    """Judge verdicts that could not be parsed (scored as ties)."""


class PromptedJudge:
    """A judge that writes its verdicts as text: each (prompt, response, reference) is rendered through
    ``template``, ``generate(texts) -> replies`` answers all of a batch at once, and :func:`parse_verdict`
    reads each reply.

    A reply without a verdict scores 0 (a tie), never silently: each batch
    with some warns (JudgeWarning, with an example reply), and
    :meth:`pop_metrics` reports their number as ``judge/unparsed``.
    """

    def __init__(self, generate: Callable[[list[str]], list[str]], template: str = JUDGE_TEMPLATE, name: str = ""):
        self.generate, self.template = generate, check_template(template)
        self.name = name or qualified_name(generate)
        self._unparsed = 0

    def render(self, prompt: str, response: str, reference: str) -> str:
        return self.template.format(prompt=prompt, response=response, reference=reference)

    def batch(self, prompts: list[str], responses: list[str], references: list[str]) -> list[int]:
        texts = [self.render(p, o, y) for p, o, y in zip(prompts, responses, references)]
        replies = list(self.generate(texts))
        if len(replies) != len(texts):
            raise ValueError(f"the judge's generate returned {len(replies)} replies for {len(texts)} prompts")
        verdicts = [parse_verdict(r) for r in replies]
        bad = [r for r, v in zip(replies, verdicts) if v is None]
        if bad:
            self._unparsed += len(bad)
            warnings.warn(
                f"judge {self.name}: {len(bad)} of {len(replies)} replies have no verdict (better, worse or tie) "
                f"and score 0 as ties, e.g. {bad[0][:120]!r}; judge/unparsed in the metrics counts them",
                JudgeWarning,
                stacklevel=2,
            )
        return [0 if v is None else v for v in verdicts]

    def __call__(self, prompt: str, response: str, reference: str) -> int:
        return self.batch([prompt], [response], [reference])[0]

    def pop_metrics(self) -> dict[str, float]:
        out = {"judge/unparsed": float(self._unparsed)}
        self._unparsed = 0
        return out


class ModelJudge(PromptedJudge):
    """A local Hugging Face causal LM as a pairwise judge (``reward: judge-model:DIR``).

    Each pair is rendered through ``template`` (a chat model's tokenizer
    renders it as one user message through its chat template), cut to the
    last tokens the model's context holds, and answered greedily with up to
    ``max_new_tokens`` tokens, ``batch_size`` prompts per generate call; the
    reply is parsed by :func:`parse_verdict`. bf16 on CUDA, fp32 on CPU.
    """

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        *,
        template: str = JUDGE_TEMPLATE,
        max_new_tokens: int = 16,
        batch_size: int = 16,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .runtime import Runtime

        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"'reward': judge model directory {str(path)!r} does not exist")
        self.runtime = Runtime(torch.device(device), None, "sdpa")
        dtype = torch.bfloat16 if self.runtime.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model.to(self.runtime.device).eval().requires_grad_(False)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        context = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_prompt_tokens = max(1, context - max_new_tokens)
        super().__init__(self._generate, template, name=str(path))

    def _generate(self, texts: list[str]) -> list[str]:
        from . import generation

        ids = [generation.encode_prompt(self.tokenizer, t, self.max_prompt_tokens, chat_template=True) for t in texts]
        out = generation.generate(
            self.model,
            self.tokenizer,
            ids,
            self.runtime,
            sample=False,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )
        return generation.decode(self.tokenizer, out)
