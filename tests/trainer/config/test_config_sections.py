"""The config in sections: each key's range and choices from its metadata, the flat keys of the config before
sections still read from files, flags and attributes (with a note where the spelling changed), the flags generated
from the metadata, and a run's config.yaml, nested or flat, read back equal."""

from __future__ import annotations

import argparse
import contextlib
import warnings

import pytest
import yaml

from grao import config
from grao.config import ConfigError, RenamedKeyWarning, TrainConfig
from grao.config.sections import Grpo, Lora, Rollout

# Every key of the flat config before sections, as its config.yaml and its flags spelled them.
FLAT_KEYS = (
    "model tokenizer trust_remote_code model_overrides data eval_data eval_size demo_train_size reward "
    "judge_template judge_max_new_tokens judge_batch_size output_dir seed steps prompts_per_step group_size "
    "temperature logprob_temperature max_new_tokens max_prompt_tokens method grpo_loss_type grpo_kl_beta "
    "num_iterations clip_epsilon clip_epsilon_high dpo_beta dpo_rejected ppo_kl_coef ppo_gamma ppo_gae_lambda "
    "ppo_vf_coef ppo_vf_clip chat_template beta lam loss_backend router_aux_loss_coef router_bias_update_rate "
    "lora_rank lora_alpha lora_dropout lora_target_modules lora_base_dtype lr weight_decay warmup_steps "
    "lr_schedule min_lr_ratio max_grad_norm micro_batch_prompts gradient_checkpointing fsdp_cpu_offload "
    "fsdp_param_dtype device precision attn_implementation threads eval_every eval_batch_size eval_greedy "
    "save_every keep_checkpoints plot progress rollout_engine vllm_kv_cache_bytes vllm_gpu_memory_utilization "
    "vllm_sleep vllm_importance_sampling_cap"
).split()
# a config unlike the defaults in a key of most sections
CHANGED = dict(
    steps=7,
    group_size=4,
    grpo_kl_beta=0.04,
    dpo_rejected="sampled",
    ppo_gamma=0.9,
    lr=1e-4,
    lora_rank=2,
    eval_every=3,
    judge_batch_size=5,
    fsdp_param_dtype="bf16",
    model_overrides={"num_hidden_layers": 1},
)


@contextlib.contextmanager
def no_note():
    """Fails the block on a RenamedKeyWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RenamedKeyWarning)
        yield


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("steps", 0, "'steps' must be >= 1, got 0"),
        ("lora.rank", -1, "'lora.rank' must be >= 0, got -1"),
        ("grpo.kl_beta", -0.5, r"'grpo.kl_beta' must be a finite number in \[0, 1000\], got -0.5"),
        ("lr", 2.0, r"'lr' must be a finite number in \(0, 1\], got 2.0"),
        ("ppo.vf_clip", 0.0, r"'ppo.vf_clip' must be a finite number in \(0, 1000\], got 0.0"),
        ("temperature", float("inf"), r"'temperature' must be a finite number in \(0, 1000\], got inf"),
        ("ppo.gamma", float("nan"), r"'ppo.gamma' must be a finite number in \[0, 1\], got nan"),
        ("lora.base_dtype", "fp16", "'lora.base_dtype' must be one of auto, fp32, bf16, got 'fp16'"),
        ("lr_schedule", "step", "'lr_schedule' must be one of cosine, linear, constant, got 'step'"),
    ],
)
def test_ranges_and_choices_come_from_each_key_s_metadata(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{key: value})
    with pytest.raises(ConfigError, match=message):  # the same check for a file's or a flag's value
        config.load(overrides={key: str(value)})


def test_every_key_with_choices_or_a_range_refuses_a_value_outside_it():
    for name, k in config.FIELDS.items():
        meta = k.spec.metadata
        if meta["choices"]:
            with pytest.raises(ConfigError, match=f"^'{name}' must be one of {', '.join(meta['choices'])}, got"):
                TrainConfig(**{name: "not-a-choice"})
        if meta["range"]:
            low = meta["range"][0]
            bad = low - 1 if k.type is int else -1.0 if low >= 0 else low - 1.0
            with pytest.raises(ConfigError, match=f"^'{name}' must be "):
                TrainConfig(**{name: bad})


def test_keys_live_in_sections_and_keep_their_flat_attribute_names():
    cfg = TrainConfig(**CHANGED)
    assert (cfg.rollout.group_size, cfg.group_size) == (4, 4)
    assert (cfg.grpo.kl_beta, cfg.grpo_kl_beta, cfg.lora.rank, cfg.eval_every) == (0.04, 0.04, 2, 3)
    assert TrainConfig(grpo=Grpo(kl_beta=0.04), rollout=Rollout(group_size=4)) == TrainConfig(
        grpo_kl_beta=0.04, group_size=4
    )
    cfg.grpo_kl_beta = 0.5  # a flat attribute writes its section
    assert cfg.grpo.kl_beta == 0.5
    with pytest.raises(AttributeError, match="no_such_key"):
        cfg.no_such_key  # noqa: B018
    with pytest.raises(TypeError, match="no_such_key"):
        TrainConfig(no_such_key=1)
    lora = Lora(rank=2)
    assert TrainConfig(lora=lora).lora is not lora  # each config owns its sections


def test_every_flat_key_of_a_flat_config_yaml_loads_with_one_note_naming_the_new_spellings(tmp_path):
    cfg = TrainConfig(**CHANGED)
    assert {k.flat for k in config.FIELDS.values()} == set(FLAT_KEYS)
    flat = tmp_path / "config.yaml"  # as the trainer wrote a run's config.yaml before sections
    flat.write_text(yaml.safe_dump({name: getattr(cfg, name) for name in FLAT_KEYS}, sort_keys=False))
    with pytest.warns(RenamedKeyWarning) as notes:
        saved = config.load(flat)
    assert saved == cfg and config.resume_conflicts(saved, cfg) == []
    assert len(notes) == 1
    note = str(notes[0].message)
    assert "grpo_kl_beta -> grpo.kl_beta" in note and "eval_every -> evaluation.every" in note
    assert " lr ->" not in note and "group_size ->" not in note  # spellings that did not change


def test_a_written_config_has_sections_and_reloads_equal_without_a_note(tmp_path):
    cfg = TrainConfig(**CHANGED)
    config.write(cfg, tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["grpo"] == {"loss_type": "grpo", "kl_beta": 0.04} and written["optimizer"]["lr"] == 1e-4
    with no_note():
        saved = config.load(tmp_path / "config.yaml")
    assert saved == cfg and config.resume_conflicts(saved, cfg) == []


def test_sections_dotted_and_flat_keys_mix_in_one_file_but_a_key_is_given_once(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 1e-4\n"grpo.loss_type" = "dapo"\n[lora]\nrank = 2\n[optimizer]\nwarmup_steps = 3\n')
    with no_note():
        cfg = config.load(path)
    assert (cfg.lr, cfg.grpo.loss_type, cfg.lora.rank, cfg.warmup_steps) == (1e-4, "dapo", 2, 3)
    path.write_text("grpo_kl_beta = 0.1\n[grpo]\nkl_beta = 0.2\n")
    with pytest.raises(ConfigError, match="'grpo.kl_beta' is given twice"):
        config.load(path)
    path.write_text("grpo = 0.1\n")
    with pytest.raises(ConfigError, match="section 'grpo' .* must be a mapping of its keys, got 0.1; its keys: "):
        config.load(path)
    path.write_text("[grpo]\nkl_bta = 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'grpo.kl_bta' .*did you mean 'grpo.kl_beta'"):
        config.load(path)


def _parse(argv):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.load(overrides=config.from_arguments(parser.parse_args(argv)))


def test_flags_are_generated_for_every_key_old_flat_flags_still_work_with_a_note():
    with no_note():
        new = _parse(["--grpo.kl-beta", "0.3", "--optimizer.lr", "1e-4", "--evaluation.every", "5"])
        short = _parse(["--lr", "1e-4", "--prompts-per-step", "4", "--method", "grpo"])
    assert (new.grpo.kl_beta, new.lr, new.evaluation.every) == (0.3, 1e-4, 5)
    assert (short.lr, short.prompts_per_step, short.method) == (1e-4, 4, "grpo")
    with pytest.warns(RenamedKeyWarning, match="--grpo-kl-beta -> --grpo.kl-beta, --eval-every -> --evaluation.every"):
        old = _parse(["--grpo-kl-beta", "0.3", "--eval-every", "5", "--lr", "1e-4"])
    assert old == new
    needs = {"vllm_importance_sampling_cap": ["--method", "grpo", "--num-iterations", "2"]}  # keys that need others
    for name, k in config.FIELDS.items():  # each number's section.field flag sets it
        if k.type in (int, float):
            value = k.type(1 if k.type is int else 0.5)
            flags = ["--" + k.path.replace("_", "-"), str(value), *needs.get(name, [])]
            assert config.to_dict(_parse(flags))[name] == value, name


def test_help_groups_the_flags_by_section_and_hides_the_old_spellings():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, exclude=("method", "output_dir"))
    lines = parser.format_help().splitlines()
    sections = [line.split(" (")[0] for line in lines if line.endswith("(overrides the --config file):")]
    text = " ".join(" ".join(lines).split())
    assert sections == list(config.SECTIONS)
    assert "--grpo.kl-beta FLOAT" in text and "--lr FLOAT, --optimizer.lr FLOAT" in text
    assert "--grpo-kl-beta" not in text and "--method" not in text and "--output-dir" not in text
    assert "one of grpo, dr_grpo, dapo" in text and "in [0, 1000]" in text


def test_resume_accepts_a_run_whose_config_yaml_is_flat(tmp_path, capsys):
    pytest.importorskip("transformers")
    import torch

    from grao import cli

    run, threads = tmp_path / "run", torch.get_num_threads()
    fast = ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3", "--demo-train-size", "16"]
    fast += ["--evaluation.size", "2", "--progress", "false", "--plot", "false", "--output-dir", str(run)]
    try:
        assert cli.main(["train", *fast, "--steps", "1"]) == 0
        cfg = config.load(run / "config.yaml")
        (run / "config.yaml").write_text(yaml.safe_dump({name: getattr(cfg, name) for name in FLAT_KEYS}))
        with pytest.warns(RenamedKeyWarning, match="eval_size -> evaluation.size"):
            assert cli.main(["train", "--output-dir", str(run), "--resume", "--steps", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "resuming at step 1" in capsys.readouterr().err
    assert config.load(run / "config.yaml").steps == 2  # written back in sections
    assert "evaluation:" in (run / "config.yaml").read_text()
