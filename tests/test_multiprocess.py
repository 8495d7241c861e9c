"""Two processes of the README main command, 2 CPU devices each, as one job.

They train with every parameter split over both hosts, checkpoint, resume,
evaluate and write one eval_results.json; their logged losses equal those of
one process (this one, one device) at the same global batch. (Restoring onto
another mesh: tests/test_checkpoint.py, which also resumes on another process
count.) Both launches use the same mesh, so the second loads the first's
compiled programs from the cache: compiling is most of this file's time.
"""

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
# The README main command, shrunk: a small model and set, batch 8 per task
# (it must split over the 4 devices), a checkpoint every 6 steps.
OVERRIDES = [
    "--config.train.steps=12",
    "--config.train.batch_size=8",
    "--config.tasks.object_detection.batch_size=8",
    "--config.train.log_every=3",
    "--config.train.checkpoint_every=6",
    "--config.train.keep_checkpoints=5",
    "--config.optim.warmup_steps=3",
    "--config.model.enc_depth=1",
    "--config.model.dec_depth=1",
    "--config.model.enc_width=64",
    "--config.model.dec_width=64",
    "--config.model.enc_mlp_dim=128",
    "--config.model.dec_mlp_dim=128",
    "--config.data.synthetic.num_train=48",
    "--config.data.synthetic.num_val=8",
    "--config.data.shuffle_buffer=32",
    "--config.eval.max_examples=8",
    "--config.eval.batch_size=8",
]
FSDP_ACROSS_HOSTS = ("--config.mesh=data:1,fsdp:4", "--config.sharding_rules=.*=fsdp")
LOSS_LINE = re.compile(r"^step (\d+)/\d+ \| loss ([\d.]+) \((.*?)\)", re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: str, devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["UNIFIED_SEQ_CACHE"] = cache
    # A resumed job compiles what the first compiled: reuse it (CI time).
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(cache, "jax")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.pop("UNIFIED_SEQ_COORDINATOR_ADDRESS", None)
    return env


def _command(workdir: str, mode: str) -> list[str]:
    return [
        sys.executable, "-m", "unified_seq.main",
        "--config", os.path.join(ROOT, "configs", "multitask_synthetic.py"),
        "--workdir", workdir, "--mode", mode, *OVERRIDES,
    ]  # fmt: skip


def _run(workdir: str, mode: str, cache: str, processes: int, extra: list[str] = ()) -> list[str]:
    """Runs the job; returns each process's output (stdout + stderr)."""
    devices = 4 // processes  # 2 CPU cores in CI: few devices, few threads
    port = _free_port()
    procs = []
    for i in range(processes):
        flags = []
        if processes > 1:
            flags = [
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={processes}",
                f"--process_id={i}",
            ]
        procs.append(
            subprocess.Popen(
                _command(workdir, mode) + list(extra) + flags,
                cwd=ROOT,
                env=_env(cache, devices),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=600)
            outputs.append(out)
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    return outputs


def _losses(output: str) -> dict[int, dict[str, float]]:
    out = {}
    for step, loss, per_task in LOSS_LINE.findall(output):
        pairs = per_task.split()
        row = {"loss": float(loss)}
        row.update({pairs[k]: float(pairs[k + 1]) for k in range(0, len(pairs), 2)})
        out[int(step)] = row
    return out


def _assert_close(a: dict, b: dict, steps) -> None:
    for step in steps:
        assert a[step].keys() == b[step].keys()
        for key in a[step]:
            # Printed to 3-4 decimals; sums over 1 vs 4 devices differ in order.
            assert abs(a[step][key] - b[step][key]) <= 2e-3, (step, key, a[step], b[step])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    two = str(tmp_path_factory.mktemp("two_processes"))
    one = str(tmp_path_factory.mktemp("one_process"))
    # Two processes train 12 steps (checkpoints at 6 and 12), every parameter
    # split over all 4 devices of both hosts ...
    first = _run(two, "train", cache, processes=2, extra=FSDP_ACROSS_HOSTS)
    # ... and resume from step 6, then evaluate with the parameters split.
    for kind in ("state", "input"):
        shutil.rmtree(os.path.join(two, "checkpoints", kind, str(STEPS)))
    second = _run(two, "train_and_eval", cache, processes=2, extra=FSDP_ACROSS_HOSTS)
    return {"two": two, "first": first, "second": second, "unbroken": _run_here(one, cache)}


def _run_here(workdir: str, cache: str) -> str:
    """The same training in this process, on its one device; returns what it printed."""
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import multitask_synthetic

    from unified_seq import train

    config = multitask_synthetic.get_config()
    for override in OVERRIDES:
        path, value = override[len("--config.") :].split("=")
        *blocks, field = path.split(".")
        block = config
        for name in blocks:
            block = block[name]
        block[field] = block.get_type(field)(value)
    printed = io.StringIO()
    os.environ["UNIFIED_SEQ_CACHE"] = cache  # the processes' generated data set
    try:
        with contextlib.redirect_stdout(printed):
            train.train(config, workdir)
    finally:
        os.environ.pop("UNIFIED_SEQ_CACHE")
    return printed.getvalue()


def test_two_processes_log_the_losses_of_one_process(runs):
    reference = _losses(runs["unbroken"])
    assert sorted(reference) == [3, 6, 9, 12]
    first, second = _losses(runs["first"][0]), _losses(runs["second"][0])
    _assert_close(first, reference, [3, 6, 9, 12])
    # The resumed job continues exactly: same losses after the checkpoint.
    assert sorted(second) == [9, 12]
    _assert_close(second, reference, [9, 12])
    # Only process 0 prints progress.
    assert not _losses(runs["first"][1]) and not _losses(runs["second"][1])


def test_two_processes_write_one_evaluation(runs):
    with open(os.path.join(runs["two"], "eval_results.json")) as f:
        report = json.load(f)
    assert report["step"] == STEPS
    for task, key in [
        ("object_detection", "AP"),
        ("instance_segmentation", "AP"),
        ("keypoint_detection", "AP"),
        ("captioning", "BLEU-4"),
    ]:
        assert 0.0 <= report[task][key] <= 1.0
    with open(os.path.join(runs["two"], "eval_history.jsonl")) as f:
        assert len(f.read().splitlines()) == 1
    # Both processes saved their input position next to each checkpoint.
    saved = sorted(os.listdir(os.path.join(runs["two"], "checkpoints", "input", "6")))
    assert saved == [
        "process_0_of_2.data-00000-of-00001",
        "process_0_of_2.index",
        "process_1_of_2.data-00000-of-00001",
        "process_1_of_2.index",
    ]
