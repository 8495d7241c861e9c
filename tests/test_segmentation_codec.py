"""Instance-segmentation codec: polygons → tokens → masks, down to COCO segm AP."""

import contextlib
import io

import numpy as np
import pytest
import tensorflow as tf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from unified_seq import defaults, frame, vocab
from unified_seq.tasks import instance_segmentation as seg
from unified_seq.tasks import masks

INPUT_SIZE = 640
SPACE = vocab.TokenSpace()
NAN_ROW = np.full([1, 2], np.nan, np.float32)


def _cfg(**overrides):
    cfg = defaults.task_configs().instance_segmentation
    cfg.update(overrides)
    return cfg


class _Categories:
    """Stand-in for the data set's category map: class id → data-set id."""

    def __init__(self, table):
        self.table = table

    def to_dataset_id(self, class_id):
        return self.table[class_id]


def _blob(rng, centre, radius, num_points):
    """A convex-ish polygon float32[num_points, 2] (y, x) in pixels around `centre`."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, num_points))
    radii = radius * rng.uniform(0.85, 1.0, num_points)
    return np.stack([centre[0] + radii * np.sin(angles), centre[1] + radii * np.cos(angles)], -1)


def _random_image_and_blob(rng):
    h, w = (int(v) for v in rng.integers(200, 900, 2))
    radius = rng.uniform(16, min(h, w) / 3)
    centre = rng.uniform([radius, radius], [h - radius, w - radius])
    return (h, w), _blob(rng, centre, radius, int(rng.integers(5, 40)))


def _join(polygons):
    """Pixel polygons → one float32[P, 2] array with NaN separator rows."""
    rows = []
    for p in polygons:
        rows += [np.asarray(p, np.float32), NAN_ROW]
    return np.concatenate(rows[:-1], axis=0)


def _box(polygons):
    points = np.concatenate(polygons, axis=0)
    return np.concatenate([points.min(0), points.max(0)]).astype(np.float32)


def _encode(polygons, image_hw, cfg, seed=(1, 2), training=False, class_id=3):
    """Encodes pixel polygons seen through the evaluation frame of the whole image."""
    f = frame.eval_frame((0, 0, *image_hw), INPUT_SIZE)
    points = frame.to_normalised(_join(polygons), f)
    box = frame.boxes_to_normalised(_box(polygons), f)
    seq = seg.encode(
        tf.constant(box), tf.constant(class_id), tf.constant(points), tf.constant(seed, tf.int32),
        cfg, SPACE, training=training,
    )  # fmt: skip
    return {k: v.numpy() for k, v in seq.items()}, f


def _answer(seq):
    """Answer tokens after the 6-token prompt (target position 5 on)."""
    return seq["target_seq"][5:]


def _round_trip_iou(polygons, image_hw, cfg):
    seq, f = _encode(polygons, image_hw, cfg)
    mask = seg.decode(_answer(seq)[None], f, image_hw, SPACE, cfg)
    return masks.mask_iou(mask, masks.polygons_to_mask(polygons, *image_hw)), seq


def test_random_polygons_round_trip():
    rng = np.random.default_rng(0)
    cfg = _cfg()
    for _ in range(12):
        image_hw, polygon = _random_image_and_blob(rng)
        iou, seq = _round_trip_iou([polygon], image_hw, cfg)
        assert iou >= 0.9
        assert seq["num_truncated_points"] == 0


def test_two_part_instance_round_trip():
    rng = np.random.default_rng(1)
    image_hw = (480, 640)
    parts = [_blob(rng, (120, 150), 60, 12), _blob(rng, (330, 470), 90, 20)]
    iou, seq = _round_trip_iou(parts, image_hw, _cfg())
    assert iou >= 0.9
    answer = _answer(seq)
    answer = answer[: np.flatnonzero(answer == vocab.EOS)[0]]
    # One separator point between the parts, and every part's points written.
    np.testing.assert_array_equal(np.flatnonzero(answer == vocab.SEPARATOR), [24, 25])
    assert len(answer) == 2 * (12 + 1 + 20)
    f = frame.eval_frame((0, 0, *image_hw), INPUT_SIZE)
    decoded = seg.decode_polygons(answer, f, SPACE)
    assert [len(p) for p in decoded] == [12, 20]


def test_dense_circle_is_subsampled_to_the_budget():
    cfg = _cfg(max_points=128)
    angles = np.linspace(0, 2 * np.pi, 500, endpoint=False)
    circle = np.stack([300 + 150 * np.sin(angles), 320 + 150 * np.cos(angles)], -1)
    iou, seq = _round_trip_iou([circle], (600, 640), cfg)
    assert iou >= 0.95
    assert seq["num_truncated_points"] == 500 - 128
    assert np.count_nonzero(SPACE.is_coord(_answer(seq))) == 2 * 128


def test_full_budget_answer_is_kept_whole():
    """An answer of exactly max_points points is followed by EOS, nothing cut."""
    cfg = _cfg(max_points=8)
    square = [np.array([[10, 10], [10, 90], [90, 90], [90, 10]], np.float32)]
    triangle = [np.array([[100, 100], [100, 150], [150, 150]], np.float32)]
    seq, _ = _encode(square + triangle, (200, 200), cfg)
    answer = _answer(seq)
    assert len(answer) == 2 * 8 + 1
    assert np.all(SPACE.is_coord(answer[:8]))
    np.testing.assert_array_equal(answer[8:10], [vocab.SEPARATOR] * 2)
    assert np.all(SPACE.is_coord(answer[10:16]))
    assert answer[16] == vocab.EOS
    assert seq["num_truncated_points"] == 0


def test_many_polygons_keep_the_largest_that_fit():
    # 4 polygons of 3 points and 3 separators fill max_points = 15.
    cfg = _cfg(max_points=15)
    rng = np.random.default_rng(2)
    sizes = rng.permutation(np.arange(10, 70, 6))
    parts = [
        np.array([[40 + 120 * (i // 5), 20 + 90 * (i % 5)]], np.float32)
        + np.array([[0, 0], [0, s], [s, s / 2]], np.float32)
        for i, s in enumerate(sizes)
    ]
    seq, f = _encode(parts, (300, 460), cfg)
    decoded = seg.decode_polygons(_answer(seq), f, SPACE)
    assert len(decoded) == 4
    spans = sorted(round(float(np.ptp(p[:, 1]))) for p in decoded)
    assert spans == sorted(int(s) for s in sizes)[-4:]
    assert seq["num_truncated_points"] == 3 * (len(parts) - 4)


def test_degenerate_polygons_and_separators_are_dropped():
    cfg = _cfg()
    triangle = np.array([[10, 10], [10, 50], [50, 30]], np.float32)
    line = np.array([[60, 60], [70, 70]], np.float32)
    polygon = np.concatenate([NAN_ROW, triangle, NAN_ROW, NAN_ROW, line, NAN_ROW], 0)
    f = np.array([100, 100, 0, 0], np.float32)
    seq = seg.encode(
        tf.constant([0.1, 0.1, 0.5, 0.5]), tf.constant(1), tf.constant(polygon / 100),
        tf.constant([0, 0]), cfg, SPACE, training=False,
    )  # fmt: skip
    answer = seq["target_seq"].numpy()[5:]
    assert np.all(SPACE.is_coord(answer[:6])) and answer[6] == vocab.EOS
    (decoded,) = seg.decode_polygons(answer, f, SPACE)
    np.testing.assert_allclose(decoded, triangle, atol=100 / (SPACE.bins - 1))


def test_sequence_layout_weights_and_clipping():
    cfg = _cfg(max_points=16, eos_weight=0.7)
    polygon = np.array([[-0.2, 0.5], [0.5, 1.3], [0.8, 0.2]], np.float32)
    box = np.array([0.1, 0.2, 0.8, 0.9], np.float32)
    seq = seg.encode(
        tf.constant(box), tf.constant(7), tf.constant(polygon), tf.constant([3, 4]), cfg, SPACE
    )
    seq = {k: v.numpy() for k, v in seq.items()}
    length = seg.sequence_length(cfg)
    assert length == 6 + 2 * 16
    for key in ("input_seq", "target_seq", "token_weights"):
        assert seq[key].shape == (length,)
    assert seq["input_seq"].dtype == np.int32 and seq["token_weights"].dtype == np.float32
    prompt = [11, *SPACE.coord_tokens(box), 107]
    np.testing.assert_array_equal(seq["input_seq"][:6], prompt)
    np.testing.assert_array_equal(seq["target_seq"][:5], prompt[1:])
    # Coordinates outside the canvas are clipped to its edge.
    top, right = SPACE.coord_shift, SPACE.coord_shift + SPACE.bins - 1
    answer = seq["target_seq"][5:11]
    assert answer[0] == top and answer[3] == right
    np.testing.assert_array_equal(seq["input_seq"][6:12], answer)
    expected = np.zeros(length, np.float32)
    expected[5:11] = 1.0
    expected[11] = 0.7
    np.testing.assert_array_equal(seq["token_weights"], expected)
    assert np.all(seq["target_seq"][11:] == vocab.PADDING)
    assert np.all(seq["input_seq"][12:] == vocab.PADDING)


def test_build_prompt_numpy_batches_match_tensorflow():
    boxes = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, 0.5, 1.0, 0.9]], np.float32)
    classes = np.array([1, 90], np.int32)
    numpy_prompts = seg.build_prompt(12, boxes, classes, SPACE)
    assert numpy_prompts.shape == (2, 6) and numpy_prompts.dtype == np.int32
    np.testing.assert_array_equal(numpy_prompts[:, [0, 5]], [[12, 101], [12, 190]])
    np.testing.assert_array_equal(numpy_prompts[:, 1:5], SPACE.coord_tokens(boxes))
    for i in range(2):
        tf_prompt = seg.build_prompt(12, tf.constant(boxes[i]), tf.constant(classes[i]), SPACE)
        np.testing.assert_array_equal(tf_prompt.numpy(), numpy_prompts[i])


def test_training_subsampling_is_deterministic_given_the_seed():
    cfg = _cfg(max_points=32)
    angles = np.linspace(0, 2 * np.pi, 301, endpoint=False)
    circle = [np.stack([200 + 90 * np.sin(angles), 200 + 90 * np.cos(angles)], -1)]
    a, _ = _encode(circle, (400, 400), cfg, seed=(5, 6), training=True)
    b, _ = _encode(circle, (400, 400), cfg, seed=(5, 6), training=True)
    c, _ = _encode(circle, (400, 400), cfg, seed=(7, 8), training=True)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["target_seq"], c["target_seq"])
    # Evaluation encoding does not depend on the seed.
    d, _ = _encode(circle, (400, 400), cfg, seed=(5, 6))
    e, _ = _encode(circle, (400, 400), cfg, seed=(7, 8))
    np.testing.assert_array_equal(d["target_seq"], e["target_seq"])


def test_eager_and_dataset_map_agree():
    cfg = _cfg(max_points=24)
    rng = np.random.default_rng(3)
    polygons = [
        _join([_blob(rng, (0.5, 0.5), 0.3, 40)]),
        _join([_blob(rng, (0.3, 0.3), 0.2, 6), _blob(rng, (0.7, 0.7), 0.2, 9)]),
        np.zeros([0, 2], np.float32),
        np.concatenate([NAN_ROW, _blob(rng, (0.5, 0.5), 0.4, 5), NAN_ROW]),
    ]
    polygons = [p.astype(np.float32) for p in polygons]
    boxes = rng.uniform(0, 1, [4, 4]).astype(np.float32)
    classes = np.array([1, 2, 3, 4], np.int32)
    seeds = rng.integers(0, 1000, [4, 2]).astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices(
        (boxes, classes, tf.ragged.constant(polygons, ragged_rank=1), seeds)
    )
    ds = ds.map(lambda b, c, p, s: seg.encode(b, c, p, s, cfg, SPACE, training=True))
    for i, mapped in enumerate(ds.as_numpy_iterator()):
        eager = seg.encode(boxes[i], classes[i], polygons[i], seeds[i], cfg, SPACE, training=True)
        for key, value in eager.items():
            np.testing.assert_array_equal(mapped[key], value.numpy(), err_msg=key)


def test_decode_polygons_splits_and_drops():
    f = np.array([100, 200, 10, 20], np.float32)

    def pts(*coords):
        return list(SPACE.coord_tokens(np.array(coords, np.float32)))

    tri = pts(0.1, 0.1, 0.1, 0.5, 0.5, 0.3)
    tokens = np.array(
        tri + [vocab.SEPARATOR] + tri + [vocab.SEPARATOR] * 2 + pts(0.9, 0.9, 0.8, 0.8)  # 2 points
        + [vocab.SEPARATOR] * 2 + tri + pts(0.7)  # odd trailing coordinate
        + [150] + tri + [vocab.EOS] + tri  # a class token splits; nothing after EOS counts
    )  # fmt: skip
    decoded = seg.decode_polygons(tokens, f, SPACE)
    assert len(decoded) == 4
    expected = np.array([[0.1, 0.1], [0.1, 0.5], [0.5, 0.3]]) * [100, 200] + [10, 20]
    for polygon in decoded:
        assert polygon.dtype == np.float32
        np.testing.assert_allclose(polygon, expected, atol=200 / (SPACE.bins - 1))
    assert seg.decode_polygons(np.array([vocab.EOS] + tri), f, SPACE) == []


def test_ensemble_keeps_the_majority_mask():
    rng = np.random.default_rng(4)
    image_hw = (300, 400)
    cfg = _cfg()
    good, f = _encode([_blob(rng, (150, 200), 80, 16)], image_hw, cfg)
    garbage = [
        _answer(_encode([_blob(rng, c, 60, 8)], image_hw, cfg)[0])
        for c in ((70, 80), (200, 300), (150, 220))
    ]
    garbage[0] = np.full_like(garbage[0], vocab.EOS)
    samples = np.stack([_answer(good)] * 5 + garbage)
    samples = samples[rng.permutation(8)]
    assert cfg.num_samples == 8 and cfg.mask_threshold == 0.5
    ensemble = seg.decode(samples, f, image_hw, SPACE, cfg)
    single = seg.decode(_answer(good), f, image_hw, SPACE, cfg)
    assert ensemble.dtype == np.uint8 and ensemble.shape == image_hw
    assert single.sum() > 1000
    np.testing.assert_array_equal(ensemble, single)
    # Outvoted by empty answers, the good mask is gone.
    empty = np.full_like(_answer(good), vocab.EOS)
    minority = seg.decode(np.stack([_answer(good)] * 3 + [empty] * 5), f, image_hw, SPACE, cfg)
    assert minority.sum() == 0


def test_coco_result_format():
    mask = np.zeros([20, 30], np.uint8)
    mask[5:10, 3:17] = 1
    result = seg.to_coco_results(mask, np.float32(0.25), 2, np.int64(9), _Categories({2: 47}))
    assert result["image_id"] == 9 and result["category_id"] == 47 and result["score"] == 0.25
    assert isinstance(result["segmentation"]["counts"], str)
    assert result["segmentation"]["size"] == [20, 30]
    from pycocotools import mask as mask_utils

    rle = dict(result["segmentation"], counts=result["segmentation"]["counts"].encode())
    np.testing.assert_array_equal(mask_utils.decode(rle), mask)


def _segm_fixture(rng, num_images=6):
    """COCO instances with 1-2 part polygon objects and the polygons in (y, x) pixels."""
    images, annotations, objects = [], [], []
    for image_id in range(1, num_images + 1):
        h, w = (int(v) for v in rng.integers(240, 640, 2))
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.jpg"})
        for _ in range(int(rng.integers(1, 4))):
            radius = rng.uniform(20, min(h, w) / 4)
            parts = [
                _blob(rng, rng.uniform(radius, [h - radius, w - radius]), radius, 12)
                for _ in range(int(rng.integers(1, 3)))
            ]
            mask = masks.polygons_to_mask(parts, h, w)
            ymin, xmin, ymax, xmax = _box(parts)
            category = int(rng.choice([1, 5, 90]))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "segmentation": [p[:, ::-1].reshape(-1).tolist() for p in parts],
                "area": float(mask.sum()), "bbox": [xmin, ymin, xmax - xmin, ymax - ymin],
                "iscrowd": 0,
            })  # fmt: skip
            objects.append((image_id, (h, w), category, parts))
    categories = [{"id": i, "name": str(i)} for i in (1, 5, 90)]
    return {"images": images, "annotations": annotations, "categories": categories}, objects


def test_ground_truth_tokens_reach_segm_ap():
    rng = np.random.default_rng(5)
    dataset, objects = _segm_fixture(rng)
    cfg = _cfg()
    categories = _Categories({c: c for c in (1, 5, 90)})
    results = []
    for image_id, image_hw, category, parts in objects:
        seq, f = _encode(parts, image_hw, cfg, class_id=category)
        assert seq["input_seq"][5] == vocab.CLASS_SHIFT + category
        mask = seg.decode(_answer(seq)[None], f, image_hw, SPACE, cfg)
        results.append(seg.to_coco_results(mask, 1.0, category, image_id, categories))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] >= 0.9


@pytest.mark.parametrize("max_points", [2, 0])
def test_too_small_budget_is_refused(max_points):
    with pytest.raises(ValueError, match="max_points"):
        seg.encode(
            tf.constant([0.0, 0.0, 1.0, 1.0]), tf.constant(1), tf.zeros([0, 2]),
            tf.constant([0, 0]), _cfg(max_points=max_points), SPACE,
        )  # fmt: skip
