"""The example dict every data source yields (one image and its annotations).

All sources (COCO JSON, tensorflow-datasets, the embedded synthetic set) produce
exactly these keys, as numpy values on the host; the pipelines turn a list of
them into a tf.data.Dataset of the same keys. Coordinates are pixels of the
original image, y before x.

    image/id          int64[]          COCO image id
    image/filename    str              path of the encoded image file
                                       ("" when `image/encoded` is given)
    image/encoded     bytes            encoded image (tfds); b"" when read from file
    image/size        int32[2]         (height, width) as the annotations state it
    objects/id        int64[N]         annotation ids
    objects/bbox      float32[N, 4]    ymin, xmin, ymax, xmax in pixels
    objects/class     int32[N]         class id; token = 100 + class id
    objects/is_crowd  bool[N]
    objects/area      float32[N]
    objects/polygons  list of N float32[P_i, 2] arrays of (y, x) points; a row of
                      NaN separates two polygons of one instance; empty when
                      the instance has no mask
    objects/keypoints float32[N, K, 3]  (y, x, v); v as COCO: 0 not labelled,
                      1 labelled but occluded, 2 visible; all zero for
                      instances without keypoints
    captions          list of str      the image's captions (may be empty)

NaN as the separator survives every affine map (scale, shift, flip) unchanged,
so augmentation needs no sentinel bookkeeping.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KEYS = (
    "image/id",
    "image/filename",
    "image/encoded",
    "image/size",
    "objects/id",
    "objects/bbox",
    "objects/class",
    "objects/is_crowd",
    "objects/area",
    "objects/polygons",
    "objects/keypoints",
    "captions",
)


def empty_objects(num_keypoints: int) -> dict[str, Any]:
    """The `objects/*` entries of an image without annotations."""
    return {
        "objects/id": np.zeros([0], np.int64),
        "objects/bbox": np.zeros([0, 4], np.float32),
        "objects/class": np.zeros([0], np.int32),
        "objects/is_crowd": np.zeros([0], bool),
        "objects/area": np.zeros([0], np.float32),
        "objects/polygons": [],
        "objects/keypoints": np.zeros([0, num_keypoints, 3], np.float32),
    }


def check_example(example: dict[str, Any], num_keypoints: int) -> None:
    """Raises ValueError when an example does not follow the layout above."""
    missing = [k for k in KEYS if k not in example]
    if missing:
        raise ValueError(f"example {example.get('image/id')} lacks keys {missing}")
    n = len(example["objects/id"])
    shapes = {
        "objects/bbox": (n, 4),
        "objects/class": (n,),
        "objects/is_crowd": (n,),
        "objects/area": (n,),
        "objects/keypoints": (n, num_keypoints, 3),
    }
    for key, shape in shapes.items():
        if np.shape(example[key]) != shape:
            raise ValueError(
                f"example {example['image/id']}: {key} has shape "
                f"{np.shape(example[key])}, expected {shape}"
            )
    if len(example["objects/polygons"]) != n:
        raise ValueError(f"example {example['image/id']}: objects/polygons must have {n} entries")
