"""Every task's evaluation path, end to end, with the ground truth fed back as samples.

An oracle stands in for the model: for each evaluation example it encodes
the matching ground-truth annotation with the task's own codec, in that
example's canvas, and returns the tokens as if they had been sampled. They
then go through the same `evaluate.evaluate_tasks` as a trained model's
answers (task results, COCO result files, pycocotools / caption metrics):
near-perfect scores prove the eval path loses nothing on the way. With
`eval.prompt_boxes=detections`, segmentation and keypoints are prompted by
the oracle's detections, matched back to the ground truth by IoU.
"""

import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from tests import coco_fixture
from unified_seq import defaults, evaluate, frame, vocab
from unified_seq.data import coco, inputs, synthetic
from unified_seq.tasks import build_tasks, captioning, detection, instance_segmentation, keypoints

SIZE = 256


def _config(coco_dir: str, prompt_boxes: str = "gt") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # The official layout: 1000 bins keep quantisation far below a pixel.
    config.vocab = defaults.vocab_config()
    config.vocab.text_vocab_size = 256
    config.data = defaults.data_config()
    config.data.update(source="coco_json", coco_dir=coco_dir, image_size=SIZE)
    config.tasks = defaults.task_configs()
    config.tasks.object_detection.max_instances = 12
    config.tasks.instance_segmentation.update(crop_to_box=True, crop_scale=1.5)
    config.tasks.captioning.update(max_len=24, captions_per_image=1)
    config.eval = defaults.eval_config()
    config.eval.update(batch_size=4, prompt_boxes=prompt_boxes)
    return config


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a float[4] with boxes b float[M, 4] (ymin, xmin, ymax, xmax)."""
    lo = np.maximum(a[:2], b[:, :2])
    hi = np.minimum(a[2:], b[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = lambda x: np.prod(x[..., 2:] - x[..., :2], axis=-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


class Oracle:
    """A `SampleFn` answering every prompt with its ground truth, tokenized by the task's codec."""

    def __init__(self, coco_dir: str, data: inputs.SplitData, space: vocab.TokenSpace):
        examples, _, _ = coco.load_coco_json(coco_dir, "val", space)
        self.images = {int(ex["image/id"]): ex for ex in examples}
        self.tokenizer = data.tokenizer
        self.space = space
        self.matched_detections = 0

    def _instance(self, batch: dict, i: int) -> tuple[dict, int]:
        """The image's annotations and the index of the one example i prompts."""
        ex = self.images[int(batch["image/id"][i])]
        object_id = int(batch["object/id"][i])
        if object_id:
            return ex, int(np.flatnonzero(ex["objects/id"] == object_id)[0])
        # Prompted by a detection: the ground-truth object it overlaps most.
        self.matched_detections += 1
        return ex, int(np.argmax(_iou(batch["box"][i], ex["objects/bbox"])))

    def __call__(self, task, batch, rng):
        del rng
        space, cfg = self.space, task.cfg
        seed = tf.constant([1, 2], tf.int64)
        rows = []
        for i in range(len(batch["image"])):
            f = batch["frame"][i]
            if isinstance(task, detection.ObjectDetection):
                ex = self.images[int(batch["image/id"][i])]
                keep = ~ex["objects/is_crowd"]
                boxes = frame.boxes_to_normalised(ex["objects/bbox"][keep], f)
                seq = detection.encode(
                    boxes, ex["objects/class"][keep], seed, cfg, space, training=False
                )
                rows.append(seq["target_seq"].numpy())
            elif isinstance(task, captioning.Captioning):
                ex = self.images[int(batch["image/id"][i])]
                ids = tf.ragged.constant([self.tokenizer.encode(ex["captions"][0])], tf.int32)
                seq = captioning.encode(ids, seed, cfg, space, training=False)
                rows.append(seq["target_seq"].numpy()[0])
            else:
                ex, k = self._instance(batch, i)
                box, cls = batch["prompt_box"][i], ex["objects/class"][k]
                if isinstance(task, instance_segmentation.InstanceSegmentation):
                    points = frame.to_normalised(ex["objects/polygons"][k], f)
                    seq = instance_segmentation.encode(
                        box, cls, points, seed, cfg, space, training=False
                    )
                else:
                    kp = ex["objects/keypoints"][k]
                    kp = np.concatenate([frame.to_normalised(kp[:, :2], f), kp[:, 2:]], axis=-1)
                    seq = keypoints.encode(box, cls, kp, seed, cfg, space, training=False)
                rows.append(seq["target_seq"].numpy()[task.prompt_length - 1 :])
        tokens = np.stack(rows).astype(np.int32)
        options = task.sampler_options()
        assert tokens.shape[1] == options.max_len
        out = {"tokens": np.repeat(tokens, options.num_samples, axis=0)}
        if options.logits_range is not None:
            lo, hi = options.logits_range
            out["range_probs"] = (np.arange(lo, hi) == tokens[..., None]).astype(np.float32)
        if options.return_logits:
            logits = np.full([*tokens.shape, space.vocab_size], -10.0, np.float32)
            np.put_along_axis(logits, tokens[..., None], 10.0, axis=-1)
            out["logits"] = logits
        return out


def _awkward(root: str) -> str:
    for split in ("train", "val"):
        coco_fixture.write_fixture(root, split)
    return root


def _shapes(root: str) -> str:
    return synthetic.generate(root, seed=3, num_train=8, num_val=12, image_size=96)


@pytest.fixture(scope="module", params=["awkward", "synthetic"])
def data_set(request, tmp_path_factory):
    root = str(tmp_path_factory.mktemp(request.param))
    return (_awkward if request.param == "awkward" else _shapes)(root)


@pytest.mark.parametrize("prompt_boxes", ["gt", "detections"])
def test_ground_truth_fed_back_scores_near_perfect(data_set, prompt_boxes, tmp_path):
    config = _config(data_set, prompt_boxes)
    tasks = build_tasks(config)
    space = vocab.TokenSpace.from_config(config.vocab)
    data = inputs.load_split(config, "val", space, workdir=str(tmp_path))
    oracle = Oracle(data_set, data, space)
    report = evaluate.evaluate_tasks(tasks, data, config, oracle, 0, workdir=str(tmp_path))
    assert report["object_detection"]["AP"] >= 0.9, report
    assert report["instance_segmentation"]["AP"] >= 0.9, report
    assert report["keypoint_detection"]["AP"] >= 0.9, report
    assert report["captioning"]["BLEU-4"] >= 0.9, report
    # Detections really were the prompts.
    assert (oracle.matched_detections > 0) == (prompt_boxes == "detections")
    for name in tasks:
        with open(os.path.join(tmp_path, f"{name}_results.json")) as f:
            assert json.load(f), name


def test_detection_prompts_keep_the_top_scored_per_image(data_set):
    config = _config(data_set, "detections")
    config.tasks.instance_segmentation.detections_per_image = 2
    space = vocab.TokenSpace.from_config(config.vocab)
    data = inputs.load_split(config, "val", space)
    first = int(next(data.examples.as_numpy_iterator())["image/id"])
    boxes = np.array([[2, 2, 20, 20], [4, 4, 30, 24], [1, 3, 12, 40]], np.float32)
    detections = {
        first: {"boxes": boxes, "classes": np.array([1, 4, 1]), "scores": [0.2, 0.9, 0.5]}
    }
    for name, expected in (("instance_segmentation", [1, 2]), ("keypoint_detection", [2, 0])):
        task = build_tasks(config)[name]
        (batch,) = list(evaluate.eval_batches(task, data, config, detections))
        # Segmentation: the two best of any class; keypoints: persons only, by score.
        np.testing.assert_allclose(batch["box"], boxes[expected])
        np.testing.assert_allclose(batch["score"], np.array([0.2, 0.9, 0.5])[expected])


@pytest.mark.parametrize("weight", [1.0, 0.25, 0.0])
def test_keypoint_scores_weigh_points_against_the_prompt_box(data_set, weight):
    config = _config(data_set, "detections")
    config.tasks.keypoint_detection.points_score_weight = weight
    space = vocab.TokenSpace.from_config(config.vocab)
    data = inputs.load_split(config, "val", space)
    first = int(next(data.examples.as_numpy_iterator())["image/id"])
    boxes = np.array([[2, 2, 20, 20], [1, 3, 12, 40]], np.float32)
    detections = {first: {"boxes": boxes, "classes": np.array([1, 1]), "scores": [0.2, 0.6]}}
    task = build_tasks(config)["keypoint_detection"]
    (batch,) = list(evaluate.eval_batches(task, data, config, detections))
    # Answers of coordinate tokens the model was sure of: point score 1.
    tokens = np.full([2, task.sampler_options().max_len], space.coord_shift + 5, np.int32)
    logits = np.where(np.arange(space.vocab_size) == space.coord_shift + 5, 30.0, 0.0)
    samples = {"tokens": tokens, "logits": np.broadcast_to(logits, [*tokens.shape, len(logits)])}
    scores = [r["score"] for r in task.results(batch, samples, data)]
    np.testing.assert_allclose(scores, weight + (1 - weight) * np.array([0.6, 0.2]), atol=1e-6)
