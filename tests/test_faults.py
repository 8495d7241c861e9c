"""Faults inside a run: NaN, failed and broken saves, config changes on resume, the lock.

Each stops with one message that names what happened and what is safe, and
never leaves a non-finite or half-read state behind.
"""

import gc
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_run import _config, data_dir  # noqa: F401

from unified_seq import checkpoint, train
from unified_seq import workdir as workdir_lib
from unified_seq.errors import CheckpointError, ConfigError, NonFiniteError, WorkdirError


def _poison_from(step_to_poison: int, monkeypatch) -> None:
    """Makes the train step turn the parameters into NaN once the state reaches a step."""
    make = train.make_train_step

    def poisoned(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def step(state, batches):
            new, metrics = step_fn(state, batches)
            bad = new.step >= step_to_poison
            params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new.params)
            finite = metrics["finite"] & ~bad
            return new.replace(params=params), {**metrics, "finite": finite}

        return step

    monkeypatch.setattr(train, "make_train_step", poisoned)


def _saved_steps(workdir) -> list[int]:
    folder = os.path.join(workdir, "checkpoints", "state")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


@pytest.fixture(scope="module")
def nan_run(data_dir, tmp_path_factory):  # noqa: F811
    """A run whose parameters turn NaN at step 5: it stops at its next check (step 6)."""
    workdir = str(tmp_path_factory.mktemp("nan"))
    config = _config(data_dir)
    config.train.update(steps=9, log_every=3, checkpoint_every=3)
    patch = pytest.MonkeyPatch()
    _poison_from(5, patch)
    try:
        with pytest.raises(NonFiniteError) as error:
            train.train(config, workdir)
    finally:
        patch.undo()
    message = str(error.value)
    del error
    gc.collect()  # the failed run's input threads go with its traceback
    return config, workdir, message


def test_a_nan_stops_the_run_before_it_is_saved(nan_run):
    _, workdir, message = nan_run
    assert "at step 6" in message
    assert f"last good checkpoint: step 3 in {workdir}/checkpoints" in message
    assert "learning_rate" in message and "\n" not in message
    assert _saved_steps(workdir) == [3]  # step 6 was never written


def test_the_rerun_resumes_from_the_last_good_checkpoint(nan_run):
    config, workdir, _ = nan_run
    state, _ = train.train(config, workdir)  # not poisoned now
    assert int(state.step) == 9
    assert _saved_steps(workdir) == [3, 6, 9]
    assert not checkpoint.non_finite_leaves(state.params)


def _finished_run(data_dir, workdir) -> tuple:  # noqa: F811
    config = _config(data_dir)
    config.train.update(steps=6, checkpoint_every=3)
    state, _ = train.train(config, workdir)
    return config, state


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):  # noqa: F811
    workdir = str(tmp_path_factory.mktemp("finished"))
    config, state = _finished_run(data_dir, workdir)
    return config, workdir, state


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _copy(src: str, dst) -> str:
    subprocess.run(["cp", "-r", src, str(dst)], check=True)
    return str(dst)


def _abstract(config):
    space = train.vocab.TokenSpace.from_config(config.vocab)
    model = train.build_model(config, space)
    optimizer = train.optim.make_optimizer(config.optim, int(config.train.steps))
    mesh = train.sharding.mesh_from_config(config)
    state, _ = train.create_state(
        model, optimizer, config, mesh, max(train.sequence_lengths(config).values())
    )
    return state


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(finished, tmp_path, caplog):
    config, source, unbroken = finished
    workdir = _copy(source, tmp_path / "run")
    step6 = os.path.join(workdir, "checkpoints", "state", "6")
    # Truncate every data file of the latest step, as a full disk would.
    for folder, _, names in os.walk(step6):
        for name in names:
            if not name.startswith("_") and "manifest" not in name:
                with open(os.path.join(folder, name), "r+b") as f:
                    f.truncate(max(os.path.getsize(f.name) // 3, 1))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=3, keep=5)
    state, step = ckpt.restore_latest(_abstract(config))
    assert step == 3
    assert "Checkpoint step 6 cannot be read" in caplog.text
    assert "Resuming from step 3 instead of the latest" in caplog.text
    assert _saved_steps(workdir) == [3]  # step 6 moved aside, so a rerun can save it again
    assert os.listdir(os.path.join(workdir, "checkpoints", "unreadable"))
    # The rerun trains 4-6 again and ends where the unbroken run ended.
    resumed, _ = train.train(config, workdir)
    for a, b in zip(
        jax.tree_util.tree_leaves(unbroken.params),
        jax.tree_util.tree_leaves(resumed.params),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_checkpoints_are_skipped_on_resume_and_refused_by_eval(finished, tmp_path):
    config, source, _ = finished
    workdir = _copy(source, tmp_path / "run")
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=3, keep=5)
    good, _ = ckpt.restore_latest(_abstract(config))
    # An older version could save a NaN state: step 9 is one.
    nan_params = jax.tree.map(lambda p: p * jnp.nan, good.params)
    ckpt.save(9, good.replace(params=nan_params, step=jnp.asarray(9)))
    ckpt.wait()
    state, step = ckpt.restore_latest(_abstract(config))
    assert step == 6 and not checkpoint.non_finite_leaves(state.params)
    with pytest.raises(NonFiniteError, match="checkpoint of step 9 .* non-finite parameters"):
        train.restore_params(config, workdir)


def test_a_failed_save_stops_the_run_with_one_message(finished, monkeypatch):
    config, workdir, _ = finished
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=3, keep=5)
    state, _ = ckpt.restore_latest(_abstract(config))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(CheckpointError) as error:
        ckpt.save(9, state)  # the train loop lets it through; main.py prints it
    message = str(error.value)
    assert "saving the checkpoint of step 9" in message and "No space left" in message
    assert "the last complete checkpoint is step 6" in message and "\n" not in message


def test_an_asynchronous_save_failure_is_reported_at_the_next_check(finished, monkeypatch):
    config, workdir, _ = finished
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=3, keep=5)
    ckpt._pending = 12

    def failed(self):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "check_for_errors", failed)
    with pytest.raises(CheckpointError, match="step 12 .* Input/output error.* step 6"):
        ckpt.check()


def test_a_config_that_changes_shapes_names_the_fields(finished, tmp_path):
    config, source, _ = finished
    workdir = _copy(source, tmp_path / "run")
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    stored = _read(os.path.join(workdir, "config.json"))
    wider = config.copy_and_resolve_references()
    wider.model.dec_width = 96
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=3, keep=5)
    with pytest.raises(ConfigError) as error:  # what train.train raises on resuming
        ckpt.restore_latest(_abstract(wider), lambda: train._config_changes(wider, workdir))
    message = str(error.value)
    assert "model.dec_width: 64 → 96" in message and "arrays differ" in message
    # main.py keeps the stored config.json on a resume and reports the change.
    changes = workdir_lib.save_config(workdir, wider, resuming=True)
    assert changes == ["model.dec_width: 64 → 96"]
    assert _read(os.path.join(workdir, "config.json")) == stored


def test_a_second_run_on_a_live_workdir_is_refused(tmp_path, caplog):
    workdir = str(tmp_path)
    lock_path = os.path.join(workdir, workdir_lib.LOCK_NAME)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"host": workdir_lib.socket.gethostname(), "pid": sleeper.pid, "started": 0}
        with open(lock_path, "w") as f:
            json.dump({**record, "heartbeat": 0}, f)
        with pytest.raises(WorkdirError, match=f"in use by another run \\(pid {sleeper.pid}"):
            workdir_lib.RunLock(workdir).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its process is gone (killed): the lock is taken over, with a warning.
    with workdir_lib.RunLock(workdir) as lock:
        assert json.loads(_read(lock_path))["pid"] == lock.pid
        assert "no longer alive" in caplog.text
    assert not os.path.exists(lock_path)
    # From another host, a fresh heartbeat holds the folder; a stale one does not.
    now = workdir_lib.time.time()
    with open(lock_path, "w") as f:
        json.dump({"host": "elsewhere", "pid": 1, "started": now, "heartbeat": now}, f)
    with pytest.raises(WorkdirError, match="on elsewhere"):
        workdir_lib.RunLock(workdir).acquire()
    with open(lock_path, "w") as f:
        stale = now - 2 * workdir_lib.STALE_S
        json.dump({"host": "elsewhere", "pid": 1, "started": stale, "heartbeat": stale}, f)
    workdir_lib.RunLock(workdir).acquire().release()


def test_an_unwritable_workdir_fails_at_once():
    with pytest.raises(WorkdirError, match="cannot write to --workdir=/proc/unified_seq_run"):
        workdir_lib.check_writable("/proc/unified_seq_run")
