"""Pairwise judges (arXiv 2508.07750, Sec. 3 and appendix Tables 6-7): ``R(o, y)`` in {-1, 0, 1} of a response o
against the prompt's reference answer y, from any judge function or a local causal LM prompted with a template."""

from __future__ import annotations

import re
import string
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from .base import RewardError, is_number, pop_metrics, qualified_name

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
            if not is_number(v) or v not in VERDICTS:
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
        raise ConfigError(f"'judge.template': cannot read {str(path)!r} ({exc})") from None
    try:
        return check_template(text, f"'judge.template' {str(path)!r}")
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

        from ..models.runtime import Runtime

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
        from ..models import generation

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
