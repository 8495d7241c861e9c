"""A fifth task defined in this file alone: counting the objects of an image.

It plugs in with one entry in `unified_seq.tasks.TASKS` and one block in the
config, then trains, evaluates and previews through the very functions
`python -m unified_seq.main` calls: a task is one file plus one entry.
"""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from unified_seq import data_check, defaults, evaluate, optim, sharding, train, visualize, vocab
from unified_seq.data import inputs, synthetic, transforms, views
from unified_seq.models import sizes
from unified_seq.tasks import TASKS
from unified_seq.tasks.sequence import build_sequences
from unified_seq.tasks.task import Task, one_example

COUNT_PROMPT = 14  # a free token of the task range 10-29


class CountObjects(Task):
    """Prompt `[14]`; answer one coordinate token `coord_shift + number of objects`, EOS."""

    prompt_token = COUNT_PROMPT
    annotations = ("boxes",)

    @property
    def sequence_length(self) -> int:
        return 2

    def has_training_target(self, example):
        return tf.constant(True)

    def _count_token(self, example):
        count = tf.reduce_sum(tf.cast(views.target_objects(example), tf.int32))
        return self.space.coord_shift + tf.minimum(count, self.space.bins - 1)

    def train_examples(self, example, image, seed, labels):
        seeds = tf.random.experimental.stateless_split(seed, 3)
        f = views.augment({"image": image}, seeds, self.cfg, self.run.image_size)
        f = transforms.pad_to_square(f, self.run.image_size, self.run.pad_value)
        seq = build_sequences(
            tf.constant([COUNT_PROMPT]),
            self._count_token(example)[None],
            tf.ones([1]),
            self.sequence_length,
            float(self.cfg.eos_weight),
        )
        return one_example({"image": f["image"], **seq})

    def eval_examples(self, example, image, labels):
        view = views.eval_image(example, image, self.run.image_size, self.run.pad_value)
        return one_example({**view, "prompt": tf.constant([COUNT_PROMPT], tf.int32)})

    def results(self, batch, samples, labels):
        counts = samples["tokens"][:, 0] - self.space.coord_shift
        return [
            {"image_id": int(i), "count": int(c)}
            for i, c in zip(batch["image/id"], counts, strict=True)
        ]

    def metric(self, results, truth):
        gt = truth.coco("instances")
        counts = {i: sum(not a.get("iscrowd", 0) for a in gt.imgToAnns[i]) for i in truth.image_ids}
        hits = [r["count"] == counts[r["image_id"]] for r in results]
        return {"accuracy": float(np.mean(hits)) if hits else 0.0}

    def preview(self, example, labels):
        count = int(example["target_seq"][0]) - self.space.coord_shift
        return visualize.draw(example["image"], caption=f"{count} objects")


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "count_objects", CountObjects)  # the one entry
    root = synthetic.generate(
        str(tmp_path / "data"), seed=2, num_train=16, num_val=8, image_size=64
    )
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.vocab = defaults.vocab_config()
    config.vocab.update(coord_shift=200, bins=64, text_shift=264, text_vocab_size=128)
    config.data = defaults.data_config()
    config.data.update(source="coco_json", coco_dir=root, image_size=64, shuffle_buffer=16)
    detection = defaults.task_configs().object_detection
    detection.update(weight=0.5, batch_size=4, max_instances=6)
    # The one block: the toy task's own settings, next to a task of the library.
    count = {"weight": 0.5, "batch_size": 4, "scale_jitter": (1.0, 1.0), "flip": True,
             "eos_weight": 0.1, "temperature": 0.0}  # fmt: skip
    config.tasks = ml_collections.ConfigDict(
        {"count_objects": count, "object_detection": detection}
    )
    config.model = sizes.model_config(
        "tiny", enc_depth=1, enc_width=32, enc_mlp_dim=64, enc_heads=2,
        dec_depth=1, dec_width=32, dec_mlp_dim=64, dec_heads=2, dropout=0.0,
    )  # fmt: skip
    config.optim = defaults.optim_config()
    config.optim.update(learning_rate=3e-3, warmup_steps=2, end_factor=0.1, grad_clip_norm=1.0)
    config.train = defaults.train_config()
    config.train.update(steps=30, batch_size=4, log_every=10, checkpoint_every=0)
    config.eval = defaults.eval_config()
    config.eval.batch_size = 8
    config.mesh = defaults.mesh_config()
    config.sharding_rules = ".*=replicate"
    return config


def test_a_task_defined_in_a_test_trains_evaluates_and_previews(config, tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    train.validate(config)
    assert train.sequence_lengths(config)["count_objects"] == 2

    # --mode data
    summary = data_check.run(config, workdir, num_batches=1)
    assert summary["tasks"]["count_objects"]["shapes"]["input_seq"] == [4, 2]
    with Image.open(os.path.join(workdir, "data_preview", "count_objects.png")) as picture:
        assert picture.width > 0

    # --mode train_and_eval
    space = vocab.TokenSpace.from_config(config.vocab)
    batches = train._Inputs(config, inputs.load_split(config, "train", space)).next()
    batches = {
        t: {k: v for k, v in b.items() if not k.startswith("num_")} for t, b in batches.items()
    }
    model = train.build_model(config, space)
    initial, _ = train.create_state(
        model,
        optim.make_optimizer(config.optim, 30),
        config,
        sharding.mesh_from_config(config),
        max(train.sequence_lengths(config).values()),
    )
    state, model = train.train(config, workdir)
    assert int(state.step) == 30
    before = train.task_losses(initial.params, model, batches, jax.random.key(0), train=False)
    after = train.task_losses(state.params, model, batches, jax.random.key(0), train=False)
    # The count token was learned from: its loss fell, as detection's did.
    assert after["count_objects"] < before["count_objects"], (before, after)
    assert after["object_detection"] < before["object_detection"], (before, after)

    report = evaluate.evaluate(config, workdir, state.params, model, int(state.step))
    assert 0.0 <= report["count_objects"]["accuracy"] <= 1.0
    assert "AP" in report["object_detection"]
    with open(os.path.join(workdir, "count_objects_results.json")) as f:
        results = json.load(f)
    assert sorted(r["image_id"] for r in results) == sorted(
        int(i) for i in inputs.load_split(config, "val", space).examples.map(
            lambda ex: ex["image/id"]).as_numpy_iterator()
    )  # fmt: skip
    with open(os.path.join(workdir, "eval_results.json")) as f:
        assert json.load(f)["count_objects"] == report["count_objects"]
