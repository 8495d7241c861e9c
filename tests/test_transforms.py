"""Geometry transforms keep annotations on the pixels they describe."""

import numpy as np
import tensorflow as tf

from unified_seq.data import transforms


def _marked_image(h, w, y, x):
    """Zero image with one bright pixel at (y, x); its centre is the point's location."""
    img = np.zeros([h, w, 3], np.float32)
    img[y, x] = 1.0
    return tf.constant(img)


def _bright_pixel(image):
    img = np.asarray(image)[..., 0]
    y, x = np.unravel_index(np.argmax(img), img.shape)
    return y, x


def _point_features(h, w, y, x):
    # A point at the centre of pixel (y, x), normalised to the image.
    return {
        "image": _marked_image(h, w, y, x),
        "points": tf.constant([[(y + 0.5) / h, (x + 0.5) / w]], tf.float32),
        "keypoints": tf.constant([[(y + 0.5) / h, (x + 0.5) / w, 2.0]], tf.float32),
        "boxes": tf.constant([[y / h, x / w, (y + 1) / h, (x + 1) / w]], tf.float32),
    }


def _check_point(f, tol=0.51):
    img = np.asarray(f["image"])
    y, x = _bright_pixel(img)
    h, w = img.shape[:2]
    py, px = np.asarray(f["points"])[0] * [h, w]
    assert abs(py - (y + 0.5)) <= tol and abs(px - (x + 0.5)) <= tol
    ky, kx, v = np.asarray(f["keypoints"])[0]
    assert v == 2.0 and abs(ky * h - py) < 1e-4 and abs(kx * w - px) < 1e-4
    b = np.asarray(f["boxes"])[0] * [h, w, h, w]
    assert b[0] - tol <= y + 0.5 <= b[2] + tol and b[1] - tol <= x + 0.5 <= b[3] + tol


def test_crop_moves_points_with_pixels():
    f = _point_features(40, 60, 25, 37)
    out = transforms.crop(f, tf.constant([10.0, 20.0]), tf.constant([20.0, 30.0]))
    assert out["image"].shape == (20, 30, 3)
    _check_point(out)


def test_crop_makes_outside_keypoints_invisible_and_clips_boxes():
    f = _point_features(40, 60, 5, 5)
    out = transforms.crop(f, tf.constant([10.0, 20.0]), tf.constant([20.0, 30.0]))
    assert float(out["keypoints"][0, 2]) == 0.0
    assert np.all(np.asarray(out["boxes"]) >= 0.0) and np.all(np.asarray(out["boxes"]) <= 1.0)


def test_flip_mirrors_points_boxes_and_swaps_keypoints():
    f = _point_features(30, 50, 12, 7)
    f["keypoints"] = tf.constant([[0.1, 0.2, 2.0], [0.3, 0.4, 2.0], [0.5, 0.6, 1.0]])
    out = transforms.horizontal_flip(f, [0, 2, 1])
    y, x = _bright_pixel(out["image"])
    assert (y, x) == (12, 50 - 1 - 7)
    np.testing.assert_allclose(out["points"], [[12.5 / 30, 1 - 7.5 / 50]], atol=1e-6)
    b = np.asarray(out["boxes"])[0]
    assert b[1] < b[3]
    np.testing.assert_allclose(b, [12 / 30, 1 - 8 / 50, 13 / 30, 1 - 7 / 50], atol=1e-6)
    np.testing.assert_allclose(
        out["keypoints"], [[0.1, 0.8, 2.0], [0.5, 0.4, 1.0], [0.3, 0.6, 2.0]], atol=1e-6
    )
    twice = transforms.horizontal_flip(out, [0, 2, 1])
    np.testing.assert_allclose(twice["keypoints"], f["keypoints"], atol=1e-6)


def test_pad_rescales_to_canvas_and_keeps_nan_separators():
    f = _point_features(30, 50, 12, 7)
    f["points"] = tf.constant([[0.5, 0.5], [np.nan, np.nan], [0.2, 0.4]], tf.float32)
    out = transforms.pad_to_square(f, 64, 0.3)
    assert out["image"].shape == (64, 64, 3)
    assert float(out["image"][63, 63, 0]) == np.float32(0.3)
    pts = np.asarray(out["points"])
    assert np.isnan(pts[1]).all()
    np.testing.assert_allclose(pts[0], [0.5 * 30 / 64, 0.5 * 50 / 64], atol=1e-6)
    np.testing.assert_allclose(out["unpadded_size"], [30, 50])


def test_crop_to_box_region_and_coordinates():
    f = _point_features(100, 80, 50, 40)
    box = tf.constant([0.4, 0.4, 0.6, 0.6])  # 20 x 16 px box around the point
    out = transforms.crop_to_box(f, box, 2.0)
    y0, x0, h, w = np.asarray(out["region"])
    assert (y0, x0, h, w) == (30.0, 24.0, 40.0, 32.0)
    _check_point(out)


def test_chain_eager_equals_dataset_map():
    f = _point_features(48, 64, 30, 11)
    seed = tf.constant([3, 4], tf.int64)

    def chain(f, seed):
        seeds = tf.random.experimental.stateless_split(seed, 3)
        f = transforms.scale_jitter(f, seeds[0], 64, 0.5, 2.0)
        f = transforms.random_crop(f, seeds[1], 64)
        f = transforms.random_horizontal_flip(f, seeds[2], [0])
        return transforms.pad_to_square(f, 64, 0.3)

    eager = chain(f, seed)
    ds = tf.data.Dataset.from_tensors((f, seed)).map(chain)
    mapped = next(iter(ds))
    for key in ("image", "points", "boxes", "keypoints"):
        np.testing.assert_allclose(eager[key], mapped[key], atol=1e-6)
