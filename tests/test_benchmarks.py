"""`python -m benchmarks.NAME` runs and reports its fields (timings are not asserted)."""

import json
import sys

import numpy as np
import pytest

from benchmarks import decode, peak, side_by_side
from benchmarks import input as input_benchmark
from benchmarks import train as train_benchmark

MACHINE = {"backend", "device", "devices", "cpus", "host", "jax"}


def _last_line(path) -> dict:
    lines = path.read_text().splitlines()
    assert lines, "nothing appended"
    return json.loads(lines[-1])


def test_peak_reports_both_dtypes(tmp_path):
    results = tmp_path / "results.jsonl"
    printed = peak.main(["--size", "128", "--repeats", "2", "--results", str(results)])
    record = _last_line(results)
    assert record == printed and record["benchmark"] == "peak"
    assert set(record["machine"]) == MACHINE
    assert record["float32_gflops"] > 0 and record["bfloat16_gflops"] > 0


TINY = [
    "model.enc_depth=1", "model.dec_depth=1", "model.enc_width=32", "model.dec_width=32",
    "model.enc_mlp_dim=64", "model.dec_mlp_dim=64", "model.enc_heads=2", "model.dec_heads=2",
    "data.image_size=64", "train.batch_size=2", "tasks.object_detection.batch_size=2",
]  # fmt: skip


def test_train_reports_flops_and_utilisation(tmp_path):
    results = tmp_path / "results.jsonl"
    sets = TINY
    args = ["--config", "configs/single_task.py:object_detection", "--repeats", "1"]
    args += ["--peak_size", "256", "--results", str(results)]
    for s in sets:
        args += ["--set", s]
    record = train_benchmark.main(args)
    assert _last_line(results) == record
    assert record["step_s"] > 0 and record["images_per_s"] > 0
    # XLA's count and the analytic matmul count agree to within the
    # elementwise work the analytic count leaves out.
    assert 0.5 < record["analytic_gflops_per_step"] / record["xla_gflops_per_step"] < 1.2
    # MFU is the unrounded ratio of the two rounded figures beside it.
    ratio = record["achieved_gflops"] / record["float32_gflops"]
    assert record["mfu"] > 0 and abs(record["mfu"] - ratio) <= 0.05 * ratio + 1e-3


def test_shared_config_is_the_side_by_side_model():
    config = train_benchmark.shared_config()
    model_flops = train_benchmark.analytic_flops(
        config,
        224,
        {"object_detection": 128},
        {"object_detection": {"image": np.zeros((8, 1, 1, 3)), "input_seq": np.zeros((8, 128))}},
    )
    assert round(model_flops / 1e9, 1) == 127.4  # XLA counts 129.2 with the elementwise ops


def test_decode_reports_greedy_top_p_and_the_cache(tmp_path):
    results = tmp_path / "results.jsonl"
    record = decode.main(
        ["--tiny", "--lengths", "8", "--batches", "2", "--recompute_batches", "2", "--repeats", "1"]
        + ["--results", str(results)]
    )
    assert _last_line(results) == record
    row = record["batch2_len8"]
    assert row["greedy_tokens_per_s"] > 0 and row["top_p_tokens_per_s"] > 0
    assert row["same_tokens"] is True and row["cached_speedup"] > 0


def test_input_reports_each_tasks_rate_against_the_steps_consumption(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFIED_SEQ_CACHE", str(tmp_path / "cache"))  # the generated set
    results = tmp_path / "results.jsonl"
    sets = TINY + [
        "data.synthetic.num_train=16", "data.synthetic.num_val=4", "data.shuffle_buffer=8",
        "tasks.object_detection.projected_fraction=0.7",
    ]  # fmt: skip
    args = ["--config", "configs/single_task.py:object_detection", "--results", str(results)]
    args += ["--warmup", "1", "--batches", "2", "--repeats", "1", "--step_repeats", "1"]
    record = input_benchmark.main(args + [a for s in sets for a in ("--set", s)])
    assert _last_line(results) == record and record["benchmark"] == "input"
    row = record["tasks"]["object_detection"]
    assert row["batch"] == 2 and row["examples_per_s"] > 0
    assert row["consumed_per_s"] == round(2 * record["train_steps_per_s"], 1)
    assert row["headroom"] == round(row["examples_per_s"] / row["consumed_per_s"], 2)
    assert record["input_steps_per_s"] > 0 and record["headroom"] > 0


# A stand-in for the official repository: its Model / get_loss / build_optimizer
# interface in plain TensorFlow, small enough to build in seconds.
FAKE_AR_MODEL = """
import tensorflow as tf

class Model(tf.Module):
    def __init__(self, config):
        m = config.model
        self.embed = tf.Variable(tf.random.normal([m.vocab_size, 8], stddev=0.02))
        self.colour = tf.Variable(tf.zeros([3, 8]))

    def __call__(self, image, tokens, training):
        h = tf.gather(self.embed, tokens) + (tf.reduce_mean(image, [1, 2]) @ self.colour)[:, None]
        return tf.einsum("btd,vd->btv", h, self.embed)
"""
FAKE_MODEL_UTILS = """
import tensorflow as tf

def get_loss(logits, targets, kind):
    assert kind == "xent"
    return tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)

class _SGD:
    def __init__(self, lr):
        self.lr = lr

    def apply_gradients(self, pairs):
        for g, v in pairs:
            v.assign_sub(self.lr * g)

def build_optimizer(config, lr):
    return _SGD(lr)
"""


def test_side_by_side_alternates_with_the_official_step(tmp_path):
    repo = tmp_path / "pix2seq"
    (repo / "models").mkdir(parents=True)
    (repo / "models" / "ar_model.py").write_text(FAKE_AR_MODEL)
    (repo / "models" / "model_utils.py").write_text(FAKE_MODEL_UTILS)
    results = tmp_path / "results.jsonl"
    args = ["--pix2seq", str(repo), "--tf_python", sys.executable, "--tiny"]
    record = side_by_side.main(args + ["--rounds", "1", "--steps", "1", "--results", str(results)])
    assert _last_line(results) == record and record["benchmark"] == "side_by_side"
    assert record["parameters"]["official"] == 35000 * 8 + 3 * 8  # the stand-in's variables
    assert record["parameters"]["ours"] > 0
    # Each ratio is the one its step times give.
    want = record["official_step_s"] / record["ours_same_step_s"]
    assert abs(record["same_speedup"] - want) <= 0.01 * want
    ours_real = record["ours_real_images_per_s"] / record["official_images_per_s"]
    assert abs(record["real_speedup"] - ours_real) <= 0.01 * ours_real
    assert 0 < record["weighted_share_real"]["object_detection"] < 1
    # Missing pieces fail before anything is built, naming the flag and the fix.
    with pytest.raises(SystemExit, match="--pix2seq .*clone"):
        side_by_side.main(["--pix2seq", str(tmp_path), "--tf_python", sys.executable])
    with pytest.raises(SystemExit, match="--tf_python .*tensorflow-cpu==2.15.1"):
        side_by_side.main(["--pix2seq", str(repo), "--tf_python", str(tmp_path / "nope")])
