"""The README command killed (SIGKILL at a random moment) or stopped (SIGTERM), then rerun.

Either way the rerun of the same command ends with exactly the parameters of
an unbroken run: nothing is lost but the steps after the last checkpoint,
and those are retrained on the same batches.
"""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from unified_seq import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = [
    "--config.train.steps=24",
    "--config.train.batch_size=4",
    "--config.train.log_every=3",
    "--config.train.checkpoint_every=6",
    "--config.train.keep_checkpoints=2",
    "--config.optim.warmup_steps=3",
    "--config.model.enc_depth=1",
    "--config.model.dec_depth=1",
    "--config.model.enc_width=64",
    "--config.model.dec_width=64",
    "--config.model.enc_mlp_dim=128",
    "--config.model.dec_mlp_dim=128",
    "--config.data.synthetic.num_train=32",
    "--config.data.synthetic.num_val=8",
    "--config.data.shuffle_buffer=32",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    env = dict(os.environ)
    env.update(
        UNIFIED_SEQ_CACHE=cache,
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        # Every launch compiles the same step: once is enough (CI time).
        JAX_COMPILATION_CACHE_DIR=os.path.join(cache, "jax"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    env.pop("XLA_FLAGS", None)
    return env


def _start(workdir: str, env: dict) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "unified_seq.main",
        "--config", os.path.join(ROOT, "configs", "single_task.py") + ":object_detection",
        "--workdir", workdir, "--mode", "train", *OVERRIDES,
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(workdir: str, env: dict) -> str:
    proc = _start(workdir, env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def _final_params(workdir: str) -> tuple[int, list[np.ndarray]]:
    item, step = checkpoint.locate(workdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
        checkpoint.params_shapes(item),
    )
    params = checkpoint.restore_params(item, abstract)
    return step, [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


@pytest.fixture(scope="module")
def unbroken(env, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("unbroken"))
    tic = time.perf_counter()
    _finish(workdir, env)
    return _final_params(workdir), time.perf_counter() - tic


def _assert_same(expected, workdir: str, context: str) -> None:
    step, params = _final_params(workdir)
    assert step == expected[0] == 24, context
    for a, b in zip(expected[1], params, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=context)


def test_sigkill_at_a_random_moment_then_rerun_equals_unbroken(unbroken, env, tmp_path):
    expected, duration = unbroken
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(1.0, duration)
    workdir = str(tmp_path / "killed")
    proc = _start(workdir, env)
    time.sleep(delay)
    proc.kill()
    out, _ = proc.communicate()
    context = f"killed after {delay:.1f} s of {duration:.1f} (seed {seed}):\n{out[-1500:]}"
    rerun = _finish(workdir, env)
    _assert_same(expected, workdir, context + "\nrerun:\n" + rerun[-1500:])


def test_sigterm_saves_stops_cleanly_and_the_rerun_equals_unbroken(unbroken, env, tmp_path):
    expected, _ = unbroken
    workdir = str(tmp_path / "preempted")
    proc = _start(workdir, env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/24"):
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.stdout.read()
    proc.wait(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    stopped = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert stopped, out[-3000:]
    step = int(stopped[0].split()[5].rstrip(":"))
    assert 3 <= step < 24
    assert checkpoint.locate(workdir)[1] == step  # saved where it stopped, off the schedule
    rerun = _finish(workdir, env)
    assert f"resumed from step {step}" in rerun
    _assert_same(expected, workdir, out[-1500:])
