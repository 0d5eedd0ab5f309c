"""Pairwise judge rewards R(o, y) in {-1, 0, 1} (grao.eval.judges): the callable-judge adapter, verdict parsing, the
local-model judge, and both as the trainer's reward."""

from __future__ import annotations

import math
import os
import warnings

import pytest
from utils import TINY_DECODER, read_lines, save_tiny_llama, small

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from grao.config import ConfigError, TrainConfig  # noqa: E402
from grao.eval import judges, rewards  # noqa: E402
from grao.eval.judges import (  # noqa: E402
    JUDGE_TEMPLATE,
    JudgeReward,
    JudgeWarning,
    ModelJudge,
    PromptedJudge,
    parse_verdict,
)
from grao.eval.rewards import RewardError  # noqa: E402
from grao.train.trainer import Trainer  # noqa: E402


class Scripted:
    """A stub judge that returns ``verdicts`` in order, one per call, and records the pairs it was asked."""

    def __init__(self, verdicts):
        self.verdicts, self.asked = list(verdicts), []

    def __call__(self, prompt, response, reference):
        self.asked.append((prompt, response, reference))
        return self.verdicts[len(self.asked) - 1]


class ScriptedBatch(Scripted):
    """The same, answering every pair of a reward call in one ``batch`` call (it has no per-pair form)."""

    __call__ = None

    def __init__(self, verdicts):
        super().__init__(verdicts)
        self.calls = 0

    def batch(self, prompts, responses, references):
        self.calls += 1
        start = len(self.asked)
        self.asked.extend(zip(prompts, responses, references))
        return self.verdicts[start : len(self.asked)]


def test_a_callable_judge_is_a_reward_and_the_reference_ties_with_itself_without_a_call():
    judge = Scripted([1, -1, 0.0])
    reward = JudgeReward(judge)
    prompts, refs = ["p1", "p1", "p2", "p2"], ["y1", "y1", "y2", "y2"]
    got = reward(prompts, ["better one", "  y1 ", "worse one", "a tie"], refs)
    assert got == [1.0, 0.0, -1.0, 0.0] and all(type(v) is float for v in got)
    # the response equal to its reference (up to whitespace) is R(y, y) = 0 and is not sent to the judge
    assert judge.asked == [("p1", "better one", "y1"), ("p2", "worse one", "y2"), ("p2", "a tie", "y2")]
    assert reward(["p1"], ["y1"], ["y1"]) == [0.0] and len(judge.asked) == 3
    assert reward.pop_metrics() == {"judge/asked": 3.0}
    assert reward.pop_metrics() == {"judge/asked": 0.0}  # counted since the last pop
    assert rewards.pop_metrics(rewards.exact_match) == {}  # a plain reward function counts nothing


def test_a_judge_with_a_batch_method_is_called_once_per_reward_call():
    judge = ScriptedBatch([-1, 1, 1])
    reward = JudgeReward(judge)
    assert reward(["p"] * 4, ["a", "b", "y", "c"], ["y"] * 4) == [-1.0, 1.0, 0.0, 1.0]
    assert judge.calls == 1 and judge.asked == [("p", "a", "y"), ("p", "b", "y"), ("p", "c", "y")]


def _judge_raising(prompt, response, reference):
    raise KeyError("no verdict")


@pytest.mark.parametrize(
    "judge, message",
    [
        (Scripted([1, 2]), r"returned 2 \(int\) for completion 1 \('b'\); a judge returns -1"),
        (Scripted([True, 0]), r"returned True \(bool\) for completion 0"),
        (Scripted(["1", 0]), r"returned '1' \(str\)"),
        (Scripted([0.5, 0]), r"returned 0.5 \(float\)"),
        (Scripted([math.nan, 0]), r"returned nan \(float\)"),
        (Scripted([None, 0]), r"returned None \(NoneType\)"),
        (ScriptedBatch([1]), "returned 1 verdicts for 2 pairs"),
        (_judge_raising, "raised KeyError: 'no verdict'"),
    ],
)
def test_bad_verdicts_raise_reward_error_naming_the_judge_and_value(judge, message):
    reward = JudgeReward(judge)
    name = rewards.qualified_name(judge)
    with pytest.raises(RewardError, match=rf"^reward judge {name} {message}"):
        rewards.score(reward, ["p", "p"], ["a", "b"], ["y", "y"])  # score passes the judge's error on as it is


def test_judge_specs_resolve_and_name_what_is_wrong(tmp_path):
    assert isinstance(rewards.resolve("judge:grao.eval.judges:parse_verdict"), JudgeReward)
    with pytest.raises(ConfigError, match="'reward' 'judge:grao.eval.judges:nope': cannot import 'nope'"):
        rewards.resolve("judge:grao.eval.judges:nope")
    with pytest.raises(ConfigError, match="judge model directory .* does not exist"):
        rewards.resolve(f"judge-model:{tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="'judge.template' is set but 'reward' is 'edit'"):
        TrainConfig(reward="edit", judge_template="t.txt")
    for key in ("judge.max_new_tokens", "judge.batch_size"):
        with pytest.raises(ConfigError, match=f"'{key}' must be >= 1"):
            TrainConfig(**{key: 0})


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("better", 1),
        ("Worse.", -1),
        ("  TIE\n", 0),
        ("The candidate reply is better than the reference.", 1),
        ("Verdict: worse\nThe candidate is not better because", -1),  # the first verdict word decides
        ("They are equally good", 0),
        ("the same", 0),
        ("1", 1),
        ("-1", -1),
        ("[[0]]", 0),
        ("+1.", 1),
        ("Worse. The reply is worse.", -1),
        ("better, worse or tie", None),  # two verdicts on the deciding line (an echo of the instructions)
        ("The candidate is better, the reference worse", None),
        ("Let me think.\nTie", 0),
        ("not better", None),  # negated: ambiguous
        ("It isn't worse", None),
        ("betterment", None),  # whole words only
        ("10", None),
        ("1. The reply", None),
        ("========", None),
        ("", None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_a_prompted_judge_batches_its_replies_and_counts_the_unparsed_as_ties():
    seen = []

    def generate(texts):  # a scripted judge model: fixed replies, all of a batch at once
        seen.append(texts)
        return ["Better.", "worse", "I cannot decide", "tie"]

    judge = PromptedJudge(generate)
    reward = JudgeReward(judge)
    with pytest.warns(JudgeWarning, match=r"1 of 4 replies have no verdict .* e\.g\. 'I cannot decide'"):
        got = reward(["q1", "q2", "q3", "q4"], ["o1", "o2", "o3", "o4"], ["y1", "y2", "y3", "y4"])
    assert got == [1.0, -1.0, 0.0, 0.0]
    assert len(seen) == 1 and len(seen[0]) == 4
    text = seen[0][1]  # the built-in template, filled in: conversation, then candidate, then reference
    assert text == JUDGE_TEMPLATE.format(prompt="q2", response="o2", reference="y2")
    assert text.index("q2") < text.index("o2") < text.index("y2") and text.rstrip().endswith("Verdict:")
    assert reward.pop_metrics() == {"judge/asked": 4.0, "judge/unparsed": 1.0}
    assert reward.pop_metrics() == {"judge/asked": 0.0, "judge/unparsed": 0.0}


def test_judge_templates_are_checked(tmp_path):
    custom = tmp_path / "t.txt"
    custom.write_text("{{json}} A: {response}\nB: {reference}\nA vs B?")
    judge = PromptedJudge(lambda texts: ["tie"] * len(texts), judges.read_template(custom))
    assert judge.render("ignored", "o", "y") == "{json} A: o\nB: y\nA vs B?"
    for text, message in [
        ("{response} {reference} {answer}", r"and no other field; it has \['answer', 'reference', 'response'\]"),
        ("{prompt} {response}", "must use {response} and {reference}"),
        ("{response} {reference", "is not a format template"),
    ]:
        custom.write_text(text)
        with pytest.raises(ConfigError, match="^'judge.template' .*" + message.replace("{", r"\{")):
            judges.read_template(custom)
    with pytest.raises(ConfigError, match="'judge.template': cannot read"):
        judges.read_template(tmp_path / "missing.txt")


def save_constant_judge(path, verdict="worse"):
    """A tiny Llama that answers every prompt with the one word ``verdict``: a word-level tokenizer, every
    token's embedding carrying a large constant in dimension 0, and an lm_head that reads only that dimension
    into ``verdict``'s logit."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "better", "worse", "tie", "Verdict:"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    config = transformers.LlamaConfig(**TINY_DECODER, vocab_size=len(words), pad_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 50.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[words.index(verdict), 0] = 10.0
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_a_local_model_judge_parses_its_greedy_reply(tmp_path):
    save_constant_judge(tmp_path / "judge", "worse")
    reward = rewards.resolve(f"judge-model:{tmp_path / 'judge'}", judge_max_new_tokens=1, judge_batch_size=2)
    assert isinstance(reward.judge, ModelJudge)
    with warnings.catch_warnings():
        warnings.simplefilter("error", JudgeWarning)  # every reply parses
        got = reward(["p", "p", "q"], ["a b", "y", "c"], ["y", "y", "d"])
    assert got == [-1.0, 0.0, -1.0]
    assert reward.pop_metrics() == {"judge/asked": 2.0, "judge/unparsed": 0.0}


def test_a_random_local_model_judge_counts_every_reply_without_a_verdict(tmp_path):
    save_tiny_llama(tmp_path / "judge")
    reward = rewards.resolve(f"judge-model:{tmp_path / 'judge'}", judge_max_new_tokens=6, judge_batch_size=2)
    judge = reward.judge
    prompts, responses, refs = ["abc=", "ab=", "xyz="], ["cba", "b", "zz"], ["cab", "ba", "zyx"]
    replies = judge.generate([judge.render(p, o, y) for p, o, y in zip(prompts, responses, refs)])
    unparsed = sum(parse_verdict(r) is None for r in replies)
    assert unparsed > 0  # a random model writes no verdict: the case under test
    with pytest.warns(JudgeWarning, match=f"{unparsed} of 3 replies have no verdict"):
        got = reward(prompts, responses, refs)
    assert got == [float(parse_verdict(r) or 0) for r in replies]
    assert reward.pop_metrics() == {"judge/asked": 3.0, "judge/unparsed": float(unparsed)}


def judge_first_letter(prompt, response, reference):
    """A judge for the demo: better when the response starts with the reference's first letter, else worse."""
    return 1 if response[:1] == reference[:1] else -1


def test_the_trainer_takes_a_judge_from_config_and_logs_its_counts(tmp_path):
    cfg = small(tmp_path, reward=f"judge:{__name__}:judge_first_letter")
    assert Trainer(cfg).train() is True
    lines = read_lines(tmp_path / "run")
    train = [ln for ln in lines if "loss" in ln]
    evals = [ln for ln in lines if "eval/reward" in ln]
    assert len(train) == 2 and len(evals) == 3
    for ln in train:
        assert ln["reward/reference"] == 0.0  # R(y, y) = 0
        assert ln["judge/asked"] <= cfg.prompts_per_step * cfg.group_size and math.isfinite(ln["loss"])
        assert -1.0 <= ln["reward/samples"] <= 1.0
    for ln in evals:
        assert 0 < ln["eval/judge/asked"] <= cfg.eval_size
        assert -1.0 <= ln["eval/reward"] <= 1.0


def test_the_trainer_takes_a_judge_object_and_a_local_model_judge(tmp_path):
    judge = Scripted([1, -1, 0] * 100)
    assert Trainer(small(tmp_path, steps=1), reward=JudgeReward(judge)).train() is True
    assert judge.asked and all(len(pair) == 3 for pair in judge.asked)

    # a random local model as judge writes no verdict at all: the starting model's evaluation says so instead of
    # reporting RAS 1.0 from ties
    save_tiny_llama(tmp_path / "judge")
    cfg = small(tmp_path, steps=1, reward=f"judge-model:{tmp_path / 'judge'}", judge_max_new_tokens=4)
    with pytest.warns(JudgeWarning), pytest.raises(RewardError, match=r"gave no verdict .* in any of its \d+ replies"):
        Trainer(cfg, overwrite=True).train()
