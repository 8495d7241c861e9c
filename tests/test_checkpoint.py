"""Checkpoints restore onto other meshes; workdirs may be remote paths.

A remote workdir is played by TensorFlow's in-memory `ram://` filesystem: it
goes through the same tf.io.gfile layer as `gs://`, and a file that leaked to
the local disk would show up as a `ram:` folder in the working directory.
orbax writes arrays through TensorStore, which has no `ram://`; the test hands
orbax a local folder instead and checks the path it was asked for.
"""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf
from test_train_run import _config, data_dir  # noqa: F401

from unified_seq import checkpoint, evaluate, train


def test_state_restores_onto_other_meshes(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "restore_check.py")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    out = subprocess.run(
        [sys.executable, script, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for case, row in report.items():
        assert row["equal"] and row["differs_from_target"], (case, row)
        # The restored arrays have the shardings of the restoring run.
        assert row["specs"] == row["target_specs"], (case, row)
    assert report["8_to_1"]["devices"] == [1]
    assert report["1_to_8"]["devices"] == [8]
    assert "PartitionSpec('fsdp',)" in " ".join(report["fsdp2_to_fsdp4"]["specs"]) or any(
        "fsdp" in s for s in report["fsdp2_to_fsdp4"]["specs"]
    )


def test_input_position_of_another_process_count_restarts_the_order(tmp_path, caplog):
    """A checkpoint written by 2 processes, resumed by 1: the model state restores
    (orbax, onto any mesh: above) and the input order restarts, with a warning."""

    def iterator():
        return iter(tf.data.Dataset.range(100).shuffle(10, seed=1))

    ckpt = checkpoint.Checkpointer(str(tmp_path), every=10, keep=2)
    saved = iterator()
    next(saved)
    for i in range(2):
        path = os.path.join(str(tmp_path), "input", "10", f"process_{i}_of_2")
        tf.train.Checkpoint(it=saved).write(path)
    fresh = iterator()
    with caplog.at_level("WARNING"):
        assert not ckpt.restore_inputs(10, {"it": fresh})
    assert "saved by 2 processes and this run has 1" in caplog.text
    assert int(next(fresh)) == int(next(iterator()))  # from the beginning
    # Written by this process count, it restores.
    tf.train.Checkpoint(it=saved).write(ckpt._input_path(20))
    following = int(next(saved))
    resumed = iterator()
    assert ckpt.restore_inputs(20, {"it": resumed})
    assert int(next(resumed)) == following


class _LocalOrbax:
    """Stands in for ocp.CheckpointManager: records the directory it is given and
    keeps the arrays in a local folder (TensorStore has no ram://)."""

    asked: list[str] = []
    root = ""

    def __new__(cls, directory, *args, **kwargs):
        cls.asked.append(str(directory))
        local = os.path.join(cls.root, str(directory).replace("://", "_"))
        return _REAL_MANAGER(local, *args, **kwargs)


_REAL_MANAGER = checkpoint.ocp.CheckpointManager


def _etils_knows_ram(monkeypatch) -> None:
    """Lets etils.epath (which clu's TensorBoard writer uses) treat `ram://` as it
    treats `gs://`: a URI handled by the tf.io.gfile backend."""
    from etils.epath import backend, gpath, register

    monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
    monkeypatch.setattr(gpath, "_URI_PREFIXES", (*gpath._URI_PREFIXES, "ram://"))
    monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "ram", backend.tf_backend)
    monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", gpath.PosixGPath)


def test_gs_workdir_stays_a_remote_path(monkeypatch, tmp_path):
    _LocalOrbax.asked, _LocalOrbax.root = [], str(tmp_path)
    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", _LocalOrbax)
    ckpt = checkpoint.Checkpointer("gs://bucket/run/checkpoints", every=10, keep=2)
    assert ckpt.directory == "gs://bucket/run/checkpoints"
    assert _LocalOrbax.asked == ["gs://bucket/run/checkpoints/state"]
    assert ckpt._input_path(20) == "gs://bucket/run/checkpoints/input/20/process_0_of_1"


@pytest.mark.usefixtures("data_dir")
def test_a_run_in_a_remote_workdir_writes_only_there(data_dir, monkeypatch, tmp_path):  # noqa: F811
    local = tmp_path / "cwd"
    local.mkdir()
    monkeypatch.chdir(local)
    _etils_knows_ram(monkeypatch)
    _LocalOrbax.asked, _LocalOrbax.root = [], str(tmp_path / "orbax")
    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", _LocalOrbax)
    workdir = "ram://bucket/run"
    config = _config(data_dir)
    config.train.update(steps=4, checkpoint_every=2)
    config.eval.max_examples = 4

    state, model = train.train(config, workdir)
    evaluate.evaluate(config, workdir, state.params, model, 4)
    # Resuming reads the input position back from the remote workdir.
    config.train.steps = 6
    train.train(config, workdir)

    assert _LocalOrbax.asked == [f"{workdir}/checkpoints/state"] * 2
    files = {
        os.path.relpath(os.path.join(d, f), workdir)
        for d, _, fs in tf.io.gfile.walk(workdir)
        for f in fs
    }
    for name in [
        "eval_results.json",
        "eval_history.jsonl",
        "object_detection_results.json",
        "captioning_results.json",
        "categories.json",
        "tokenizer.model",
        "checkpoints/input/4/process_0_of_1.index",
    ]:
        assert name in files, sorted(files)
    assert any(f.startswith("events.out.tfevents") for f in files), sorted(files)
    report = json.loads(tf.io.gfile.GFile(f"{workdir}/eval_results.json").read())
    assert report["step"] == 4
    assert os.listdir(local) == []  # nothing leaked to a local `ram:` folder
