"""The grao trainer on the built-in tiny MoE (CPU, seconds per test)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from utils import assert_same_run, read_lines, save_tiny_llama, small  # noqa: E402

from grao import cli, config, models  # noqa: E402
from grao.config import ConfigError  # noqa: E402
from grao.data import DataError, Example, load_jsonl, parse_record  # noqa: E402
from grao.eval import evaluate  # noqa: E402
from grao.losses import GRAO, LossBatch, LossOutput  # noqa: E402
from grao.train.checkpoint import latest as latest_checkpoint  # noqa: E402
from grao.train.trainer import Trainer  # noqa: E402

TRAIN_KEYS = (
    "reward/samples",
    "reward/reference",
    "reward/std",
    "reward/q25",
    "reward/q50",
    "reward/q75",
    "reward/zero_std_groups",
    "loss",
    "objective/exploration",
    "objective/imitation",
    "objective/alignment",
    "moe/aux_loss",
    "tokens_per_s",
    "time/generate",
    "time/train",
)


def test_two_step_run_of_the_tiny_moe(tmp_path):
    cfg = small(tmp_path, plot=True)
    trainer = Trainer(cfg)
    assert models.moe_info(trainer.model) == (4, 2)
    assert trainer.train() is True
    run = tmp_path / "run"
    lines = read_lines(run)
    train = [ln for ln in lines if "loss" in ln]
    evals = [ln for ln in lines if "eval/reward" in ln]
    assert [ln["step"] for ln in train] == [1, 2]
    assert [ln["step"] for ln in evals] == [0, 1, 2]
    for ln in train:
        assert set(TRAIN_KEYS) <= set(ln)
        assert all(torch.isfinite(torch.tensor(float(ln[k]))) for k in TRAIN_KEYS)
        assert ln["moe/aux_loss"] > 0 and len(ln["moe/expert_load"]) == 4
        assert ln["reward/reference"] == 1.0
        # loss = -(sum of the three terms) + aux
        terms = ln["objective/exploration"] + ln["objective/imitation"] + ln["objective/alignment"]
        assert ln["loss"] == pytest.approx(-terms + 0.01 * ln["moe/aux_loss"], rel=1e-4, abs=1e-5)
    for ln in evals:
        assert {"eval/reward", "eval/ras", "eval/nag"} <= set(ln)
    assert (run / "plot.png").stat().st_size > 0
    assert config.load(run / "config.yaml") == cfg
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step-000002"
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"} <= {
        p.name for p in ckpt.iterdir()
    }
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and {"optimizer", "scheduler", "rng"} <= set(state)
    assert (run / "initial" / "config.json").is_file()


def test_lm_head_is_never_called_for_the_loss(tmp_path):
    trainer = Trainer(small(tmp_path))
    head = trainer.model.get_output_embeddings()
    real_forward = head.forward

    def forward(x):
        # generate() needs next-token logits (under no_grad); the training forward must never build them
        if torch.is_grad_enabled():
            raise AssertionError(f"lm_head called in the training step on {tuple(x.shape)}")
        return real_forward(x)

    head.forward = forward
    before = head.weight.detach().clone()
    metrics = trainer.train_step(1)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert not torch.equal(before, head.weight.detach())  # the head still trained, through grao_loss

    rollout = trainer.rollout(trainer.prompts_for_step(2), 2)

    def never(x):
        raise AssertionError("lm_head called")

    head.forward = never
    trainer.update(rollout)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_micro_batches_accumulate_to_the_one_batch_gradient(tmp_path):
    cfg = small(tmp_path, prompts_per_step=4, group_size=3, router_aux_loss_coef=0.5)  # a large aux weight
    trainer = Trainer(cfg)
    rollout = trainer.rollout(trainer.prompts_for_step(1), 1)
    assert len({len(c) for g in rollout.completion_ids for c in g}) > 1  # padding differs between micro-batches
    whole = trainer.accumulate_gradients(rollout)
    g_whole = _grads(trainer.model)
    for mb in (1, 3):
        trainer.cfg.micro_batch_prompts = mb
        split = trainer.accumulate_gradients(rollout)
        g_split = _grads(trainer.model)
        assert g_split.keys() == g_whole.keys()
        for name, g in g_whole.items():
            torch.testing.assert_close(g_split[name], g, rtol=1e-4, atol=1e-6, msg=f"{name}, micro-batch {mb}")
        for key in ("loss", "objective/exploration", "objective/imitation", "objective/alignment", "moe/aux_loss"):
            assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6)


class Float64ReferenceGRAO:
    """The GRAO loss of the float64 eager oracle (logits materialised), as a trainer loss."""

    def __init__(self):
        self.calls = 0

    def __call__(self, batch: LossBatch) -> LossOutput:
        from grao_kernels.testing import reference_grao

        self.calls += 1
        bias = None if batch.bias is None else batch.bias.double()
        ref = reference_grao(
            batch.hidden.double(),
            batch.weight.double(),
            batch.targets,
            batch.rewards.double(),
            bias=bias,
            logit_scale=batch.logit_scale,
            softcap=batch.softcap,
            ignore_index=batch.ignore_index,
        )
        share = len(batch.groups) / batch.num_groups
        metrics = {f"objective/{t}": float(ref[t].detach()) * share for t in GRAO.TERMS}
        return LossOutput(ref["loss"].float() * share, metrics)


def test_the_loss_is_a_constructor_argument(tmp_path):
    # the trainer's default loss and the float64 oracle plugged in through the seam, micro-batched differently
    default = Trainer(small(tmp_path / "a", prompts_per_step=3))
    rollout = default.rollout(default.prompts_for_step(1), 1)
    stats = default.accumulate_gradients(rollout)
    oracle_loss = Float64ReferenceGRAO()
    oracle = Trainer(small(tmp_path / "b", prompts_per_step=3, micro_batch_prompts=2), loss=oracle_loss)
    oracle_stats = oracle.accumulate_gradients(rollout)
    assert oracle_loss.calls == 2  # groups (0, 1), then (2,)
    for key in ("loss", "objective/exploration", "objective/imitation", "objective/alignment"):
        assert oracle_stats[key] == pytest.approx(stats[key], rel=1e-4, abs=1e-6), key
    g_default, g_oracle = _grads(default.model), _grads(oracle.model)
    assert g_default.keys() == g_oracle.keys()
    for name, g in g_default.items():
        torch.testing.assert_close(g_oracle[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    kw = dict(steps=4, save_every=2, eval_every=2)
    full = Trainer(small(tmp_path / "a", **kw))
    assert full.train() is True

    def ctrl_c(trainer, step, metrics):  # a real SIGINT after step 3: the handler finishes the step and saves
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = small(tmp_path / "b", **kw)
    first = Trainer(cfg, callbacks=[ctrl_c])
    assert first.train() is False
    assert latest_checkpoint(tmp_path / "b" / "run").name == "step-000003"
    (tmp_path / "b" / "run" / "checkpoints" / "step-000003").rename(tmp_path / "b" / "run" / "checkpoints" / "x")
    # resume from step 2, as if the process died during step 3 (its logged lines are dropped)
    second = Trainer(cfg, resume=True)
    assert second.step == 2
    assert second.train() is True
    assert_same_run(tmp_path / "a" / "run", tmp_path / "b" / "run", (full.model, second.model))


def test_hh_rlhf_lines_are_split_at_the_last_assistant_turn(tmp_path):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: It is 4."
    ex = parse_record({"chosen": chosen, "rejected": chosen[:-5] + "5."})
    assert ex == Example(
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant:", " It is 4.", rejected=" It 5."
    )
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"chosen": chosen, "rejected": chosen[:-5] + "5."})
        + "\n\n"
        + json.dumps({"prompt": "p", "reference": "r"})
        + "\n"
    )
    assert load_jsonl(path) == [ex, Example("p", "r")]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "reference": ', ":2: invalid JSON"),
        ('{"question": "q", "answer": "a"}', ":2: expected keys 'prompt' and 'reference'"),
        ('{"chosen": "no assistant turn", "rejected": ""}', ":2: 'chosen' has no"),
        ('{"prompt": 1, "reference": "r"}', ":2: 'prompt' and 'reference' must be strings"),
        ("[1, 2]", ":2: expected a JSON object"),
    ],
)
def test_bad_data_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "reference": "r"}\n' + line + "\n")
    with pytest.raises(DataError, match="bad.jsonl" + message.replace("(", r"\(")):
        load_jsonl(path)


def test_ras_and_nag_on_a_hand_computed_example():
    model = [0.9, 0.5, 0.2, 1.0]
    reference = [0.8, 0.5, 0.4, 0.1]  # wins on prompts 0 and 3, ties on 1, loses on 2
    baseline = [0.1, 0.6, 0.2, 0.3]  # trained wins on 0 and 3, loses on 1, ties on 2
    assert evaluate.win_tie_loss(model, reference, "ras") == (2, 1, 1)
    assert evaluate.ras(model, reference) == 0.75  # a tie counts for RAS
    assert evaluate.nag(model, baseline) == 0.25  # (2 wins - 1 loss) / 4
    res = evaluate.EvalResult(["a"] * 4, model, reference)
    assert res.mean_reward == pytest.approx(0.65) and res.ras == 0.75


def test_reward_statistics_of_a_step():
    from grao.eval import rewards

    r = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0], [0.5, 0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5, 1.0]])
    stats = rewards.statistics(r)  # samples: 0 1 2 3 and four 0.5s twice; the reference (last column) is left out
    samples = torch.tensor([0.0, 1.0, 2.0, 3.0] + [0.5] * 8, dtype=torch.float64)
    assert stats["reward/std"] == pytest.approx(float(samples.std(correction=0)))
    # sorted: 0, eight 0.5s, 1, 2, 3; linear interpolation at 0.25·11, 0.5·11, 0.75·11
    assert (stats["reward/q25"], stats["reward/q50"], stats["reward/q75"]) == (0.5, 0.5, pytest.approx(0.625))
    assert stats["reward/zero_std_groups"] == pytest.approx(1 / 3)  # only the second group is tied, reference included


@pytest.mark.parametrize(
    "trained,baseline,ras,nag",
    [
        ([-1, -1, 0, 1], [1, 1, 0, 1], 0.5, -0.5),  # a pairwise judge's verdicts: mostly worse, NAG < 0
        ([0, 0, 0], [0, 0, 0], 1.0, 0.0),  # all ties: as good as the reference, no net gain
        ([1, 1], [0, -1], 1.0, 1.0),
        ([-1], [1], 0.0, -1.0),
    ],
)
def test_ras_counts_ties_and_nag_is_net_of_losses(trained, baseline, ras, nag):
    assert evaluate.ras(trained, baseline) == ras
    assert evaluate.nag(trained, baseline) == nag


def test_ras_and_nag_need_paired_rewards():
    with pytest.raises(ValueError, match="ras needs two equally long.*3 and 2"):
        evaluate.ras([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="nag needs"):
        evaluate.nag([], [])


def test_eval_cli_reports_reward_ras_and_nag(tmp_path, capsys):
    Trainer(small(tmp_path)).train()
    assert cli.main(["eval", "--run", str(tmp_path / "run")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompts"] == 4 and {"eval/reward", "eval/ras", "eval/nag", "baseline/reward"} <= set(out)


@pytest.mark.parametrize(
    "text, suffix, message",
    [
        ("stpes: 3\n", ".yaml", "unknown config key 'stpes'.*did you mean 'steps'"),
        ("steps: three\n", ".yaml", "'steps'.*must be an integer, got 'three'"),
        ("steps: 0\n", ".yaml", "'steps' must be >= 1"),
        ("lr_schedule: cosin\n", ".yaml", "'lr_schedule' must be one of"),
        ("steps: [1\n", ".yaml", "invalid YAML"),
        ("- 1\n- 2\n", ".yaml", "top level must be a mapping"),
        ("steps = \n", ".toml", "invalid TOML"),
        ("steps: 1\n", ".json", "must end in .yaml, .yml or .toml"),
    ],
)
def test_bad_config_gives_a_clear_error(tmp_path, text, suffix, message):
    path = tmp_path / ("cfg" + suffix)
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(path)


def test_config_file_then_flags(tmp_path, capsys):
    path = tmp_path / "cfg.toml"
    path.write_text("steps = 7\nlr = 0.5\nmodel_overrides = {num_hidden_layers = 1}\n")
    cfg = config.load(path, {"lr": "0.25", "eval_greedy": "false"})
    assert (cfg.steps, cfg.lr, cfg.eval_greedy, cfg.model_overrides) == (7, 0.25, False, {"num_hidden_layers": 1})
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", "--steps", "-1", "--output-dir", str(tmp_path / "r")]) == 2
    assert "'steps' must be >= 1" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert cli.main(["train", "--data", str(bad), "--output-dir", str(tmp_path / "r")]) == 2
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err


def test_local_dense_model_dir_with_jsonl_data(tmp_path, capsys):
    save_tiny_llama(tmp_path / "llama")
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"{w}=", "reference": w[::-1]}) + "\n"
            for w in ("abc", "bca", "cab", "acb", "bac", "cba")
        )
    )
    cfg = small(tmp_path, model=str(tmp_path / "llama"), data=str(path), steps=1, eval_size=2)
    trainer = Trainer(cfg)
    assert trainer.moe is None and trainer.cfg.reward == "auto"
    assert len(trainer.train_examples) == 4 and len(trainer.eval_examples) == 2
    assert trainer.train()
    line = [ln for ln in read_lines(tmp_path / "run") if "loss" in ln][0]
    assert line["moe/aux_loss"] == 0.0 and "moe/expert_load" not in line
    assert not (tmp_path / "run" / "initial").exists()  # the baseline for NAG is the model directory itself
    ckpt = str(latest_checkpoint(tmp_path / "run"))
    plain = ["eval", "--run", str(tmp_path / "no-run"), "--model", ckpt, "--data", str(path)]
    assert cli.main(plain) == 0
    assert "eval/nag" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli.main([*plain, "--baseline", str(tmp_path / "llama"), "--output", str(tmp_path / "e.json")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompts"] == 6 and "eval/nag" in out
    assert len(json.loads((tmp_path / "e.json").read_text())["responses"]) == 6


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    plain = Trainer(small(tmp_path / "a"))
    rollout = plain.rollout(plain.prompts_for_step(1), 1)
    plain.accumulate_gradients(rollout)
    ckpt = Trainer(small(tmp_path / "b", gradient_checkpointing=True))
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.model.modules())
    ckpt.accumulate_gradients(rollout)
    g_plain, g_ckpt = _grads(plain.model), _grads(ckpt.model)
    for name, g in g_plain.items():
        torch.testing.assert_close(g_ckpt[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_cli_resume_continues_the_run(tmp_path, capsys):
    out = str(tmp_path / "r")
    flags = [
        "--steps",
        "2",
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "3",
        "--demo-train-size",
        "16",
        "--eval-size",
        "2",
        "--save-every",
        "1",
        "--progress",
        "false",
        "--plot",
        "false",
        "--output-dir",
        out,
    ]
    assert cli.main(["train", *flags]) == 0
    assert cli.main(["train", "--output-dir", out, "--resume", "--steps", "3"]) == 0
    lines = read_lines(tmp_path / "r")
    assert [ln["step"] for ln in lines if "loss" in ln] == [1, 2, 3]
    assert config.load(tmp_path / "r" / "config.yaml").prompts_per_step == 2  # the run's own config was kept
    assert cli.main(["train", "--output-dir", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_rewards_builtin_importable_and_local_reward_model(tmp_path):
    from grao.eval import rewards

    assert rewards.resolve("edit")(["p"], ["kitten"], ["sitting"]) == [pytest.approx(1 - 3 / 7)]
    assert rewards.resolve("exact")(["p", "p"], [" a ", "b"], ["a", "a"]) == [1.0, 0.0]
    assert rewards.resolve("demo")(["abc="], ["cbx"], [""]) == [pytest.approx(2 / 3)]
    assert rewards.resolve("grao.eval.rewards:exact_match") is rewards.exact_match
    with pytest.raises(ValueError, match="unknown reward"):
        rewards.resolve("bleu")
    save_tiny_llama(
        tmp_path / "rm", "LlamaForSequenceClassification", hidden_size=16, intermediate_size=32, num_labels=1
    )
    rm = rewards.resolve(f"model:{tmp_path / 'rm'}")
    scores = rm(["abc=", "ab="], ["cba", "b"], ["cba", "ba"])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)


def test_load_balancing_loss_matches_transformers():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from grao.models import load_balancing_loss

    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    logits = tuple(torch.randn(20, 4) for _ in range(3))
    aux, load = load_balancing_loss(logits, 4, 2, mask)
    torch.testing.assert_close(aux[0], load_balancing_loss_func(logits, 4, 2, mask))
    assert load.sum() == pytest.approx(1.0) and load.shape == (4,)
    per_group, _ = load_balancing_loss(logits, 4, 2, mask, groups=2)  # sequences (0, 1) and (2, 3)
    for g in range(2):
        expected = load_balancing_loss_func(
            tuple(x[10 * g : 10 * g + 10] for x in logits), 4, 2, mask[2 * g : 2 * g + 2]
        )
        torch.testing.assert_close(per_group[g], expected)


def test_bf16_autocast_step_keeps_fp32_master_weights(tmp_path):
    trainer = Trainer(small(tmp_path, precision="bf16"))
    assert trainer.runtime.autocast_dtype == torch.bfloat16
    metrics = trainer.train_step(1)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
