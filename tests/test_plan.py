"""`--mode plan` (plan.run) on 8 fake CPU devices: consistent bytes, FLOPs and step times."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(__file__))

# Runs in a fresh process: the fake devices must be set before JAX starts.
SCRIPT = """
import importlib.util, json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
spec = importlib.util.spec_from_file_location("c", "configs/multitask_synthetic.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.model.update(dict(enc_depth=1, enc_width=32, enc_mlp_dim=64, enc_heads=2,
                         dec_depth=1, dec_width=32, dec_mlp_dim=64, dec_heads=2))
config.data.image_size = 64
config.mesh = "data:4,fsdp:2"
config.sharding_rules = ".*=fsdp"
config.train.batch_size = 16
config.tasks.object_detection.batch_size = 32
config.train.microbatches = 2
config.train.plan_steps = 1
from unified_seq import plan
report = plan.run(config, sys.argv[1])
print(json.dumps(report))
"""


def test_plan_reports_consistent_numbers(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    printed = out.stdout
    for heading in ("devices", "mesh", "batch", "parameters", "optimizer state",
                    "temporaries", "FLOPs", "step 1"):  # fmt: skip
        assert heading in printed, heading
    assert report == json.loads((tmp_path / "plan.json").read_text())

    assert report["devices"]["count"] == 8 and report["mesh"] == {"data": 4, "fsdp": 2}
    batch = report["batch"]
    assert batch["object_detection"]["global"] == 32
    assert batch["object_detection"]["per_process"] == 32
    assert batch["object_detection"]["per_device"] == 4.0
    assert batch["captioning"]["sequences"] == [2, 32]  # captions per image × length

    b = report["bytes_per_device"]
    params_total = 4 * report["model"]["parameters"]  # float32
    # Split over fsdp 2: half of every divisible array, all of the few others.
    assert params_total / 2 <= b["params"] < 0.6 * params_total, b
    # AdamW keeps two moments per parameter (and a few counters).
    assert 2 * b["params"] <= b["opt_state"] < 2 * b["params"] + 1024, b
    assert b["temp"] > 0 and b["peak"] >= b["params"] + b["opt_state"] + b["temp"]
    assert report["flops_per_device"] > 0
    assert len(report["step_s"]) == 1 and report["step_s"][0] > 0
