"""How a task sees an image: decoded, augmented or fitted, on the square canvas.

Training views take the official augmentation (scale jitter, random crop,
optional flip) and are padded to the canvas; the evaluation view resizes the
image (or a region of it) to fit and pads it, and carries the frame that maps
canvas coordinates back to original pixels (frame.py). All in TensorFlow, for
tf.data maps; coordinates are normalised and y before x (transforms.py).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from unified_seq.data import image_decode, transforms


def decode_image(example: dict, max_pixels: int = image_decode.DEFAULT_MAX_PIXELS) -> tf.Tensor:
    """float32[h, w, 3] in [0, 1] from `image/encoded` or `image/filename`, upright.

    JPEGs are turned as their EXIF orientation says. An image whose header
    declares more than `max_pixels` pixels (0: no limit) is refused before
    decoding: InvalidArgumentError "<file> declares HxW pixels, ..."
    (image_decode.decode).
    """
    data = tf.cond(
        tf.strings.length(example["image/encoded"]) > 0,
        lambda: example["image/encoded"],
        lambda: tf.io.read_file(example["image/filename"]),
    )
    image = image_decode.decode(data, example["image/filename"], max_pixels)
    return tf.image.convert_image_dtype(image, tf.float32)


def target_objects(example: dict) -> tf.Tensor:
    """bool[N]: objects that may be targets (not crowd, positive box)."""
    return tf.logical_not(example["objects/is_crowd"]) & transforms.valid_boxes(
        example["objects/bbox"]
    )


def normalised_objects(example: dict, image: tf.Tensor) -> dict[str, Any]:
    """The example's pixel boxes, keypoints and polygons, normalised to the image."""
    hw = transforms.image_hw(image)
    kp = example["objects/keypoints"]
    return {
        "boxes": example["objects/bbox"] / tf.tile(hw, [2]),
        "keypoints": tf.concat([kp[..., :2] / hw, kp[..., 2:]], axis=-1),
        "polygons": example["objects/polygons"] / hw,
    }


def augment(features: dict, seeds: tf.Tensor, cfg: Any, size: int, flip_perm: Any = None) -> dict:
    """Scale jitter, random crop and (with `cfg.flip`) flip; seeds int64[3, 2].

    Args:
      features: transforms.py features of the image.
      seeds: three stateless seeds.
      cfg: the task config (`scale_jitter`, `flip`).
      size: canvas side.
      flip_perm: int32[K] keypoint order after a flip, or None.
    """
    f = transforms.scale_jitter(features, seeds[0], size, *cfg.scale_jitter)
    f = transforms.random_crop(f, seeds[1], size)
    if cfg.flip:
        f = transforms.random_horizontal_flip(f, seeds[2], flip_perm)
    return f


def canvas_frame(region: tf.Tensor, unpadded: tf.Tensor, size: int) -> tf.Tensor:
    """TF twin of `frame.make_frame`: float32[4] canvas → original pixels."""
    return tf.concat([size * region[2:] / unpadded, region[:2]], axis=0)


def whole_image(image: tf.Tensor) -> tf.Tensor:
    """float32[4] region (y0, x0, h, w) of the whole image."""
    return tf.concat([[0.0, 0.0], transforms.image_hw(image)], 0)


def eval_view(features: dict, region: tf.Tensor, size: int, pad_value: float) -> tuple[dict, Any]:
    """Fits `features` (showing `region` of the original) into the canvas.

    Returns:
      the padded features and the frame float32[4] of the canvas.
    """
    f = transforms.resize_to_fit(features, size)
    f = transforms.pad_to_square(f, size, pad_value)
    return f, canvas_frame(region, f["unpadded_size"], size)


def eval_image(example: dict, image: tf.Tensor, size: int, pad_value: float) -> dict:
    """The evaluation view of a whole image, with its frame and ids."""
    f, frame = eval_view({"image": image}, whole_image(image), size, pad_value)
    return {
        "image": f["image"],
        "frame": frame,
        "image/id": example["image/id"],
        "image/size": tf.cast(transforms.image_hw(image), tf.int32),
    }
