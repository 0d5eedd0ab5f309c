"""Model-dependent defaults: the demo's settings for tiny-moe only, the paper's for any other model, resolved once
and written to the run's config.yaml as resolved values."""

from __future__ import annotations

from grao import config


def test_demo_defaults_apply_to_tiny_moe_only():
    demo = config.TrainConfig()
    assert (demo.lr, demo.max_new_tokens, demo.warmup_steps) == (3e-3, 8, 20)
    real = config.TrainConfig(model="models/Qwen2.5-7B")
    assert (real.lr, real.max_new_tokens, real.warmup_steps) == (1e-6, 256, 0)


def test_a_file_that_changes_the_model_gets_that_model_s_defaults_and_keeps_explicit_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: models/some-llm\nlr: 2.0e-5\n")
    cfg = config.load(path)
    assert (cfg.lr, cfg.max_new_tokens, cfg.warmup_steps) == (2e-5, 256, 0)
    back = config.load(path, {"model": "tiny-moe"})  # a flag back to the demo model: its defaults again
    assert (back.lr, back.max_new_tokens, back.warmup_steps) == (2e-5, 8, 20)


def test_written_config_holds_the_resolved_values_and_reloads_equal(tmp_path):
    cfg = config.TrainConfig(model="models/some-llm")
    config.write(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "lr: 1.0e-06" in text and "max_new_tokens: 256" in text and "defaulted" not in text
    saved = config.load(tmp_path / "config.yaml")
    assert saved == cfg and not saved.defaulted  # explicit in the file: a resumed run keeps them
    assert config.resume_conflicts(saved, cfg) == []
