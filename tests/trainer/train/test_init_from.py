"""``init_from``: a run starts from another run's weights (a run directory's newest intact checkpoint, or a
checkpoint directory), with a fresh optimizer and step; those weights are its NAG baseline, its frozen reference and
its ``initial/``; what cannot be its start is refused before anything is written."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from utils import read_lines, small  # noqa: E402

from grao import models  # noqa: E402
from grao.config import ConfigError  # noqa: E402
from grao.train import checkpoint, run_dir  # noqa: E402
from grao.train.trainer import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished 2-step sft run (checkpoints at steps 1 and 2) and its trained model."""
    tmp = tmp_path_factory.mktemp("source")
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    trainer = Trainer(small(tmp, method="sft"))
    assert trainer.train() is True
    torch.set_num_threads(threads)
    return tmp / "run", trainer.model


def evals(directory):
    return [ln for ln in read_lines(directory) if "eval/reward" in ln]


def same_weights(a, b) -> bool:
    named = dict(b.named_parameters())
    return named.keys() == dict(a.named_parameters()).keys() and all(
        torch.equal(p, named[n]) for n, p in a.named_parameters()
    )


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_a_run_from_another_run_starts_at_its_final_model(tmp_path, source, method):
    src, src_model = source
    cfg = small(tmp_path, method=method, init_from=str(src), steps=2)
    trainer = Trainer(cfg, callbacks=[lambda t, step, m: t.request_stop()])  # stops after step 1
    assert trainer.init_dir == checkpoint.step_dir(src, 2)  # the newest checkpoint, not step 1
    assert same_weights(trainer.model, src_model)
    assert trainer.step == 0 and trainer.scheduler.last_epoch == 0  # weights only: a new optimizer and schedule
    assert trainer.train() is False and trainer.step == 1

    # the step-0 evaluation of the new run is the source run's final one, and it is its own NAG baseline
    start, final = evals(tmp_path / "run")[0], evals(src)[-1]
    assert start["step"] == 0 and final["step"] == 2
    assert (start["eval/reward"], start["eval/ras"]) == (final["eval/reward"], final["eval/ras"])
    assert start["eval/nag"] == 0.0 and start["eval/ties"] == cfg.eval_size
    # initial/ holds those weights: what grao eval measures NAG against, and a resumed run's frozen reference
    assert same_weights(models.load_model(tmp_path / "run" / run_dir.INITIAL), src_model)

    resumed = Trainer(cfg, resume=True)
    assert resumed.init_dir == tmp_path / "run" / run_dir.INITIAL
    if method == "dpo":  # the frozen reference is the starting weights, not a fresh random model
        assert same_weights(resumed.reference_model, src_model)
    assert resumed.train() is True


def test_a_checkpoint_directory_names_its_own_weights(tmp_path, source):
    src, _ = source
    step1 = checkpoint.step_dir(src, 1)
    trainer = Trainer(small(tmp_path, init_from=str(step1)))
    assert trainer.init_dir == step1
    assert same_weights(trainer.model, models.load_model(step1))


def test_what_cannot_be_a_start_is_refused_before_anything_is_written(tmp_path, source):
    src, _ = source
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (str(empty), "neither a checkpoint directory nor a run directory with an intact checkpoint"),
        (str(tmp_path / "absent"), "is not a directory"),
    ]
    for init_from, message in cases:
        with pytest.raises(ConfigError, match=message):
            Trainer(small(tmp_path, init_from=init_from))
    with pytest.raises(ConfigError, match=r"model_overrides \{\} \(its run's .*this run's model_overrides"):
        Trainer(small(tmp_path, init_from=str(src), model_overrides={"num_hidden_layers": 1}))
    with pytest.raises(ConfigError, match="'init_from' with 'lora.rank' > 0"):
        small(tmp_path, init_from=str(src), lora_rank=2)
    assert not (tmp_path / "run").exists()


class Payload:
    """Unpickling this runs ``Path.touch(marker)``: what a pickled model file from someone else could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_source_whose_weights_are_a_pickle_is_refused_without_running_it(tmp_path, source):
    import pickle
    import shutil

    src, _ = source
    received = tmp_path / "received"
    shutil.copytree(checkpoint.step_dir(src, 2), received)
    (received / "model.safetensors").unlink()
    (received / checkpoint.MANIFEST).unlink()  # as if written before manifests: checked only by loading
    marker = tmp_path / "payload-ran"
    (received / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(models.ModelError, match="cannot load a causal LM"):
        Trainer(small(tmp_path, init_from=str(received)))
    assert not marker.exists()
