"""Whole runs on a tiny generated set: a tiny model overfits; per-task batches.

That a resumed run equals an unbroken one is tested where runs are broken:
tests/test_faults.py (an unreadable latest checkpoint) and
tests/test_kill_resume.py (SIGKILL, SIGTERM).
"""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from unified_seq import defaults, evaluate, train
from unified_seq.data import synthetic
from unified_seq.models import sizes
from unified_seq.predictor import Predictor


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    return synthetic.generate(root, seed=1, num_train=16, num_val=8, image_size=64)


def _config(data_dir: str, tasks=("object_detection", "captioning")) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.vocab = defaults.vocab_config()
    config.vocab.update(coord_shift=200, bins=64, text_shift=264, text_vocab_size=128)
    config.data = defaults.data_config()
    config.data.update(source="coco_json", coco_dir=data_dir, image_size=64, shuffle_buffer=16)
    all_tasks = defaults.task_configs()
    config.tasks = ml_collections.ConfigDict({t: all_tasks[t] for t in tasks})
    if "object_detection" in config.tasks:
        config.tasks.object_detection.max_instances = 6
    if "captioning" in config.tasks:
        config.tasks.captioning.update(max_len=24, captions_per_image=2, color_jitter=0.0)
    config.model = sizes.model_config(
        "tiny", enc_depth=1, enc_width=64, enc_mlp_dim=128, enc_heads=2,
        dec_depth=2, dec_width=64, dec_mlp_dim=128, dec_heads=2, dropout=0.0,
    )  # fmt: skip
    config.optim = defaults.optim_config()
    config.optim.update(learning_rate=1e-3, warmup_steps=2, grad_clip_norm=1.0)
    config.train = defaults.train_config()
    config.train.update(steps=6, batch_size=4, log_every=3, checkpoint_every=3, keep_checkpoints=5)
    config.eval = defaults.eval_config()
    config.eval.batch_size = 8
    config.mesh = defaults.mesh_config()
    config.sharding_rules = ".*=replicate"
    return config


def _leaves(params):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def test_tiny_model_overfits_sixteen_images(data_dir, tmp_path):
    config = _config(data_dir, tasks=("object_detection",))
    det = config.tasks.object_detection
    det.update(scale_jitter=(1.0, 1.0), flip=False, top_p=0.0)
    config.train.update(steps=400, batch_size=16, checkpoint_every=0, log_every=100)
    config.optim.update(learning_rate=3e-3, warmup_steps=20, end_factor=0.01, weight_decay=0.0)
    config.data.eval_split = "train"
    config.train.eval_every = 200
    workdir = str(tmp_path)
    reports = []

    def evaluate_fn(step, params, model):
        reports.append(evaluate.evaluate(config, workdir, params, model, step))

    state, model = train.train(config, workdir, evaluate_fn)
    evaluate_fn(int(state.step), state.params, model)
    report = reports[-1]
    assert report["object_detection"]["AP"] >= 0.9, report
    with open(os.path.join(workdir, "eval_results.json")) as f:
        assert json.load(f)["object_detection"]["AP"] == report["object_detection"]["AP"]
    # Each evaluation's metrics reach TensorBoard at its step, beside the losses.
    assert [r["step"] for r in reports] == [200, 400]
    charts = _scalars(os.path.join(workdir, "eval"))
    expected = {r["step"]: r["object_detection"]["AP"] for r in reports}
    assert charts["object_detection/AP"] == pytest.approx(expected, rel=1e-6)  # float32
    assert set(charts) == {"object_detection/AP", "object_detection/AP50", "object_detection/AP75"}
    assert {"loss", "loss/object_detection"} <= set(_scalars(workdir))


def _scalars(logdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the TensorBoard event files directly in `logdir`."""
    charts = {}
    for name in tf.io.gfile.listdir(logdir):
        if name.startswith("events.out.tfevents"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
                for value in event.summary.value:
                    number = float(tf.make_ndarray(value.tensor))
                    charts.setdefault(value.tag, {})[event.step] = number
    return charts


def test_a_task_can_have_its_own_batch_size(data_dir):
    from unified_seq import vocab
    from unified_seq.data import inputs

    config = _config(data_dir)
    config.tasks.object_detection.batch_size = 8
    assert train.task_batch_sizes(config) == {"object_detection": 8, "captioning": 4}
    space = vocab.TokenSpace.from_config(config.vocab)
    feed = train._Inputs(config, inputs.load_split(config, "train", space))
    batches = feed.next()
    assert batches["object_detection"]["image"].shape == (8, 64, 64, 3)
    assert batches["captioning"]["input_seq"].shape[:2] == (4, 2)

    config.train.mixing = "data"
    with pytest.raises(ValueError, match="tasks.object_detection.batch_size"):
        train.validate(config)


def test_decode_all_objects_fills_every_slot(data_dir):
    from unified_seq import vocab
    from unified_seq.data import inputs
    from unified_seq.tasks import build_tasks, detection

    config = _config(data_dir, tasks=("object_detection",))
    det = config.tasks.object_detection
    det.update(decode_all_objects=True, drop_fake=False)
    space = vocab.TokenSpace.from_config(config.vocab)
    model = train.build_model(config, space)
    images = np.zeros([2, 64, 64, 3], np.float32)
    params = jax.jit(model.init)(jax.random.key(0), images, np.zeros([2, 4], np.int32))["params"]
    predictor = Predictor(model, params)
    task = build_tasks(config)["object_detection"]
    data = inputs.load_split(config, "val", space)
    batch = next(evaluate.eval_batches(task, data, config))
    n = len(batch["image"])
    np.testing.assert_array_equal(batch["prompt"], [[vocab.TASK_PROMPTS["object_detection"]]] * n)
    res = predictor.sample(task, batch, jax.random.key(1))
    # Untrained, the model would end or break the object list anywhere; with
    # the answer grammar every image gets max_instances well-formed objects.
    slots = res["tokens"][:, : 5 * det.max_instances].reshape(n, -1, 5)
    assert np.all(space.is_coord(slots[..., :4]))
    assert np.all(space.is_class(slots[..., 4]) | (slots[..., 4] == vocab.FAKE_CLASS))
    for i in range(n):
        pred = detection.decode(
            res["tokens"][i], res["range_probs"][i], batch["frame"][i], space, det
        )
        assert len(pred["boxes"]) == det.max_instances
