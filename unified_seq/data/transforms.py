"""Image and geometry augmentation in TensorFlow, for tf.data maps.

Every function takes and returns a `features` dict holding `image`
(float32[h, w, 3] in [0, 1]) and any of these coordinate entries, all
normalised to the current image and y before x:

    boxes       float32[..., 4]  ymin, xmin, ymax, xmax
    points      float32[..., 2]  polygon points; NaN rows are separators
    keypoints   float32[..., 3]  y, x, visibility (0 marks not visible)

Coordinates move with the image through one affine map per axis
(`c' = c * scale + offset`), so the image and its annotations cannot drift
apart. Randomness is stateless: each random transform takes an int32[2] seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

COORD_KEYS = ("boxes", "points", "keypoints")


def _affine(features: dict, scale: tf.Tensor, offset: tf.Tensor) -> dict:
    """Applies `c' = c * scale + offset` (float32[2] each, y then x) to all coordinates."""
    out = dict(features)
    if "boxes" in features:
        out["boxes"] = features["boxes"] * tf.tile(scale, [2]) + tf.tile(offset, [2])
    if "points" in features:
        out["points"] = features["points"] * scale + offset
    if "keypoints" in features:
        kp = features["keypoints"]
        out["keypoints"] = tf.concat([kp[..., :2] * scale + offset, kp[..., 2:]], axis=-1)
    return out


def image_hw(image: tf.Tensor) -> tf.Tensor:
    """float32[2] height and width of an image."""
    return tf.cast(tf.shape(image)[:2], tf.float32)


def scale_jitter(
    features: dict, seed: tf.Tensor, size: int, min_scale: float, max_scale: float
) -> dict:
    """Resizes so that the long side is `s * size`, s ~ U(min_scale, max_scale).

    Aspect is kept; normalised coordinates do not change.
    """
    s = tf.random.stateless_uniform([], seed, min_scale, max_scale)
    return resize_long_side(features, s * size)


def resize_long_side(features: dict, long_side: tf.Tensor) -> dict:
    """Resizes (aspect kept, bilinear) so the long side is `long_side` pixels."""
    hw = image_hw(features["image"])
    new_hw = tf.maximum(tf.round(hw * tf.cast(long_side, tf.float32) / tf.reduce_max(hw)), 1.0)
    out = dict(features)
    out["image"] = tf.image.resize(features["image"], tf.cast(new_hw, tf.int32), antialias=False)
    return out


def resize_to_fit(features: dict, size: int) -> dict:
    """Evaluation resize: fit inside `size` x `size`, aspect kept, antialiased.

    Matches `frame.fit_size` so that evaluation frames are exact.
    """
    hw = image_hw(features["image"])
    scale = tf.reduce_min(size / hw)
    new_hw = tf.maximum(tf.round(hw * scale), 1.0)
    out = dict(features)
    out["image"] = tf.image.resize(features["image"], tf.cast(new_hw, tf.int32), antialias=True)
    return out


def crop(features: dict, offset: tf.Tensor, crop_hw: tf.Tensor) -> dict:
    """Crops `crop_hw` (float32[2] pixels) at `offset` (float32[2] pixels).

    Boxes and points are clipped to the crop (NaN separators kept); keypoints
    leaving it become invisible, as in the official pipeline.
    """
    hw = image_hw(features["image"])
    offset = tf.round(offset)
    crop_hw = tf.round(crop_hw)
    out = _affine(features, hw / crop_hw, -offset / crop_hw)
    oi = tf.cast(offset, tf.int32)
    ci = tf.cast(crop_hw, tf.int32)
    out["image"] = features["image"][oi[0] : oi[0] + ci[0], oi[1] : oi[1] + ci[1]]
    if "boxes" in out:
        out["boxes"] = tf.clip_by_value(out["boxes"], 0.0, 1.0)
    if "points" in out:
        pts = out["points"]
        out["points"] = tf.where(tf.math.is_nan(pts), pts, tf.clip_by_value(pts, 0.0, 1.0))
    if "keypoints" in out:
        kp = out["keypoints"]
        inside = tf.reduce_all((kp[..., :2] >= 0.0) & (kp[..., :2] <= 1.0), axis=-1)
        vis = tf.where(inside, kp[..., 2], tf.zeros_like(kp[..., 2]))
        out["keypoints"] = tf.concat([kp[..., :2], vis[..., None]], axis=-1)
    return out


def random_crop(features: dict, seed: tf.Tensor, size: int) -> dict:
    """Random crop of at most `size` x `size` (official `fixed_size_crop`).

    One uniform draw places the crop on both axes, as the official code does.
    """
    hw = image_hw(features["image"])
    crop_hw = tf.minimum(hw, float(size))
    u = tf.random.stateless_uniform([], seed)
    offset = tf.floor(u * (hw - crop_hw))
    return crop(features, offset, crop_hw)


def crop_to_box(features: dict, box: tf.Tensor, crop_scale: float) -> dict:
    """Crops a region `crop_scale` times the box size around its centre.

    Args:
      features: features dict.
      box: float32[4] normalised box the crop is centred on.
      crop_scale: region side / box side (2.0 = the official pad of half the
        box on each side).

    Returns:
      cropped features and the region as float32[4] (y0, x0, h, w) in pixels
      of the input image, under key `region`.
    """
    hw = image_hw(features["image"])
    box_px = box * tf.tile(hw, [2])
    centre = (box_px[:2] + box_px[2:]) / 2.0
    half = tf.maximum((box_px[2:] - box_px[:2]) * crop_scale / 2.0, 1.0)
    lo = tf.clip_by_value(tf.round(centre - half), 0.0, hw - 1.0)
    hi = tf.clip_by_value(tf.round(centre + half), lo + 1.0, hw)
    out = crop(features, lo, hi - lo)
    out["region"] = tf.concat([lo, hi - lo], axis=0)
    return out


def horizontal_flip(features: dict, flip_permutation: Sequence[int] | None = None) -> dict:
    """Mirrors the image left-right; keypoints also swap left/right names."""
    out = _affine(features, tf.constant([1.0, -1.0]), tf.constant([0.0, 1.0]))
    out["image"] = tf.reverse(features["image"], axis=[1])
    if "boxes" in out:
        b = out["boxes"]
        # After mirroring, the old xmax is the new xmin.
        out["boxes"] = tf.stack([b[..., 0], b[..., 3], b[..., 2], b[..., 1]], axis=-1)
    if "keypoints" in out and flip_permutation is not None:
        out["keypoints"] = tf.gather(out["keypoints"], flip_permutation, axis=-2)
    return out


def random_horizontal_flip(
    features: dict, seed: tf.Tensor, flip_permutation: Sequence[int] | None = None
) -> dict:
    """Flips with probability 0.5."""
    do_flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.cond(
        do_flip, lambda: horizontal_flip(features, flip_permutation), lambda: dict(features)
    )


def pad_to_square(features: dict, size: int, pad_value: float) -> dict:
    """Pads bottom/right to `size` x `size`; coordinates rescale to the canvas.

    Adds `unpadded_size` float32[2], the image's size inside the canvas.
    """
    hw = image_hw(features["image"])
    out = _affine(features, hw / size, tf.zeros([2]))
    img = features["image"] - pad_value
    img = tf.image.pad_to_bounding_box(img, 0, 0, size, size) + pad_value
    out["image"] = tf.ensure_shape(img, [size, size, 3])
    out["unpadded_size"] = hw
    return out


def color_jitter(image: tf.Tensor, seed: tf.Tensor, strength: float) -> tf.Tensor:
    """SimCLR-style colour jitter (official captioning): applied with p=0.8.

    Brightness, contrast, saturation 0.8 * strength, hue 0.2 * strength, then
    grey-scale with p=0.2; output clipped to [0, 1].
    """
    seeds = tf.random.experimental.stateless_split(seed, 6)
    s = strength

    def jitter(img):
        img = tf.image.stateless_random_brightness(img, 0.8 * s, seeds[0])
        img = tf.image.stateless_random_contrast(img, 1 - 0.8 * s, 1 + 0.8 * s, seeds[1])
        img = tf.image.stateless_random_saturation(img, 1 - 0.8 * s, 1 + 0.8 * s, seeds[2])
        img = tf.image.stateless_random_hue(img, 0.2 * s, seeds[3])
        return tf.clip_by_value(img, 0.0, 1.0)

    apply = tf.random.stateless_uniform([], seeds[4]) < 0.8
    image = tf.cond(apply, lambda: jitter(image), lambda: image)
    grey = tf.random.stateless_uniform([], seeds[5]) < 0.2
    return tf.cond(
        grey, lambda: tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3]), lambda: image
    )


def valid_boxes(boxes: tf.Tensor) -> tf.Tensor:
    """bool[N]: boxes with positive height and width."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
