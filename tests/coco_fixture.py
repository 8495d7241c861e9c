"""A small COCO-format data set written by tests, with the awkward cases.

Category ids have gaps (1 person, 4, 90), image 3 has a crowd region (RLE),
image 4 has no annotations, image 2 has a non-crowd RLE mask, persons carry
17 keypoints with some not labelled, and every image has captions.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

KEYPOINT_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
]  # fmt: skip
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person", "keypoints": KEYPOINT_NAMES,
     "skeleton": []},
    {"id": 4, "name": "box", "supercategory": "shape"},
    {"id": 90, "name": "blob", "supercategory": "shape"},
]  # fmt: skip
SIZES = {1: (60, 80), 2: (72, 64), 3: (64, 64), 4: (50, 70)}


def _rect_poly(x, y, w, h):
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _person_keypoints(x, y, w, h, hidden=(3, 4)):
    """17 keypoints spread over a box, left ones on the image's left; some hidden."""
    kps = []
    for k in range(17):
        side = 0 if k == 0 else (1 if k % 2 == 1 else -1)
        px = x + w / 2 - side * w / 4
        py = y + h * (0.1 + 0.8 * ((k + 1) // 2) / 8)
        kps += [0.0, 0.0, 0] if k in hidden else [round(px, 2), round(py, 2), 2]
    return kps


def write_fixture(root: str, split: str = "train") -> dict:
    """Writes the fixture under `root`; returns its annotation dicts by kind."""
    img_dir = os.path.join(root, f"{split}2017")
    ann_dir = os.path.join(root, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for image_id, (h, w) in SIZES.items():
        name = f"{image_id:012d}.png"
        pixels = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(img_dir, name))
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})

    blob = np.zeros(SIZES[2], np.uint8)
    blob[10:40, 20:50] = 1
    blob_rle = mask_utils.encode(np.asfortranarray(blob))
    blob_rle["counts"] = blob_rle["counts"].decode()
    crowd = np.zeros(SIZES[3], np.uint8)
    crowd[5:60, 5:60] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle["counts"] = crowd_rle["counts"].decode()

    def ann(ann_id, image_id, cat, bbox, seg, crowd=0):
        area = float(bbox[2] * bbox[3])
        return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox,
                "segmentation": seg, "area": area, "iscrowd": crowd}  # fmt: skip

    person1 = ann(11, 1, 1, [10, 5, 30, 50], [_rect_poly(10, 5, 30, 50)])
    person3 = ann(31, 3, 1, [30, 8, 24, 50], [_rect_poly(30, 8, 24, 50)])
    instances = [
        person1,
        ann(12, 1, 4, [50, 30, 20, 20], [_rect_poly(50, 30, 20, 20), _rect_poly(45, 52, 8, 6)]),
        ann(21, 2, 90, [20, 10, 30, 30], blob_rle),
        ann(22, 2, 4, [2, 45, 16, 20], [_rect_poly(2, 45, 16, 20)]),
        ann(32, 3, 90, [5, 5, 55, 55], crowd_rle, crowd=1),
        person3,
    ]
    keypoint_anns = []
    for p in (person1, person3):
        kps = _person_keypoints(*p["bbox"])
        keypoint_anns.append(
            {**p, "keypoints": kps, "num_keypoints": sum(v > 0 for v in kps[2::3])}
        )
    captions = [
        {"id": 100 + 10 * i + j, "image_id": im["id"], "caption": f"image {im['id']} caption {j}"}
        for i, im in enumerate(images)
        for j in range(5 if im["id"] != 2 else 3)
    ]
    files = {
        "instances": {"images": images, "annotations": instances, "categories": CATEGORIES},
        "person_keypoints": {
            "images": images,
            "annotations": keypoint_anns,
            "categories": CATEGORIES[:1],
        },
        "captions": {"images": images, "annotations": captions},
    }
    for kind, content in files.items():
        with open(os.path.join(ann_dir, f"{kind}_{split}2017.json"), "w") as f:
            json.dump(content, f)
    return files
