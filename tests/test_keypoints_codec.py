"""Keypoint codec: keypoints → tokens → keypoints, flips, down to COCO keypoint AP."""

import contextlib
import io

import numpy as np
import pytest
import tensorflow as tf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from unified_seq import defaults, frame, vocab
from unified_seq.data import transforms
from unified_seq.tasks import keypoints as kp

INPUT_SIZE = 640
K = 17
SPACE = vocab.TokenSpace()
# COCO order: nose, then (left, right) pairs.
COCO_FLIP = [0] + [i + d for i in range(1, K, 2) for d in (1, 0)]


def _cfg(**overrides):
    cfg = defaults.task_configs().keypoint_detection
    cfg.update(overrides)
    return cfg


def _crop_region(box, image_hw, crop_scale=2.0):
    """(y0, x0, h, w) of the crop around a pixel box, as the keypoint pipeline takes it."""
    centre = (box[:2] + box[2:]) / 2
    half = (box[2:] - box[:2]) * crop_scale / 2
    lo = np.clip(np.round(centre - half), 0, np.array(image_hw) - 1)
    hi = np.clip(np.round(centre + half), lo + 1, image_hw)
    return (*lo, *(hi - lo))


def _encode(box_px, keypoints_px, region, cfg, seed=(1, 2), training=False):
    """Encodes a person given in pixels, seen through the evaluation frame of `region`."""
    f = frame.eval_frame(region, INPUT_SIZE)
    points = frame.to_normalised(keypoints_px[:, :2], f)
    keypoints = np.concatenate([points, keypoints_px[:, 2:]], -1).astype(np.float32)
    box = frame.boxes_to_normalised(box_px, f)
    seq = kp.encode(
        tf.constant(box), tf.constant(1), tf.constant(keypoints), tf.constant(seed, tf.int32),
        cfg, SPACE, training=training,
    )  # fmt: skip
    return {k: v.numpy() for k, v in seq.items()}, f


def _answer(seq):
    return seq["target_seq"][5:]


def _logits_from(tokens, peak=20.0):
    """float32[T, V] raw logits that put almost all mass on `tokens`."""
    logits = np.zeros([len(tokens), SPACE.vocab_size], np.float32)
    logits[np.arange(len(tokens)), tokens] = peak
    return logits


def _random_person(rng, image_hw):
    """A pixel box (ymin, xmin, ymax, xmax) and float32[K, 3] keypoints inside it."""
    size = rng.uniform(60, min(image_hw) / 2, 2)
    lo = rng.uniform(0, np.array(image_hw) - size)
    box = np.concatenate([lo, lo + size]).astype(np.float32)
    yx = rng.uniform(lo, lo + size, [K, 2])
    v = rng.choice([0, 1, 2], K, p=[0.2, 0.3, 0.5])
    yx[v == 0] = 0.0
    return box, np.concatenate([yx, v[:, None]], -1).astype(np.float32)


def test_round_trip_keeps_points_within_a_bin_and_visibility():
    rng = np.random.default_rng(0)
    cfg = _cfg()
    for _ in range(10):
        image_hw = tuple(int(v) for v in rng.integers(300, 900, 2))
        box, keypoints = _random_person(rng, image_hw)
        region = _crop_region(box, image_hw)
        seq, f = _encode(box, keypoints, region, cfg)
        answer = _answer(seq)
        labelled = keypoints[:, 2] > 0
        tokens = answer[: 2 * K].reshape(K, 2)
        assert np.all(SPACE.is_coord(tokens[labelled]))
        assert np.all(tokens[~labelled] == vocab.INVISIBLE)
        logits = _logits_from(answer)
        # The model's coordinate guess at invisible positions: bin 123.
        logits[: 2 * K][(answer[: 2 * K] == vocab.INVISIBLE), SPACE.coord_shift + 123] = 5.0
        pred = kp.decode(answer, logits, f, SPACE, cfg)
        points = pred["keypoints"]
        assert points.shape == (K, 3) and points.dtype == np.float32
        bin_px = f[:2] / (SPACE.bins - 1)
        assert np.all(np.abs(points[labelled, :2] - keypoints[labelled, :2]) <= bin_px)
        np.testing.assert_array_equal(points[labelled, 2], kp.PREDICTED)
        np.testing.assert_array_equal(points[~labelled, 2], kp.GUESSED)
        guess = frame.to_pixels(np.full(2, 123 / (SPACE.bins - 1)), f)
        np.testing.assert_allclose(points[~labelled, :2], np.tile(guess, (np.sum(~labelled), 1)))
        assert 0.95 < pred["score"] <= 1.0
        # Visibility: confident where coordinates were written, not where 41 was.
        assert np.all(pred["visible"][labelled] > 0.99)
        assert np.all(pred["visible"][~labelled] < 0.01)
        bare = kp.decode(answer, None, f, SPACE, cfg)
        np.testing.assert_array_equal(bare["visible"], labelled.astype(np.float32))


def test_visibility_score_is_one_minus_the_invisible_probability():
    cfg = None  # decode reads nothing of it
    c = SPACE.coord_shift
    answer = np.array([c + 3, c + 4] * 16 + [vocab.INVISIBLE] * 2 + [0])
    logits = np.zeros([len(answer), SPACE.vocab_size], np.float32)
    logits[0, [c + 3, vocab.INVISIBLE]] = np.log(1000.0)  # 1000 : 1000 : 1 elsewhere
    pred = kp.decode(answer, logits, np.array([10, 10, 0, 0], np.float32), SPACE, cfg)
    others = SPACE.vocab_size - 2
    assert pred["visible"][0] == pytest.approx(1 - 1000 / (2000 + others), rel=1e-5)
    # Uniform logits elsewhere: P(invisible) = 1 / V.
    np.testing.assert_allclose(pred["visible"][1:], 1 - 1 / SPACE.vocab_size, rtol=1e-5)
    early = kp.decode(np.array([c, c, 0]), None, np.array([10, 10, 0, 0], np.float32), SPACE, cfg)
    np.testing.assert_array_equal(early["visible"], [1.0] + [0.0] * 16)


def test_points_outside_the_canvas_become_invisible():
    keypoints = np.full([K, 3], 0.5, np.float32)
    keypoints[:, 2] = 2
    keypoints[1, 0] = -0.01
    keypoints[2, 1] = 1.2
    keypoints[3] = [np.nan, 0.5, 2]
    keypoints[4, 2] = 0
    keypoints[5, :2] = [0.0, 1.0]  # on the edge: still inside
    seq = kp.encode(
        tf.constant([0.2, 0.2, 0.8, 0.8]), tf.constant(1), tf.constant(keypoints),
        tf.constant([0, 0]), _cfg(), SPACE, training=False,
    )  # fmt: skip
    tokens = seq["target_seq"].numpy()[5 : 5 + 2 * K].reshape(K, 2)
    hidden = np.isin(np.arange(K), [1, 2, 3, 4])
    assert np.all(tokens[hidden] == vocab.INVISIBLE)
    assert np.all(SPACE.is_coord(tokens[~hidden]))
    np.testing.assert_array_equal(
        tokens[5], [SPACE.coord_shift, SPACE.coord_shift + SPACE.bins - 1]
    )


def test_sequence_layout_and_weights():
    cfg = _cfg(input_mask_rate=False)
    keypoints = np.tile([[0.3, 0.6, 2.0]], [K, 1]).astype(np.float32)
    keypoints[[0, 7], 2] = 0
    box = np.array([0.1, 0.2, 0.9, 0.8], np.float32)
    seq = kp.encode(
        tf.constant(box), tf.constant(1), tf.constant(keypoints), tf.constant([0, 0]), cfg, SPACE
    )
    seq = {k: v.numpy() for k, v in seq.items()}
    length = kp.sequence_length(cfg)
    assert length == 6 + 2 * K
    for key in ("input_seq", "target_seq", "token_weights"):
        assert seq[key].shape == (length,)
    prompt = [12, *SPACE.coord_tokens(box), 101]
    np.testing.assert_array_equal(seq["input_seq"][:6], prompt)
    expected = np.zeros(length, np.float32)
    expected[5 : 5 + 2 * K] = 1.0
    expected[[5, 6, 5 + 14, 5 + 15]] = cfg.invisible_weight
    assert cfg.invisible_weight == 0.1
    # Official EOS weight 0: the answer's length is fixed.
    assert cfg.eos_weight == 0.0
    np.testing.assert_allclose(seq["token_weights"], expected)
    assert seq["target_seq"][-1] == vocab.EOS
    np.testing.assert_array_equal(seq["input_seq"][6:], seq["target_seq"][5:-1])


def test_input_masking_hits_only_answer_inputs():
    cfg = _cfg()
    assert cfg.input_mask_rate
    keypoints = np.tile([[0.3, 0.6, 2.0]], [K, 1]).astype(np.float32)
    box = np.array([0.1, 0.2, 0.9, 0.8], np.float32)
    clean = kp.encode(box, 1, keypoints, tf.constant([0, 0]), cfg, SPACE, training=False)
    rates = []
    for seed in range(40):
        seq = kp.encode(box, 1, keypoints, tf.constant([seed, 7]), cfg, SPACE, training=True)
        np.testing.assert_array_equal(seq["target_seq"], clean["target_seq"])
        np.testing.assert_array_equal(seq["token_weights"], clean["token_weights"])
        inputs, original = seq["input_seq"].numpy(), clean["input_seq"].numpy()
        np.testing.assert_array_equal(inputs[:6], original[:6])
        changed = inputs != original
        assert np.all(inputs[changed] == vocab.INVISIBLE)
        rates.append(changed[6:].mean())
    # The masking rate is itself random per example, U(0, 1).
    assert min(rates) < 0.2 and max(rates) > 0.8
    off = kp.encode(box, 1, keypoints, tf.constant([3, 7]), _cfg(input_mask_rate=False), SPACE)
    np.testing.assert_array_equal(off["input_seq"], clean["input_seq"])


def test_encoding_is_deterministic_and_dataset_map_matches_eager():
    rng = np.random.default_rng(1)
    cfg = _cfg()
    boxes = rng.uniform(0, 1, [5, 4]).astype(np.float32)
    keypoints = np.concatenate(
        [rng.uniform(-0.1, 1.1, [5, K, 2]), rng.integers(0, 3, [5, K, 1])], -1
    ).astype(np.float32)
    seeds = rng.integers(0, 1000, [5, 2]).astype(np.int64)
    classes = np.ones(5, np.int32)
    ds = tf.data.Dataset.from_tensor_slices((boxes, classes, keypoints, seeds))
    ds = ds.map(lambda b, c, k, s: kp.encode(b, c, k, s, cfg, SPACE, training=True))
    for i, mapped in enumerate(ds.as_numpy_iterator()):
        eager = kp.encode(boxes[i], classes[i], keypoints[i], seeds[i], cfg, SPACE, training=True)
        again = kp.encode(boxes[i], classes[i], keypoints[i], seeds[i], cfg, SPACE, training=True)
        for key, value in eager.items():
            np.testing.assert_array_equal(mapped[key], value.numpy(), err_msg=key)
            np.testing.assert_array_equal(again[key].numpy(), value.numpy(), err_msg=key)


def test_decode_fallbacks_without_logits():
    f = np.array([200, 100, 10, 20], np.float32)
    coord = SPACE.coord_tokens(np.float32(0.5))
    tokens = np.array([coord, coord] * 15 + [vocab.INVISIBLE, coord] + [vocab.EOS] * 3)
    box = np.array([0.2, 0.4, 0.6, 0.8], np.float32)
    with_box = kp.decode(tokens, None, f, SPACE, _cfg(), box=box)
    points = with_box["keypoints"]
    assert with_box["score"] == 1.0
    np.testing.assert_array_equal(points[:15, 2], kp.PREDICTED)
    # Point 15 keeps its written x and takes y from the box centre; point 16
    # (cut by EOS) sits at the box centre.
    np.testing.assert_allclose(points[15], [0.4 * 200 + 10, 0.5 * 100 + 20, kp.GUESSED], atol=0.1)
    np.testing.assert_allclose(points[16], [0.4 * 200 + 10, 0.6 * 100 + 20, kp.GUESSED], atol=1e-4)
    bare = kp.decode(tokens, None, f, SPACE, _cfg())
    np.testing.assert_array_equal(bare["keypoints"][15:, 2], kp.MISSING)
    np.testing.assert_allclose(bare["keypoints"][:15], points[:15])


def test_decode_score_is_the_mean_token_probability():
    tokens = np.array(list(SPACE.coord_tokens(np.linspace(0, 1, 2 * K))) + [vocab.EOS])
    logits = np.zeros([len(tokens), SPACE.vocab_size], np.float32)
    # Two equally likely tokens at every position: probability 1/2 each.
    logits[np.arange(len(tokens)), tokens] = 50.0
    logits[:, 5] = 50.0
    pred = kp.decode(tokens, logits, np.array([1, 1, 0, 0], np.float32), SPACE, _cfg())
    assert abs(pred["score"] - 0.5) < 1e-6
    early = kp.decode(tokens[-1:], logits[-1:], np.array([1, 1, 0, 0], np.float32), SPACE, _cfg())
    assert early["score"] == 0.0


def _flip(keypoints):
    # The pipeline's flip: one implementation for images and annotations.
    image = tf.zeros([4, 4, 3])
    return transforms.horizontal_flip({"image": image, "keypoints": keypoints}, COCO_FLIP)[
        "keypoints"
    ]


def test_flip_swaps_left_and_right_and_mirrors_x():
    rng = np.random.default_rng(2)
    keypoints = np.concatenate([rng.uniform(0, 1, [K, 2]), rng.integers(0, 3, [K, 1])], -1)
    keypoints = tf.constant(keypoints, tf.float32)
    flipped = _flip(keypoints).numpy()
    original = keypoints.numpy()
    # Nose stays; left_eye (1) ↔ right_eye (2), …, left_ankle (15) ↔ right_ankle (16).
    for new, old in [(0, 0), (1, 2), (2, 1), (5, 6), (6, 5), (15, 16), (16, 15)]:
        np.testing.assert_allclose(
            flipped[new], [original[old, 0], 1 - original[old, 1], original[old, 2]]
        )
    np.testing.assert_allclose(_flip(tf.constant(flipped)), original, atol=1e-6)
    batched = _flip(tf.stack([keypoints, keypoints])).numpy()
    np.testing.assert_allclose(batched[1], flipped)
    ds = tf.data.Dataset.from_tensors(keypoints).map(_flip)
    np.testing.assert_allclose(next(ds.as_numpy_iterator()), flipped)


def test_coco_result_format():
    pred = {
        "keypoints": np.array([[10.0, 20.0, 2.0], [30.0, 40.0, 1.0]], np.float32),
        "score": np.float64(0.75),
    }
    result = kp.to_coco_results(pred, np.int64(5), 1)
    assert result == {
        "image_id": 5, "category_id": 1, "keypoints": [20.0, 10.0, 2.0, 40.0, 30.0, 1.0],
        "score": 0.75,
    }  # fmt: skip
    pred["visible"] = np.array([0.98766, 0.25], np.float32)
    assert kp.to_coco_results(pred, 5, 1)["visibility_scores"] == [0.9877, 0.25]


def _keypoint_fixture(rng, num_images=8):
    """COCO person keypoints: random images with 1-3 persons, some points unlabelled."""
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        h, w = (int(v) for v in rng.integers(300, 700, 2))
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.jpg"})
        for _ in range(int(rng.integers(1, 4))):
            box, keypoints = _random_person(rng, (h, w))
            xyv = keypoints[:, [1, 0, 2]]
            size = box[2:] - box[:2]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                "bbox": [float(box[1]), float(box[0]), float(size[1]), float(size[0])],
                "area": float(size.prod() * 0.6), "iscrowd": 0,
                "keypoints": xyv.reshape(-1).tolist(),
                "num_keypoints": int(np.sum(keypoints[:, 2] > 0)),
                "box_yxyx": box, "keypoints_yxv": keypoints, "image_hw": (h, w),
            })  # fmt: skip
    categories = [{"id": 1, "name": "person", "keypoints": [str(i) for i in range(K)]}]
    return {"images": images, "annotations": annotations, "categories": categories}


def test_ground_truth_tokens_reach_keypoint_ap():
    rng = np.random.default_rng(3)
    dataset = _keypoint_fixture(rng)
    cfg = _cfg()
    results = []
    for ann in dataset["annotations"]:
        box, keypoints, image_hw = (
            ann.pop("box_yxyx"),
            ann.pop("keypoints_yxv"),
            ann.pop("image_hw"),
        )
        seq, f = _encode(box, keypoints, _crop_region(box, image_hw), cfg)
        answer = _answer(seq)
        pred = kp.decode(answer, _logits_from(answer), f, SPACE, cfg)
        results.append(kp.to_coco_results(pred, ann["image_id"], 1))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] >= 0.95
