"""Detection codec: boxes → tokens → boxes, sequence augmentation, scoring, COCO AP."""

import contextlib
import io

import numpy as np
import pytest
import tensorflow as tf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from unified_seq import defaults, frame, vocab
from unified_seq.tasks import detection

INPUT_SIZE = 640
SPACE = vocab.TokenSpace()
SMALL_SPACE = vocab.TokenSpace(coord_shift=200, bins=128, text_shift=328, text_vocab_size=100)


def _cfg(**overrides):
    cfg = defaults.task_configs().object_detection
    cfg.update(overrides)
    return cfg


def _encode(boxes, classes, cfg, space=SPACE, seed=(1, 2), training=True, **kwargs):
    seq = detection.encode(
        tf.constant(np.asarray(boxes, np.float32).reshape(-1, 4)),
        tf.constant(np.asarray(classes, np.int32)),
        tf.constant(seed, tf.int32),
        cfg,
        space,
        training=training,
        **kwargs,
    )
    return {k: v.numpy() for k, v in seq.items()}


def _objects(seq, field="target_seq"):
    """int[M, 5] quintuples of a sequence's answer (targets, or the inputs after the prompt)."""
    tokens = seq[field] if field == "target_seq" else seq[field][1:]
    m = len(tokens) // 5
    return tokens[: m * 5].reshape(m, 5)


def _random_boxes_px(rng, n, height, width, min_size=2.0):
    """float32[n, 4] pixel boxes inside an H x W image."""
    y0 = rng.uniform(0, height - min_size, n)
    x0 = rng.uniform(0, width - min_size, n)
    y1 = rng.uniform(y0 + min_size, height)
    x1 = rng.uniform(x0 + min_size, width)
    return np.stack([y0, x0, y1, x1], -1).astype(np.float32)


def _iou(a, b):
    """IoU between boxes float[N, 4] and float[M, 4] → float[N, M]."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), -1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], -1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


@pytest.mark.parametrize("space", [SPACE, SMALL_SPACE], ids=["bins1000", "bins128"])
def test_round_trip_within_one_bin(space):
    rng = np.random.default_rng(0)
    cfg = _cfg(max_instances=30)
    for trial in range(10):
        height, width = rng.integers(50, 1500, 2)
        n = int(rng.integers(1, 31))
        boxes_px = _random_boxes_px(rng, n, height, width)
        # Distinct classes tell which decoded object is which.
        classes = rng.permutation(space.max_class_id)[:n] + 1
        f = frame.eval_frame((0, 0, height, width), INPUT_SIZE)
        seq = _encode(
            frame.boxes_to_normalised(boxes_px, f), classes, cfg, space, (trial, 3), False
        )
        pred = detection.decode(seq["target_seq"], None, f, space, cfg)
        assert sorted(pred["classes"].tolist()) == sorted(classes.tolist())
        order = np.argsort(pred["classes"])
        truth = np.argsort(classes)
        err = np.abs(pred["boxes"][order] - boxes_px[truth])
        # Quantisation moves a corner by at most half a bin; one bin is the contract.
        bin_px = space.bin_size() * np.tile(f[:2], 2)
        assert np.all(err <= 0.5 * bin_px + 1e-3), (err / bin_px).max()
        assert np.all(err <= bin_px)
        np.testing.assert_array_equal(pred["scores"], 1.0)


def test_eval_encoding_layout():
    cfg = _cfg(max_instances=4)
    boxes = np.array([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8]], np.float32)
    seq = _encode(boxes, [5, 7], cfg, training=False)
    assert detection.sequence_length(cfg) == 21
    assert all(v.shape == (21,) for k, v in seq.items() if k != "num_truncated")
    assert seq["input_seq"][0] == 10
    assert detection.ObjectDetection.prompt_token == 10
    objs = _objects(seq)
    assert set(objs[:2, 4].tolist()) == {105, 107}
    np.testing.assert_array_equal(seq["token_weights"][:10], 1.0)
    assert seq["target_seq"][10] == vocab.EOS
    assert seq["token_weights"][10] == pytest.approx(0.1)
    np.testing.assert_array_equal(seq["token_weights"][11:], 0.0)
    # Teacher forcing: the input is the target shifted by one, uncorrupted.
    np.testing.assert_array_equal(seq["input_seq"][1:], seq["target_seq"][:-1])
    assert seq["num_truncated"] == 0


def test_training_sequence_augmentation():
    cfg = _cfg(max_instances=10)
    boxes = np.array([[0.1, 0.1, 0.3, 0.4], [0.5, 0.5, 0.9, 0.7], [0.2, 0.6, 0.4, 0.9]])
    classes = np.array([3, 17, 60])
    seq = _encode(boxes, classes, cfg, seed=(4, 5))
    length = detection.sequence_length(cfg)
    assert length == 51 and seq["target_seq"].shape == (length,)
    targets, weights = _objects(seq), seq["token_weights"][:50].reshape(10, 5)
    inputs = _objects(seq, "input_seq")

    # Real objects first, in some order, fully trained.
    assert sorted(targets[:3, 4].tolist()) == [103, 117, 160]
    expected = {c + 100: SPACE.coord_tokens(b) for b, c in zip(boxes, classes, strict=True)}
    for obj in targets[:3]:
        np.testing.assert_array_equal(obj[:4], expected[obj[4]])
    np.testing.assert_array_equal(weights[:3], 1.0)
    # Noise objects: fake class trained, coordinates not; coordinates are real coordinates.
    np.testing.assert_array_equal(targets[3:, 4], vocab.FAKE_CLASS)
    np.testing.assert_array_equal(weights[3:, :4], 0.0)
    np.testing.assert_array_equal(weights[3:, 4], 1.0)
    assert np.all(SPACE.is_coord(targets[:, :4]))
    noise = SPACE.token_coords(targets[3:, :4])
    assert np.all(noise[:, 2:] >= noise[:, :2])
    # The list is full, so EOS comes last, at eos_weight.
    assert seq["target_seq"][50] == vocab.EOS
    assert seq["token_weights"][50] == pytest.approx(cfg.eos_weight)
    # Inputs: coordinates as the targets, every class token corrupted.
    assert seq["input_seq"][0] == 10
    np.testing.assert_array_equal(inputs[:, :4], targets[:, :4])
    cls_in = inputs[:, 4]
    assert np.all((cls_in == vocab.FAKE_CLASS) | SPACE.is_class(cls_in))


def test_class_corruption_rates():
    cfg = _cfg(max_instances=20)
    boxes = _random_boxes_px(np.random.default_rng(1), 8, 1.0, 1.0, 0.05)
    fake, random_class, kept_true = 0, [], 0
    for s in range(20):
        seq = _encode(boxes, np.full(8, 42), cfg, seed=(s, 0))
        cls_in, cls_target = _objects(seq, "input_seq")[:, 4], _objects(seq)[:, 4]
        fake += np.sum(cls_in == vocab.FAKE_CLASS)
        random_class += cls_in[cls_in != vocab.FAKE_CLASS].tolist()
        kept_true += np.sum(cls_target[:8] == 142)
    draws = 20 * 20
    assert 0.4 < fake / draws < 0.6
    # The rest are uniform over the whole class range [100, coord_shift).
    assert np.all(SPACE.is_class(np.array(random_class)))
    assert np.mean(random_class) == pytest.approx((100 + SPACE.coord_shift - 1) / 2, rel=0.1)
    assert kept_true == 20 * 8
    off = _encode(boxes, np.full(8, 42), _cfg(max_instances=20, class_corruption="none"))
    np.testing.assert_array_equal(off["input_seq"][1:], off["target_seq"][:-1])
    with pytest.raises(ValueError, match="class_corruption"):
        _encode(boxes, np.full(8, 42), _cfg(class_corruption="rand_cls"))


def test_noise_boxes_follow_official_mix():
    """One small real box: ~half the noise duplicates it, the rest half shifted, half random."""
    cfg = _cfg(max_instances=100, class_corruption="none")
    real = np.array([[0.4, 0.45, 0.5, 0.6]], np.float32)
    dup_share, shifted_share = [], []
    for s in range(20):
        seq = _encode(real, [1], cfg, seed=(s, 9))
        noise = SPACE.token_coords(_objects(seq)[1:, :4])
        assert noise.shape == (99, 4)
        duplicate = _iou(noise, real)[:, 0] > 0.5
        size = noise[:, 2:] - noise[:, :2]
        same_size = np.all(np.abs(size - (real[0, 2:] - real[0, :2])) < 2.5 / 999, axis=1)
        dup_share.append(duplicate.mean())
        bad = ~duplicate
        if bad.sum() >= 10:
            shifted_share.append((same_size & bad).sum() / bad.sum())
    # Duplicate count is uniform in [0, 99] per image: mean share 0.5.
    assert 0.3 < np.mean(dup_share) < 0.7
    # Shifted copies keep the size unless clipped at the border (~10% here).
    assert 0.3 < np.mean(shifted_share) < 0.6


def test_noise_stays_inside_image_extent():
    cfg = _cfg(max_instances=50)
    real = np.array([[0.1, 0.1, 0.3, 0.5]], np.float32)
    seq = _encode(real, [1], cfg, extent=tf.constant([0.4, 1.0]))
    coords = SPACE.token_coords(_objects(seq)[:, :4])
    assert coords[:, [0, 2]].max() <= 0.4 + SPACE.bin_size()
    assert coords[:, [1, 3]].max() > 0.5


def test_truncation_and_empty_image():
    cfg = _cfg(max_instances=10)
    rng = np.random.default_rng(2)
    boxes = _random_boxes_px(rng, 15, 1.0, 1.0, 0.01)
    seq = _encode(boxes, np.arange(15) + 1, cfg)
    assert seq["num_truncated"] == 5
    targets = _objects(seq)
    assert len(set(targets[:, 4].tolist())) == 10 and np.all(SPACE.is_class(targets[:, 4]))
    np.testing.assert_array_equal(seq["token_weights"][:50], 1.0)

    empty = _encode(np.zeros([0, 4]), np.zeros([0]), cfg)
    assert empty["num_truncated"] == 0
    targets = _objects(empty)
    np.testing.assert_array_equal(targets[:, 4], vocab.FAKE_CLASS)
    assert np.all(SPACE.is_coord(targets[:, :4]))
    np.testing.assert_array_equal(empty["token_weights"][:50].reshape(10, 5)[:, :4], 0.0)
    no_noise = _encode(np.zeros([0, 4]), np.zeros([0]), cfg, training=False)
    assert no_noise["target_seq"][0] == vocab.EOS and no_noise["token_weights"].sum() == 0.1


def test_deterministic_and_same_in_tf_data():
    cfg = _cfg(max_instances=12)
    boxes = _random_boxes_px(np.random.default_rng(3), 5, 1.0, 1.0, 0.02)
    classes = np.array([1, 2, 3, 4, 5], np.int32)
    a = _encode(boxes, classes, cfg, seed=(7, 8))
    b = _encode(boxes, classes, cfg, seed=(7, 8))
    c = _encode(boxes, classes, cfg, seed=(7, 9))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["input_seq"], c["input_seq"])

    ds = tf.data.Dataset.from_tensors((boxes.astype(np.float32), classes)).map(
        lambda bx, cl: detection.encode(bx, cl, tf.constant([7, 8], tf.int64), cfg, SPACE)
    )
    (mapped,) = list(ds.as_numpy_iterator())
    for k in a:
        np.testing.assert_array_equal(mapped[k], a[k])


def _peaked_logits(tokens, peak=30.0, vocab_size=SPACE.vocab_size):
    logits = np.zeros([len(tokens), vocab_size], np.float32)
    logits[np.arange(len(tokens)), tokens] = peak
    return logits


def _distribution_logits(probs: dict, vocab_size=SPACE.vocab_size):
    """float32[V] logits whose softmax is exactly `probs` (token → probability)."""
    logits = np.full([vocab_size], -1e4, np.float32)
    for token, p in probs.items():
        logits[token] = np.log(p)
    return logits


CANVAS = np.array([INPUT_SIZE, INPUT_SIZE, 0, 0], np.float32)


def _coords(*c):
    return list(SPACE.coord_tokens(np.array(c)))


def test_decode_scores_are_class_range_probabilities():
    obj1 = _coords(0.1, 0.2, 0.3, 0.4) + [105]
    obj2 = _coords(0.5, 0.5, 0.6, 0.6) + [vocab.FAKE_CLASS]
    obj3 = _coords(0.7, 0.9, 0.2, 0.1) + [107]  # Corners swapped: reordered on decode.
    tail = _coords(0.1, 0.1, 0.2, 0.2) + [108]
    tokens = np.array(obj1 + obj2 + obj3 + [vocab.EOS] + tail)
    logits = _peaked_logits(tokens)
    logits[4] = _distribution_logits({105: 0.6, vocab.FAKE_CLASS: 0.3, 1500: 0.1})
    logits[9] = _distribution_logits({vocab.FAKE_CLASS: 0.7, 120: 0.2, 3000: 0.1})
    logits[14] = _distribution_logits({110: 0.5, 107: 0.2, vocab.FAKE_CLASS: 0.3})

    pred = detection.decode(tokens, logits, CANVAS, SPACE, _cfg())
    np.testing.assert_array_equal(pred["classes"], [5, 10])
    # Not renormalised over the class range: fake mass lowers the score.
    np.testing.assert_allclose(pred["scores"], [0.6, 0.5], rtol=1e-5)
    expected = np.array([[0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.7, 0.9]]) * INPUT_SIZE
    np.testing.assert_allclose(pred["boxes"], expected, atol=INPUT_SIZE / 999)

    kept = detection.decode(tokens, logits, CANVAS, SPACE, _cfg(drop_fake=False))
    np.testing.assert_array_equal(kept["classes"], [5, 20, 10])
    np.testing.assert_allclose(kept["scores"], [0.6, 0.2, 0.5], rtol=1e-5)

    # Class-range probabilities computed on device give the same result.
    probs = detection.class_range_probs(logits, SPACE)
    assert probs.shape == (len(tokens), SPACE.coord_shift - 100)
    on_device = detection.decode(tokens, probs, CANVAS, SPACE, _cfg())
    for k in pred:
        np.testing.assert_allclose(on_device[k], pred[k], rtol=1e-6)

    # Without logits: classes from the sampled tokens, scores 1.
    plain = detection.decode(tokens, None, CANVAS, SPACE, _cfg())
    np.testing.assert_array_equal(plain["classes"], [5, 7])
    np.testing.assert_array_equal(plain["scores"], [1.0, 1.0])


def test_decode_stops_at_malformed_object_and_partial_tail():
    good = _coords(0.1, 0.2, 0.3, 0.4) + [105]
    malformed = _coords(0.1, 0.2) + [vocab.FAKE_CLASS] + _coords(0.4) + [106]
    later = _coords(0.5, 0.5, 0.6, 0.6) + [107]
    pred = detection.decode(np.array(good + malformed + later), None, CANVAS, SPACE, _cfg())
    np.testing.assert_array_equal(pred["classes"], [5])
    # A truncated last object (no EOS, length not a multiple of 5) is ignored.
    pred = detection.decode(np.array(good + later[:3]), None, CANVAS, SPACE, _cfg())
    np.testing.assert_array_equal(pred["classes"], [5])
    # A non-class token at a class position without logits: the object is skipped.
    odd = _coords(0.1, 0.1, 0.2, 0.2) + _coords(0.3)
    pred = detection.decode(np.array(odd + good), None, CANVAS, SPACE, _cfg())
    np.testing.assert_array_equal(pred["classes"], [5])
    empty = detection.decode(
        np.array([vocab.EOS] * 10), _peaked_logits([0] * 10), CANVAS, SPACE, _cfg()
    )
    assert empty["boxes"].shape == (0, 4) and empty["scores"].shape == (0,)


class _StubCategories:
    """Class ids 1..K ↔ non-contiguous data-set ids, as data.categories.CategoryMap."""

    def __init__(self, dataset_ids):
        self.dataset_ids = np.asarray(dataset_ids)

    def to_class(self, ids):
        return np.searchsorted(self.dataset_ids, ids) + 1

    def to_dataset_id(self, class_ids):
        class_ids = np.asarray(class_ids)
        if np.any((class_ids < 1) | (class_ids > len(self.dataset_ids))):
            raise ValueError(f"unknown class ids {class_ids}")
        return self.dataset_ids[class_ids - 1]


def test_coco_results_map_categories_and_skip_unknown():
    pred = {
        "boxes": np.array([[10, 20, 50, 80], [0, 0, 5, 5], [1, 2, 3, 4]], np.float32),
        "classes": np.array([2, 9, 1], np.int32),
        "scores": np.array([0.75, 0.5, 0.25], np.float32),
    }
    results = detection.to_coco_results(pred, 17, _StubCategories([3, 44]))
    assert results == [
        {"image_id": 17, "category_id": 44, "bbox": [20.0, 10.0, 60.0, 40.0], "score": 0.75},
        {
            "image_id": 17,
            "category_id": 3,
            "bbox": [2.0, 1.0, 2.0, 2.0],
            "score": 0.25,
        },
    ]


def _coco_fixture(rng, num_images=20):
    """A generated COCO detection ground truth with non-contiguous category ids."""
    category_ids = [3, 7, 18, 42, 90]
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        height, width = (int(v) for v in rng.integers(200, 900, 2))
        images.append({"id": image_id, "height": height, "width": width, "file_name": ""})
        for box in _random_boxes_px(rng, int(rng.integers(1, 16)), height, width, 16.0):
            y0, x0, y1, x1 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice(category_ids)),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": c, "name": f"c{c}"} for c in category_ids]
    return {"images": images, "annotations": annotations, "categories": categories}


def test_ground_truth_through_codec_reaches_full_ap():
    rng = np.random.default_rng(5)
    coco = COCO()
    coco.dataset = _coco_fixture(rng)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    categories = _StubCategories(sorted(coco.getCatIds()))
    cfg = _cfg()
    results = []
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        anns = coco.imgToAnns[image_id]
        xywh = np.array([a["bbox"] for a in anns], np.float32)
        boxes_px = np.concatenate([xywh[:, 1::-1], xywh[:, 1::-1] + xywh[:, :1:-1]], axis=1)
        classes = categories.to_class([a["category_id"] for a in anns])
        f = frame.eval_frame((0, 0, info["height"], info["width"]), INPUT_SIZE)
        normalised = frame.boxes_to_normalised(boxes_px, f)
        seq = _encode(normalised, classes, cfg, seed=(image_id, 0), training=False)
        answer = seq["target_seq"][: 5 * len(anns) + 1]
        pred = detection.decode(answer, _peaked_logits(answer), f, SPACE, cfg)
        assert len(pred["boxes"]) == len(anns)
        results += detection.to_coco_results(pred, image_id, categories)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] >= 0.95


def test_raster_order_sorts_objects_top_to_bottom_then_left_to_right():
    cfg = _cfg()
    cfg.object_order = "raster"
    cfg.noise_objects = False
    boxes = tf.constant(
        [[0.5, 0.1, 0.6, 0.2], [0.1, 0.7, 0.2, 0.8], [0.5, 0.05, 0.7, 0.1]], tf.float32
    )
    out = detection.encode(boxes, tf.constant([1, 2, 3]), tf.constant([0, 1]), cfg, SPACE)
    classes = out["target_seq"].numpy()[4:15:5]
    np.testing.assert_array_equal(classes, [102, 103, 101])
    cfg.object_order = "sideways"
    with pytest.raises(ValueError, match="object_order"):
        detection.encode(boxes, tf.constant([1, 2, 3]), tf.constant([0, 1]), cfg, SPACE)
