"""The evaluated split's COCO ground truth, and AP from pycocotools.

Tasks score their results against `GroundTruth`: the split's annotation files
(`ROOT/annotations/<kind>_<split>2017.json`), each loaded once, and the ids
of the images that were evaluated (all, or the first `eval.max_examples`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import tensorflow as tf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


class GroundTruth:
    """Annotation files of one split, loaded on first use.

    Args:
      coco_dir: root of the COCO layout.
      split: split name as in the file names (`val`).
      image_ids: the evaluated images.
    """

    def __init__(self, coco_dir: str, split: str, image_ids: list[int]):
        self.coco_dir = coco_dir
        self.split = split
        self.image_ids = sorted(int(i) for i in image_ids)
        self._loaded: dict[str, COCO] = {}

    def path(self, kind: str) -> str:
        """ROOT/annotations/{kind}_{split}2017.json."""
        return os.path.join(self.coco_dir, "annotations", f"{kind}_{self.split}2017.json")

    def coco(self, kind: str) -> COCO:
        """The `instances`, `person_keypoints` or `captions` file as a pycocotools COCO."""
        if kind not in self._loaded:
            self._loaded[kind] = load_coco(self.path(kind))
        return self._loaded[kind]


def load_coco(path: str) -> COCO:
    """A pycocotools COCO of an annotation file at any tf.io.gfile path.

    COCO(path) would open the file itself, which only works for local paths.
    """
    with tf.io.gfile.GFile(path, "rb") as f:
        dataset = json.loads(f.read())
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_ap(gt: COCO, results: list[dict], iou_type: str, image_ids: list[int]) -> dict:
    """COCOeval summary numbers of `results` on `image_ids` (AP as pycocotools reports it, 0–1).

    Args:
      gt: ground truth.
      results: COCO-format results (`bbox`, `segmentation` or `keypoints`).
      iou_type: "bbox", "segm" or "keypoints".
      image_ids: images to score; images without results count as misses.

    Returns:
      {"AP", "AP50", "AP75"}; all 0 without results.
    """
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2])}
