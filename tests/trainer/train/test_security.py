"""A run directory from someone else cannot be turned against its user: nothing it lists makes ``grao`` delete a
file outside it, and nothing in it runs code when it is resumed or evaluated.

Each case starts from a copy of one finished run and edits it as an attacker would: a checkpoint ``manifest.json``
listing absolute or ``..`` paths, a ledger doing the same, a ``trainer_state.pt`` carrying a ``__reduce__``
payload, a symlinked ``config.yaml``, a config that turns on ``trust_remote_code``. The files outside the run (the
"victims") must be untouched and the payload's marker must never appear.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from grao import cli  # noqa: E402

FAST = (
    *("--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3"),
    *("--demo-train-size", "16", "--eval-size", "2", "--eval-every", "2", "--save-every", "1"),
    *("--progress", "false", "--plot", "false"),
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", *FAST, "--output-dir", str(run)]) == 0
    return run


@pytest.fixture
def received(finished_run, tmp_path) -> Path:
    """A copy of the finished run, as received from someone else, next to files of the user's own."""
    run = tmp_path / "home" / "runs" / "received"
    shutil.copytree(finished_run, run)
    return run


@pytest.fixture
def victims(tmp_path) -> dict[Path, bytes]:
    files = {tmp_path / "home" / "thesis.tex": b"years of work", tmp_path / "victim.txt": b"keep me"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def assert_untouched(victims: dict[Path, bytes]) -> None:
    for path, data in victims.items():
        assert path.is_file() and path.read_bytes() == data, f"{path} was deleted or changed"


def _crafted_checkpoint(run: Path, name: str, files: dict) -> Path:
    ckpt = run / "checkpoints" / name
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text(json.dumps({"files": files}))
    return ckpt


def test_a_manifest_listing_outside_paths_deletes_nothing_on_resume_rotation(received, victims, capsys):
    thesis = next(iter(victims))
    # step-000000: older than the real checkpoints, so rotation during the resume reaches it; the relative entry
    # climbs from the step directory to tmp_path/victim.txt
    _crafted_checkpoint(received, "step-000000", {str(thesis): 9, "../../../../../victim.txt": 7})
    rc = cli.main(["train", "--output-dir", str(received), "--resume", "--steps", "3", "--keep-checkpoints", "1"])
    assert rc == 0, capsys.readouterr().err
    assert_untouched(victims)
    assert (received / "checkpoints" / "step-000003").is_dir()


def test_a_manifest_replacing_a_real_checkpoints_deletes_nothing_outside(received, victims, capsys):
    # the newest checkpoint's own manifest rewritten: a resume names it and falls back to step 1; redoing step 2
    # would replace that directory, which the trainer refuses (its manifest is not one it wrote) with one error line
    newest = received / "checkpoints" / "step-000002"
    (newest / "manifest.json").write_text(json.dumps({"files": {str(p): 1 for p in victims}}))
    rc = cli.main(["train", "--output-dir", str(received), "--resume", "--steps", "3", "--keep-checkpoints", "1"])
    err = capsys.readouterr().err
    assert "resuming at step 1" in err and "warning: " + str(newest / "manifest.json") in err
    assert rc == 1 and [ln for ln in err.splitlines() if ln.startswith("grao: error:")] == [err.splitlines()[-1]]
    assert "not a relative path inside" in err.splitlines()[-1] and "step-000001 is kept" in err.splitlines()[-1]
    assert_untouched(victims)


def test_overwrite_deletes_nothing_outside_the_run_whatever_its_manifests_and_ledger_list(received, victims, capsys):
    _crafted_checkpoint(received, "step-000000", {"../../../../../victim.txt": 7})
    rc = cli.main(["train", *FAST, "--output-dir", str(received), "--overwrite"])
    assert rc == 2 and "not a relative path inside" in capsys.readouterr().err
    assert_untouched(victims)
    shutil.rmtree(received / "checkpoints" / "step-000000")

    ledger = received / ".grao-written.json"
    names = json.loads(ledger.read_text())["written"]
    ledger.write_text(json.dumps({"written": [*names, "../../thesis.tex", str(next(iter(victims)))]}))
    rc = cli.main(["train", *FAST, "--output-dir", str(received), "--overwrite"])
    assert rc == 2 and "not a relative path inside" in capsys.readouterr().err
    assert_untouched(victims)


def test_symlinks_out_of_the_run_are_neither_followed_nor_written_through(received, victims, capsys):
    thesis = next(iter(victims))
    # a step directory that is a symlink to the user's home: never rotated, never deleted from
    (received / "checkpoints" / "step-000000").symlink_to(thesis.parent, target_is_directory=True)
    (thesis.parent / "manifest.json").write_text(json.dumps({"files": {"thesis.tex": len(victims[thesis])}}))
    rc = cli.main(["train", "--output-dir", str(received), "--resume", "--steps", "3", "--keep-checkpoints", "1"])
    assert rc == 0, capsys.readouterr().err
    assert_untouched(victims)
    (received / "checkpoints" / "step-000000").unlink()

    # the run's config.yaml a symlink to a user's file: a resume would write the config through it
    (received / "config.yaml").unlink()
    (received / "config.yaml").symlink_to(thesis)
    rc = cli.main(["train", "--output-dir", str(received), "--resume", "--steps", "4"])
    assert rc == 2 and "config.yaml is a symlink" in capsys.readouterr().err
    assert_untouched(victims)


class Payload:
    """What an attacker pickles into trainer_state.pt: unpickling it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_payload_in_the_trainer_state_never_runs(received, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    for ckpt in sorted((received / "checkpoints").glob("step-*")):
        path = ckpt / "trainer_state.pt"
        state = torch.load(path, weights_only=False)  # the test's own file, written just above
        torch.save({**state, "extra": Payload(marker)}, path)
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["files"]["trainer_state.pt"] = path.stat().st_size  # consistent sizes: only the content is bad
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(pickle.UnpicklingError):  # the payload is refused, not skipped over
        torch.load(path, weights_only=True)

    rc = cli.main(["train", "--output-dir", str(received), "--resume", "--steps", "3"])
    err = capsys.readouterr().err
    assert rc == 1 and "no intact checkpoint" in err and "trainer_state.pt cannot be read" in err
    assert not marker.exists()

    # an evaluation loads only the model (safetensors) and the tokenizer: the payload does not matter to it
    assert cli.main(["eval", "--run", str(received)]) == 0
    assert not marker.exists()


def test_a_run_config_cannot_turn_on_trust_remote_code_by_itself(received, capsys):
    config = received / "config.yaml"
    config.write_text(config.read_text().replace("trust_remote_code: false", "trust_remote_code: true"))
    assert cli.main(["train", "--output-dir", str(received), "--resume", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "trust_remote_code: true" in err and "--trust-remote-code true" in err
    assert cli.main(["eval", "--run", str(received)]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err


def test_the_trainer_state_holds_only_plain_data_and_older_numpy_rng_states_still_load(tmp_path):
    import random

    import numpy as np

    from grao.train import safe_state

    state = {"step": 3, "rng": safe_state.rng_state()}
    safe_state.save(state, tmp_path / "new.pt")
    assert torch.load(tmp_path / "new.pt", weights_only=True)["step"] == 3  # no allow-list needed

    # a checkpoint written before: NumPy's state as a pickled array, Python's as a tuple
    old = {
        "step": 3,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    torch.save(old, tmp_path / "old.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    for name in ("new.pt", "old.pt"):
        safe_state.restore_rng(safe_state.load(tmp_path / name)["rng"])
        assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_a_sharded_checkpoints_metadata_is_checked_before_dcp_unpickles_it(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    from grao.train import safe_state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process saving: what DCP warns about
        dcp.save({"w": torch.randn(3, 2), "step": torch.tensor(4)}, checkpoint_id=tmp_path / "dcp")
    safe_state.check_dcp_metadata(tmp_path / "dcp" / ".metadata")  # DCP's own metadata passes

    marker = tmp_path / "payload-ran"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(pickle.UnpicklingError, match="is not part of a checkpoint's metadata"):
        safe_state.check_dcp_metadata(tmp_path / "dcp" / ".metadata")
    assert not marker.exists()
