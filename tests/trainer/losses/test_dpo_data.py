"""DPO on the data's own rejected answers (HH-RLHF chosen/rejected): parsing, the choice of source
(``dpo_rejected``), the loss and gradient of a trainer batch against the float64 oracle, and a few training steps."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from utils import (
    assert_close,
    assert_grads_close,
    grads,
    leaves,
    read_lines,
    small,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from oracles import reference_dpo  # noqa: E402

from grao import config, models  # noqa: E402
from grao.config import ConfigError, TrainConfig  # noqa: E402
from grao.data import DataError, Example, load_jsonl, parse_record, rejected_source  # noqa: E402
from grao.eval import rewards  # noqa: E402
from grao.losses import LossBatch  # noqa: E402
from grao.models.generation import encode_reference  # noqa: E402
from grao.train.trainer import IGNORE_INDEX, Trainer, build_batch  # noqa: E402
from grao_kernels.testing import reference_logprobs  # noqa: E402

WORDS = ["abc", "dog", "mule", "hen", "cat", "bird", "ox", "yak"]


def hh_line(word: str) -> dict:
    """An HH-RLHF-style pair: two turns, the chosen answer reverses the word, the rejected one repeats it."""
    prompt = f"\n\nHuman: hi\n\nAssistant: hello\n\nHuman: {word}=\n\nAssistant:"
    return {"chosen": prompt + " " + word[::-1], "rejected": prompt + " " + word}


def write_hh(path, lines) -> str:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def test_rejected_answers_are_parsed_and_must_share_the_prompt(tmp_path):
    ex = parse_record(hh_line("dog"))
    assert ex.prompt.endswith("Human: dog=\n\nAssistant:") and (ex.reference, ex.rejected) == (" god", " dog")
    assert parse_record({"prompt": "p", "reference": "r", "rejected": "x"}) == Example("p", "r", rejected="x")
    assert parse_record({"chosen": hh_line("dog")["chosen"]}).rejected is None
    assert parse_record({"prompt": "p", "reference": "r"}).rejected is None
    other = hh_line("dog")["rejected"].replace("Human: hi", "Human: ho")
    for bad, message in [
        ({"chosen": hh_line("dog")["chosen"], "rejected": other}, r"'rejected' does not continue the prompt of "),
        ({"chosen": hh_line("dog")["chosen"], "rejected": 3}, "'rejected' must be a string, got int"),
        ({"prompt": "p", "reference": "r", "rejected": ["x"]}, "'rejected' must be a string, got list"),
    ]:
        path = write_hh(tmp_path / "bad.jsonl", [hh_line("abc"), bad])
        with pytest.raises(DataError, match="bad.jsonl:2: " + message):
            load_jsonl(path)
    path = write_hh(tmp_path / "bad.jsonl", [{"chosen": hh_line("dog")["chosen"], "rejected": other}])
    with pytest.raises(DataError, match=r"differ from character 10 \('i\\n\\nAssistant"):
        load_jsonl(path)


def test_dpo_rejected_chooses_the_data_only_when_every_example_has_one(tmp_path):
    full = load_jsonl(write_hh(tmp_path / "full.jsonl", [hh_line(w) for w in WORDS[:3]]))
    partial = load_jsonl(write_hh(tmp_path / "partial.jsonl", [hh_line("abc"), {"chosen": hh_line("dog")["chosen"]}]))
    assert [rejected_source(c, full) for c in ("auto", "data", "sampled")] == ["data", "data", "sampled"]
    assert [rejected_source(c, partial) for c in ("auto", "sampled")] == ["sampled", "sampled"]
    with pytest.raises(ConfigError, match=r"'dpo.rejected' is data but .*partial.jsonl:2 has no 'rejected' answer"):
        rejected_source("data", partial)
    with pytest.raises(ConfigError, match="'dpo.rejected' must be one of auto, data, sampled"):
        TrainConfig(dpo_rejected="worst")
    assert config.resume_conflicts(TrainConfig(), TrainConfig(dpo_rejected="data")) == [
        "dpo.rejected: 'auto' -> 'data'"
    ]


def hh_config(tmp_path, **kw) -> TrainConfig:
    """utils.small's few steps, on 8 HH pairs (the last 2 held out) with dpo."""
    data = write_hh(tmp_path / "hh.jsonl", [hh_line(w) for w in WORDS])
    base = dict(data=data, eval_size=2, method="dpo", dpo_beta=0.5, prompts_per_step=3, group_size=2)
    return small(tmp_path, **{**base, "eval_every": 2, "save_every": 2, "loss_backend": "torch", **kw})


def test_a_trainer_batch_of_hh_pairs_has_the_float64_dpo_loss_and_gradient(tmp_path):
    trainer = Trainer(hh_config(tmp_path))
    assert trainer.rejected_source == "data"
    trainer.train_step(1)  # the policy moves away from the frozen start: margins are no longer 0
    examples = trainer.prompts_for_step(2)
    rollout = trainer.rollout(examples, 2)
    tok = trainer.tokenizer
    # each group: the rejected answer as its one completion, then the chosen (the reference), both ended by eos
    assert rollout.completion_ids == [
        [encode_reference(tok, ex.rejected), encode_reference(tok, ex.reference)] for ex in examples
    ]
    assert rollout.completions == [[ex.rejected] for ex in examples] and rollout.rewards.shape == (3, 2)

    ids, mask, targets = build_batch(rollout, range(3), tok.pad_token_id, "cpu")
    inner = models.unwrap(trainer.model)
    hidden = models.backbone(inner)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.detach()
    weight, bias = models.output_head(inner)
    ref_model = trainer.reference_model  # the frozen start's token log-probs, from its materialised logits
    ref_hidden = models.backbone(ref_model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    frozen = reference_logprobs(ref_hidden.double(), models.output_head(ref_model)[0].double(), targets).detach()
    h, w = leaves(hidden, weight.detach())
    out = trainer.loss(
        LossBatch(
            h,
            w,
            None,
            targets,
            rollout.rewards,
            group_size=1,
            groups=range(3),
            num_groups=3,
            ignore_index=IGNORE_INDEX,
            reference_logp=frozen.float(),
        )
    )
    assert bias is None
    h64, w64 = leaves(hidden, weight.detach(), dtype=torch.float64)
    want = reference_dpo(h64, w64, targets, rollout.rewards, frozen, beta=0.5, rejected=[0, 0, 0])
    assert_close(out.loss.detach(), want.detach(), rtol=1e-5, atol=1e-6, name="dpo loss")
    want_grads = grads(want, h64, w64)
    assert_grads_close(grads(out.loss, h, w), want_grads, names=("hidden", "weight"))
    assert abs(float(want.detach()) - math.log(2)) > 1e-4  # not the start's log 2: the margins carry signal
    # the trainer's own step on this rollout: the lm_head weight (untied; the MoE router loss does not reach it)
    # gets the oracle's gradient
    stats = trainer.accumulate_gradients(rollout)
    assert stats["objective/dpo"] == pytest.approx(float(want.detach()), rel=1e-5)
    assert_grads_close([weight.grad], want_grads[1:], names=("weight",))


def test_dpo_trains_on_hh_pairs_without_sampling_and_sampled_keeps_the_g_samples(tmp_path):
    cfg = hh_config(tmp_path)
    trainer = Trainer(cfg)
    steps = [trainer.prompts_for_step(s) for s in (1, 2)]
    assert trainer.train() is True
    lines = [ln for ln in read_lines(tmp_path / "run") if "loss" in ln]
    assert len(lines) == 2 and all(math.isfinite(ln["loss"]) for ln in lines)
    assert lines[0]["objective/dpo"] == pytest.approx(math.log(2), rel=1e-5)  # the policy starts as its reference
    assert lines[1]["objective/dpo"] != pytest.approx(math.log(2), rel=1e-4)
    for ln, examples in zip(lines, steps):
        # the group's one "sample" is the data's rejected answer: its reward and length are the step's
        prompts, refs, rejected = ([getattr(ex, k) for ex in examples] for k in ("prompt", "reference", "rejected"))
        assert ln["reward/samples"] == pytest.approx(sum(rewards.edit_similarity(prompts, rejected, refs)) / 3)
        want_len = sum(len(encode_reference(trainer.tokenizer, r)) for r in rejected) / 3
        assert ln["completion_len"] == pytest.approx(want_len)

    sampled = Trainer(hh_config(tmp_path, dpo_rejected="sampled"), overwrite=True)
    assert sampled.rejected_source == "sampled"
    rollout = sampled.rollout(sampled.prompts_for_step(1), 1)
    assert rollout.rewards.shape == (3, cfg.group_size + 1) and len(rollout.completions[0]) == cfg.group_size
    assert sampled.train() is True
