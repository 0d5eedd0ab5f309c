"""The trainer sharded with FSDP2: two CPU processes (torchrun, gloo) against one, and the memory options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from fsdp_step import one_step, step_config  # noqa: E402
from utils import read_lines, save_tiny_llama, small  # noqa: E402

from grao import config  # noqa: E402
from grao.config import ConfigError  # noqa: E402
from grao.train import distributed  # noqa: E402
from grao.train.checkpoint import latest  # noqa: E402
from grao.train.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_process_group_after")


@pytest.fixture
def no_process_group_after():
    """The one-process sharded runs create a process group of one: the rest of the suite runs without it."""
    yield
    distributed.shutdown()


ROOT = Path(__file__).resolve().parents[3]


def run_two(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    """``args`` (a module or script and its arguments) in 2 processes under torchrun, one thread each."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "trainer" / "train")]),
        OMP_NUM_THREADS="1",
    )
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


TERMS = {
    "grao": ("objective/exploration", "objective/imitation", "objective/alignment"),
    "ppo": ("objective/policy", "objective/value", "ppo/kl", "ppo/clip_frac"),
}


@pytest.mark.parametrize(
    "family, method, lora_rank",
    # ppo: a loss with parameters (its value head); LoRA: frozen base, trained adapters in the same sharded layers
    [("dense", "grao", 0), ("moe", "grao", 0), ("moe", "ppo", 0), ("dense", "grao", 4)],
)
def test_two_processes_take_the_one_process_step_on_a_fixed_rollout(tmp_path, family, method, lora_rank):
    if family == "dense":
        model = str(tmp_path / "llama")
        save_tiny_llama(model, num_hidden_layers=2)
    else:
        model = "tiny-moe"
    args = [str(tmp_path / "two.pt"), str(tmp_path / "two"), model, method, str(lora_rank)]
    run_two([str(ROOT / "tests" / "trainer" / "train" / "fsdp_step.py"), *args])
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    one = one_step(Trainer(step_config(tmp_path / "one", model, method, lora_rank)))

    head_name = "model.base_model.model.lm_head.weight" if lora_rank else "model.lm_head.weight"
    head = tuple(one["params"][head_name].shape)
    for seen in (two["weights_seen"], one["weights_seen"]):  # unsharded by FSDP: never a DTensor, the whole head
        assert [shape for _, shape in seen] == [head] and all(kind in ("Tensor", "Parameter") for kind, _ in seen)
    if method == "ppo":  # the value head is trained with the model, its gradient summed over ranks too
        assert {"loss.value_head.weight", "loss.value_head.bias"} <= one["grads"].keys()
        # the frozen reference model is sharded over the ranks too; the KL term checks its log-probs
        assert two["reference_params"] == ["DTensor"] and one["reference_params"] == ["Parameter"]
    if lora_rank:  # only the adapters train; the frozen base, sharded too, stays as it was
        assert one["grads"] and all("lora_" in name for name in one["grads"])
        for name in one["params"].keys() - one["grads"].keys():
            torch.testing.assert_close(two["params"][name], one["params"][name], rtol=0, atol=0, msg=name)
    for key in ("loss", *TERMS[method], *(("moe/aux_loss",) if family == "moe" else ())):
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-5, abs=1e-6), key
    assert two["stats"]["train_tokens"] == one["stats"]["train_tokens"]
    assert two["stats"]["grad_norm"] == pytest.approx(one["stats"]["grad_norm"], rel=1e-5)
    if family == "moe":  # the expert load counts both ranks' tokens
        assert two["stats"]["moe/expert_load"] == pytest.approx(one["stats"]["moe/expert_load"], abs=1e-4)
    assert two["grads"].keys() == one["grads"].keys()
    for name, g in one["grads"].items():
        # the sum over ranks (not FSDP's default average): a factor-2 error would fail by 50%
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
        # AdamW's first step moves each element by lr * g / (|g| + eps) (clipped g, eps 1e-8): the same update where
        # |g| >> eps; where |g| is within 100 eps, float32 rounding of g is amplified up to lr / eps times, so
        # there the update is only checked to stay within lr (1e-2).
        well_conditioned = g.abs() > 1e-7 * max(1.0, one["stats"]["grad_norm"])
        torch.testing.assert_close(
            two["params"][name][well_conditioned],
            one["params"][name][well_conditioned],
            rtol=1e-5,
            atol=1e-5,
            msg=f"{name} after the step",
        )
        step = (two["params"][name] - one["params"][name])[~well_conditioned].abs()
        assert step.numel() == 0 or float(step.max()) <= 2.02e-2, name


def test_two_process_run_then_resumed_by_one_process(tmp_path):
    run = tmp_path / "run"
    # eval_size 3 is not a multiple of 2: the second rank's block of held-out prompts is padded
    config.write(small(tmp_path, eval_size=3, threads=1, gradient_checkpointing=True), tmp_path / "run.yaml")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "grao", "train", "--nproc", "2", "--config", str(tmp_path / "run.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = read_lines(run)  # rank 0's lines only: one per step and evaluation
    assert [ln["step"] for ln in lines if "loss" in ln] == [1, 2]
    assert [ln["step"] for ln in lines if "eval/reward" in ln] == [0, 1, 2]
    assert all(len(ln["moe/expert_load"]) == 4 for ln in lines if "loss" in ln)
    from grao import models

    start = models.tiny_moe(models.build_demo_tokenizer()).state_dict()  # the one-process run's starting model
    initial = models.load_model(run / "initial").state_dict()  # gathered from the shards by rank 0
    assert initial.keys() == start.keys() and all(torch.equal(initial[k], start[k]) for k in start)
    ckpt = latest(run)
    assert ckpt.name == "step-000002"
    assert (ckpt / distributed.DCP_DIR / ".metadata").is_file() and (ckpt / "model.safetensors").is_file()
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert "optimizer" not in state and state["step"] == 2

    # The same shards read back by DCP's own converter, independently of the trainer's restore.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt / distributed.DCP_DIR, tmp_path / "full.pt")
    saved = torch.load(tmp_path / "full.pt", weights_only=False)

    cfg = config.load(run / "config.yaml", {"steps": 3})  # the run's settings, as grao train --resume reads them
    resumed = Trainer(cfg, resume=True)
    assert resumed.step == 2 and resumed.sharding is None and resumed.world.size == 1
    opt = resumed.optimizer.state_dict()
    names = [n for n, p in resumed.policy.named_parameters() if p.requires_grad]
    assert len(opt["state"]) == len(names) == len(saved["optim"]["state"])
    for i, name in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt["state"][i][key], saved["optim"]["state"][name][key], msg=(name, key))
    for name, p in resumed.policy.named_parameters():
        torch.testing.assert_close(p.detach(), saved["model"][name], msg=name)
    assert resumed.train() is True
    lines = read_lines(run)
    assert [ln["step"] for ln in lines if "loss" in ln] == [1, 2, 3]
    assert latest(run).name == "step-000003"
    assert "optimizer" in torch.load(latest(run) / "trainer_state.pt", weights_only=False)  # one process: plain


def test_bf16_parameters_over_fp32_master_weights_in_one_process(tmp_path):
    seen = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, batch):
            seen.append((batch.hidden.dtype, batch.weight.dtype))
            return self.inner(batch)

    from grao import losses

    cfg = small(tmp_path, fsdp_param_dtype="bf16", threads=1, steps=1)
    trainer = Trainer(cfg, loss=Recording(losses.from_config(cfg)))
    assert trainer.sharding is not None and trainer.world.size == 1
    before = {n: distributed.local(p.detach()).clone() for n, p in trainer.policy.named_parameters()}
    assert trainer.train() is True
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}  # the loss computes in bf16
    for name, p in trainer.policy.named_parameters():
        assert p.dtype == torch.float32, name  # the sharded master weights
        assert not torch.equal(distributed.local(p.detach()), before[name]), name  # trained
    state = trainer.optimizer.state_dict()["state"]
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())


def test_cpu_offload_trains_and_resumes_in_one_process(tmp_path):
    cfg = small(tmp_path, fsdp_cpu_offload=True, threads=1, steps=2, save_every=1)
    first = Trainer(cfg)
    from torch.distributed.fsdp import CPUOffloadPolicy

    assert isinstance(first.policy._get_fsdp_state()._fsdp_param_group.offload_policy, CPUOffloadPolicy)
    cfg.steps = 1
    assert first.train() is True
    assert (latest(tmp_path / "run") / distributed.DCP_DIR / ".metadata").is_file()
    cfg.steps = 2
    resumed = Trainer(cfg, resume=True)
    assert resumed.step == 1
    got = {n: distributed.local(p.detach()) for n, p in resumed.policy.named_parameters()}
    for name, p in first.policy.named_parameters():
        torch.testing.assert_close(got[name], distributed.local(p.detach()), rtol=0, atol=0, msg=name)
    assert resumed.train() is True


def test_a_sharded_ppo_value_head_is_checkpointed_whole_and_resumes_in_one_process(tmp_path):
    cfg = small(tmp_path, method="ppo", fsdp_cpu_offload=True, threads=1, steps=1)
    first = Trainer(cfg)
    head = dict(first.policy.loss.named_parameters())
    assert all(type(p).__name__ == "DTensor" for p in head.values())  # sharded with the root's parameters
    assert first.train() is True
    trained = {n: distributed.local(p.detach()).clone() for n, p in head.items()}
    ckpt = latest(tmp_path / "run")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["loss"].keys() == {"value_head.weight", "value_head.bias"}
    for name, value in state["loss"].items():  # whole plain tensors, as a one-process run saves them
        assert type(value) is torch.Tensor
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)
    from safetensors.torch import load_file

    assert not any(k.startswith("loss.") for k in load_file(ckpt / "model.safetensors"))  # the HF model only

    cfg.steps, cfg.fsdp_cpu_offload = 2, False
    resumed = Trainer(cfg, resume=True)
    assert resumed.sharding is None and resumed.step == 1
    for name, p in resumed.policy.loss.named_parameters():
        torch.testing.assert_close(p.detach(), trained[name], rtol=0, atol=0, msg=name)
    opt = resumed.optimizer.state_dict()["state"]
    names = [n for n, p in resumed.policy.named_parameters() if p.requires_grad]
    assert names[-2:] == ["loss.value_head.weight", "loss.value_head.bias"] and len(opt) == len(names)
    assert resumed.train() is True


def test_sharded_lora_over_a_bf16_base_saves_its_adapter_and_start_and_resumes_unsharded(tmp_path):
    from safetensors.torch import load_file

    from grao import models

    # bf16 base and fp32 adapters in the same FSDP parameter groups, offloaded to CPU memory
    cfg = small(tmp_path, lora_rank=4, lora_base_dtype="bf16", fsdp_cpu_offload=True, threads=1, steps=1)
    first = Trainer(cfg)
    assert first.sharding is not None
    assert first.train() is True
    trained = {n: distributed.local(p.detach()).clone() for n, p in first.policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)

    run = tmp_path / "run"
    start = models.tiny_moe(models.build_demo_tokenizer()).state_dict()  # the starting model, plain names
    initial = models.load_model(run / "initial").state_dict()
    assert initial.keys() == start.keys() and all(torch.equal(initial[k], start[k]) for k in start)
    ckpt = latest(run)
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert not (ckpt / "model.safetensors").exists() and adapter and all("lora_" in k for k in adapter)

    cfg.steps, cfg.fsdp_cpu_offload = 2, False
    resumed = Trainer(cfg, resume=True)
    assert resumed.sharding is None and resumed.step == 1
    now = {n: p.detach() for n, p in resumed.policy.named_parameters()}
    for name, value in trained.items():  # the adapters as trained, onto the starting base in bf16
        torch.testing.assert_close(now[name], value, rtol=0, atol=0, msg=name)
    base = {n.removeprefix("model.base_model.model."): p for n, p in now.items() if "lora_" not in n}
    for name, p in base.items():
        plain = name.replace(".base_layer", "")
        assert p.dtype == torch.bfloat16 and torch.equal(p, start[plain].to(torch.bfloat16)), name
    assert resumed.train() is True


def test_a_sharded_run_checks_its_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"'prompts_per_step' \(3\) must divide by the number of processes \(2\)"):
        Trainer(small(tmp_path, prompts_per_step=3))


def test_a_one_process_checkpoint_resumes_sharded(tmp_path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    cfg = small(tmp_path, threads=1, steps=1)
    assert Trainer(cfg).train() is True
    saved = torch.load(latest(tmp_path / "run") / "trainer_state.pt", weights_only=False)["optimizer"]
    cfg.steps, cfg.fsdp_cpu_offload = 2, True
    resumed = Trainer(cfg, resume=True)
    assert resumed.sharding is not None and resumed.step == 1
    full = get_optimizer_state_dict(resumed.policy, resumed.optimizer, options=StateDictOptions(full_state_dict=True))
    names = [n for n, p in resumed.policy.named_parameters() if p.requires_grad]
    assert len(names) == len(saved["state"]) == len(full["state"])
    for i, name in enumerate(names):  # the plain checkpoint's entry i is the i-th trainable parameter
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(full["state"][name][key], saved["state"][i][key], msg=(name, key))
    assert resumed.train() is True


def test_sharded_micro_batches_accumulate_to_the_unsharded_gradient(tmp_path):
    plain = one_step(Trainer(step_config(tmp_path / "a", "tiny-moe")))
    cfg = step_config(tmp_path / "b", "tiny-moe")
    cfg.micro_batch_prompts, cfg.fsdp_cpu_offload = 1, True  # two forward/backward passes through FSDP's hooks
    sharded = one_step(Trainer(cfg))
    assert sharded["stats"]["loss"] == pytest.approx(plain["stats"]["loss"], rel=1e-5, abs=1e-6)
    for name, g in plain["grads"].items():
        torch.testing.assert_close(sharded["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
