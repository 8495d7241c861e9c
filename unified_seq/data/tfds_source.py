"""COCO 2017 through tensorflow-datasets (`coco/2017`), in the TF example layout.

The layout and its specs are those of `coco.examples_to_dataset` (see
unified_seq/data/coco.py), so the pipelines treat both sources the same.
tfds `coco/2017` has boxes, labels and crowd flags but no masks, keypoints or
captions: polygons come out empty, keypoints zero and captions empty. Images
stay encoded (`image/encoded`); the pipeline decodes them.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from unified_seq.data.categories import CategoryMap
from unified_seq.data.errors import DataError
from unified_seq.vocab import TokenSpace

TFDS_NAME = "coco/2017"

_COCO_80 = (
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"), (5, "airplane", "vehicle"), (6, "bus", "vehicle"),
    (7, "train", "vehicle"), (8, "truck", "vehicle"), (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"),
    (19, "horse", "animal"), (20, "sheep", "animal"), (21, "cow", "animal"),
    (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"),
    (25, "giraffe", "animal"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
    (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"),
    (49, "knife", "kitchen"), (50, "spoon", "kitchen"), (51, "bowl", "kitchen"),
    (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"),
    (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"),
    (61, "cake", "food"), (62, "chair", "furniture"), (63, "couch", "furniture"),
    (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
    (81, "sink", "appliance"), (82, "refrigerator", "appliance"), (84, "book", "indoor"),
    (85, "clock", "indoor"), (86, "vase", "indoor"), (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
)  # fmt: skip

# tfds labels 0..79 index this list: tfds builds its ClassLabel names from the
# instances file's categories, which COCO lists in id order.
COCO_80_CATEGORIES: list[dict] = [
    {"id": i, "name": name, "supercategory": sup} for i, name, sup in _COCO_80
]


def _encoded_size(encoded: tf.Tensor) -> tf.Tensor:
    """int32[2] (height, width) of an encoded image, from the JPEG header when it is one."""
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.image.extract_jpeg_shape(encoded)[:2],
        lambda: tf.shape(tf.io.decode_image(encoded, channels=3, expand_animations=False))[:2],
    )


def tfds_to_example(
    features: dict, category_map: CategoryMap, num_keypoints: int
) -> dict[str, Any]:
    """One tfds `coco/2017` example (image not decoded) → the TF example layout.

    tfds boxes are normalised (ymin, xmin, ymax, xmax); they are scaled to
    pixels of the image's size read from its header. Labels 0..79 become COCO
    category ids (COCO_80_CATEGORIES) and then class ids through `category_map`.
    """
    objects = features["objects"]
    n = tf.shape(objects["label"])[0]
    size = _encoded_size(features["image"])
    label_to_class = category_map.to_class(np.array([c["id"] for c in COCO_80_CATEGORIES]))
    return {
        "image/id": tf.cast(features["image/id"], tf.int64),
        "image/filename": tf.constant("", tf.string),
        "image/encoded": features["image"],
        "image/size": size,
        "objects/id": tf.cast(objects["id"], tf.int64),
        "objects/bbox": objects["bbox"] * tf.cast(tf.tile(size, [2]), tf.float32),
        "objects/class": tf.gather(tf.constant(label_to_class, tf.int32), objects["label"]),
        "objects/is_crowd": tf.cast(objects["is_crowd"], tf.bool),
        "objects/area": tf.cast(objects["area"], tf.float32),
        "objects/polygons": tf.RaggedTensor.from_row_lengths(
            tf.zeros([0, 2], tf.float32), tf.zeros([n], tf.int64)
        ),
        "objects/keypoints": tf.zeros([n, num_keypoints, 3], tf.float32),
        # Length 0 but typed [None], as the JSON source's captions, so the specs agree.
        "captions": tf.compat.v1.placeholder_with_default(tf.zeros([0], tf.string), [None]),
    }


def load_tfds(
    split: tfds.typing.SplitArg,
    data_dir: str,
    space: TokenSpace,
    *,
    num_keypoints: int = 17,
    shuffle_files: bool = False,
    read_config: tfds.ReadConfig | None = None,
) -> tuple[tf.data.Dataset, CategoryMap]:
    """Reads `coco/2017` from a prepared tfds data dir.

    Args:
      split: a tfds split, slices included (`train`, `validation`,
        `train[0:50%]`, a part of `tfds.even_splits`).
      data_dir: tfds data dir holding `coco/2017` ("" for tfds's default).
      space: token space (class ids are remapped when COCO's ids do not fit).
      num_keypoints: K of the all-zero `objects/keypoints`.
      shuffle_files: shuffle the record files (training).
      read_config: tfds.ReadConfig, e.g. for per-process sharding.

    Returns:
      the dataset in the TF example layout, and the category map.
    """
    category_map = CategoryMap.build(COCO_80_CATEGORIES, space, f"tfds {TFDS_NAME}")
    builder = tfds.builder(TFDS_NAME, data_dir=data_dir or None)
    try:
        ds = builder.as_dataset(
            split=split,
            decoders={"image": tfds.decode.SkipDecoding()},
            shuffle_files=shuffle_files,
            read_config=read_config,
        )
    except AssertionError as e:  # tfds's way of saying the data is not prepared
        raise DataError(
            data_dir or "the default tfds data dir",
            f"{TFDS_NAME} is not prepared there ({e})",
            f"run `tfds build {TFDS_NAME} --data_dir=DIR` once, then pass "
            "--config.data.tfds_data_dir=DIR",
        ) from e
    convert = functools.partial(
        tfds_to_example, category_map=category_map, num_keypoints=num_keypoints
    )
    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE), category_map
