"""The launchers: every script parses, every --dry-run prints the commands a run
needs, and the Colab notebook runs end to end on CPU with a tiny override."""

import json
import os
import shlex
import socket
import subprocess
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.rglob("*.sh"))
TASKS = ("object_detection", "instance_segmentation", "keypoint_detection", "captioning")


def bash(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=check,
        env={**os.environ, **(env or {})},
    )


def lines_with(output: str, *words: str) -> list[str]:
    return [line for line in output.splitlines() if all(w in line for w in words)]


def command_option(line: str, name: str) -> str:
    """The value of --name=... in a printed command line, unquoted."""
    values = [a.split("=", 1)[1] for a in shlex.split(line) if a.startswith(f"--{name}=")]
    assert len(values) == 1, line
    return values[0]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses(script):
    assert bash("-n", str(script)).returncode == 0


def test_every_launcher_is_covered():
    names = {str(p.relative_to(LAUNCH)) for p in SCRIPTS}
    assert names == {
        "common.sh",
        "install.sh",
        "tpu_pod.sh",
        "gcloud_batch/submit.sh",
        "gcloud_batch/task.sh",
    }


def test_tpu_pod_dry_run_prints_the_pod_commands():
    out = bash(
        "launch/tpu_pod.sh",
        "--workdir=gs://bucket/run",
        "--accelerator=v4-32",
        "--project=my-project",
        "--dry-run",
        "--",
        "--config.train.steps=10",
        "--config.data.coco_dir=gs://bucket/my coco",
    ).stdout
    (create,) = lines_with(out, "gcloud compute tpus tpu-vm create unified-seq")
    assert "--accelerator-type=v4-32" in create and "--version=tpu-ubuntu2204-base" in create
    assert "--zone=us-central2-b" in create and "--project=my-project" in create
    (scp,) = lines_with(out, "gcloud compute tpus tpu-vm scp")
    assert "--worker=all" in scp and "unified-seq:unified_seq.tar.gz" in scp
    ssh = lines_with(out, "gcloud compute tpus tpu-vm ssh unified-seq", "--worker=all")
    assert len(ssh) == 3  # unpack, install, run
    assert "tar -xzf" in command_option(ssh[0], "command")
    assert "launch/install.sh tpu" in command_option(ssh[1], "command")

    # The main command on every worker, its output tagged by host and kept in logs/.
    remote, log = ssh[2].rsplit(" 2>&1 | tee ", 1)
    assert Path(log).parent == ROOT / "logs"
    main = shlex.split(command_option(remote, "command").split("&&", 1)[1].split(" 2>&1 ")[0])
    assert main[1:4] == ["-m", "unified_seq.main", "--config=configs/multitask_coco.py"]
    assert "--workdir=gs://bucket/run" in main
    assert main[-2:] == ["--config.train.steps=10", "--config.data.coco_dir=gs://bucket/my coco"]
    # JAX finds the workers of a TPU slice itself.
    assert "--coordinator_address" not in out


def test_tpu_pod_dry_run_clones_a_repo_and_deletes_the_slice():
    out = bash(
        "launch/tpu_pod.sh",
        "--workdir=gs://bucket/run",
        "--repo=https://example.com/unified_seq.git",
        "--ref=v1",
        "--delete",
        "--dry-run",
    ).stdout
    (clone,) = lines_with(out, "git clone")
    assert "--worker=all" in clone
    assert "--branch=v1 https://example.com/unified_seq.git ~/unified_seq" in clone
    assert not lines_with(out, "tpu-vm scp")
    assert out.splitlines()[-1].startswith("gcloud compute tpus tpu-vm delete unified-seq")


def test_launchers_refuse_a_local_workdir():
    for script in ("launch/tpu_pod.sh", "launch/gcloud_batch/submit.sh"):
        result = bash(script, "--workdir=/tmp/run", "--dry-run", check=False)
        assert result.returncode == 2
        assert "gs://" in result.stderr


def test_batch_dry_run_prints_the_job_spec_and_submit_command(tmp_path):
    out = bash(
        "launch/gcloud_batch/submit.sh",
        "--workdir=gs://bucket/run",
        "--hosts=4",
        "--job=us-test",
        "--location=europe-west4",
        "--dry-run",
        "--",
        "--config.train.steps=10",
        "--config.data.coco_dir=gs://bucket/my coco",
        env={"TMPDIR": str(tmp_path)},  # where the filled spec is written
    ).stdout
    lines = out.splitlines()
    (copy,) = lines_with(out, "gcloud storage cp")
    assert copy.endswith(" gs://bucket/run/batch/code.tar.gz")

    start = lines.index("{")
    spec = json.loads("\n".join(lines[start : lines.index("}", start) + 1]))
    (group,) = spec["taskGroups"]
    assert group["taskCount"] == group["parallelism"] == 4
    assert group["taskCountPerNode"] == 1 and group["requireHostsFile"] is True
    install, barrier, train = group["taskSpec"]["runnables"]
    assert "task.sh install" in install["script"]["text"]
    assert "barrier" in barrier
    run_args = shlex.split(train["script"]["text"])
    assert run_args[:3] == ["bash", "/opt/unified_seq/launch/gcloud_batch/task.sh", "run"]
    assert "--workdir=gs://bucket/run" in run_args
    assert run_args[-1] == "--config.data.coco_dir=gs://bucket/my coco"
    assert group["taskSpec"]["volumes"][0]["gcs"]["remotePath"] == "bucket/run/batch"
    (instances,) = spec["allocationPolicy"]["instances"]
    assert instances["installGpuDrivers"] is True
    assert instances["policy"]["machineType"] == "a2-highgpu-1g"

    (submit,) = lines_with(out, "gcloud batch jobs submit us-test")
    assert "--location=europe-west4" in submit
    spec_file = Path(command_option(submit, "config"))
    assert spec_file.parent.parent == tmp_path
    assert json.loads(spec_file.read_text()) == spec


def test_batch_logs_come_back_into_logs():
    out = bash("launch/gcloud_batch/submit.sh", "--workdir=gs://bucket/run", "--logs", "--dry-run")
    (copy,) = lines_with(out.stdout, "gcloud storage cp")
    assert shlex.split(copy)[3:] == ["gs://bucket/run/batch/logs/*", f"{ROOT}/logs/run/"]


def _task_run(tmp_path, hosts: list[str], **env) -> subprocess.CompletedProcess:
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("".join(f"{h}\n" for h in hosts))
    env = {"BATCH_HOSTS_FILE": str(hosts_file), **env}
    args = ("run", "--dry-run", "--config=c.py", "--workdir=gs://b/r")
    return bash("launch/gcloud_batch/task.sh", *args, env=env, check=False)


def test_batch_task_takes_its_process_id_from_the_hosts_file(tmp_path):
    hosts = ["10.0.0.7", socket.gethostname(), "10.0.0.9"]
    # The hosts file, not the task index, decides: it also names the coordinator.
    result = _task_run(tmp_path, hosts, BATCH_TASK_COUNT="3", BATCH_TASK_INDEX="2")
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        "/opt/unified_seq_venv/bin/python",
        "-m",
        "unified_seq.main",
        "--config=c.py",
        "--workdir=gs://b/r",
        "--coordinator_address=10.0.0.7:8476",
        "--num_processes=3",
        "--process_id=1",
    ]


def test_batch_task_falls_back_to_its_index_or_fails_clearly(tmp_path):
    result = _task_run(
        tmp_path, ["10.0.0.7", "10.0.0.8"], BATCH_TASK_COUNT="2", BATCH_TASK_INDEX="1"
    )
    assert "--process_id=1" in result.stdout and "BATCH_TASK_INDEX=1" in result.stderr
    result = _task_run(tmp_path, ["10.0.0.7"], BATCH_TASK_COUNT="2", BATCH_TASK_INDEX="1")
    assert result.returncode == 2 and "taskCountPerNode" in result.stderr


def test_install_dry_run_installs_the_checkout_with_the_accelerators_jax(tmp_path):
    out = bash("launch/install.sh", "tpu", str(tmp_path / "venv"), "--dry-run").stdout
    (pip,) = lines_with(out, "uv pip install")
    assert shlex.split(pip)[-3:] == ["-e", str(ROOT), "jax[tpu]>=0.10,<0.11"]
    assert lines_with(out, "uv venv --python 3.11")


def test_colab_notebook_runs_on_cpu(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    tiny = (
        "--config.data.synthetic.num_train=16 --config.data.synthetic.num_val=8 "
        "--config.data.shuffle_buffer=16 --config.train.batch_size=2 "
        "--config.tasks.object_detection.batch_size=2 --config.eval.batch_size=4 "
        "--config.optim.warmup_steps=2 --config.train.log_every=3 "
        "--config.train.checkpoint_every=0 "
        # One layer each: the notebook's time is mostly compiling four tasks.
        "--config.model.enc_depth=1 --config.model.dec_depth=1 "
        "--config.model.enc_width=64 --config.model.dec_width=64 "
        "--config.model.enc_mlp_dim=128 --config.model.dec_mlp_dim=128"
    )
    monkeypatch.setenv("UNIFIED_SEQ_NOTEBOOK_STEPS", "6")
    monkeypatch.setenv("UNIFIED_SEQ_NOTEBOOK_EVAL_EXAMPLES", "4")
    monkeypatch.setenv("UNIFIED_SEQ_NOTEBOOK_FLAGS", tiny)
    monkeypatch.setenv("UNIFIED_SEQ_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("UNIFIED_SEQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(LAUNCH / "colab.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(LAUNCH)}},  # where Jupyter runs it
    )
    client.execute()

    report = json.loads((workdir / "eval_results.json").read_text())
    assert report["step"] == 6 and set(TASKS) <= set(report)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "accelerator: cpu" in text and "step 6/6" in text
    assert f'"step": {report["step"]}' in text
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == len(TASKS)
