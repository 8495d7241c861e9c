"""Data-set category ids ↔ the class ids written as tokens (DESIGN §2).

A class token is `100 + class id`. COCO's ids (1..90 with gaps) are used as
they are, which keeps official Pix2Seq checkpoints usable. A data set whose ids
do not all fit in `[1, space.max_class_id]` is remapped to `1..K` in sorted-id
order; the map is saved with the run and results are mapped back through it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import tensorflow as tf

from unified_seq.data.errors import DataError
from unified_seq.vocab import TokenSpace


def check_categories(categories: Any, path: str) -> None:
    """Raises DataError unless `categories` is a list of dicts with unique positive int ids."""
    if not isinstance(categories, list):
        raise DataError(path, "'categories' must be a list of objects", "see the COCO format")
    seen = set()
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or "id" not in category:
            raise DataError(
                path, f"categories[{index}] has no 'id'", "every category needs an integer 'id'"
            )
        cid = category["id"]
        if not isinstance(cid, int) or isinstance(cid, bool) or cid <= 0:
            raise DataError(
                path,
                f"categories[{index}] has id {cid!r}; category ids must be positive integers",
                "renumber the categories from 1 (0 is never a class)",
            )
        if cid in seen:
            raise DataError(
                path, f"category id {cid} appears twice in 'categories'", "make the ids unique"
            )
        seen.add(cid)


def _swap_side(name: str) -> str:
    """`left_eye` ↔ `right_eye` (any position, case-insensitive); other names unchanged."""
    lower = name.lower()
    return lower.replace("left", "\0").replace("right", "left").replace("\0", "right")


def _lookup(table_keys: np.ndarray, table_values: np.ndarray, ids: Any, what: str) -> np.ndarray:
    """Maps `ids` through sorted `table_keys` → `table_values`; unknown ids raise ValueError."""
    ids = np.asarray(ids, np.int64)
    pos = np.clip(np.searchsorted(table_keys, ids), 0, max(len(table_keys) - 1, 0))
    known = (table_keys[pos] == ids) if len(table_keys) else np.zeros(ids.shape, bool)
    if not np.all(known):
        unknown = sorted(set(np.atleast_1d(ids[~known]).tolist()))
        raise ValueError(f"unknown {what} {unknown[:5]} (the category map has {len(table_keys)})")
    return table_values[pos].astype(np.int32)


@dataclasses.dataclass(frozen=True)
class CategoryMap:
    """Data-set category ids ↔ class ids used in tokens (token = 100 + class id).

    Attributes:
      dataset_ids: category ids as the data set states them, sorted.
      names: category names, aligned with `dataset_ids`.
      class_ids: class id of each category, aligned with `dataset_ids`.
      keypoint_names: keypoint names of the category that has them (COCO's
        person), () if none.
    """

    dataset_ids: tuple[int, ...]
    names: tuple[str, ...]
    class_ids: tuple[int, ...]
    keypoint_names: tuple[str, ...] = ()

    @property
    def remapped(self) -> bool:
        """True when class ids differ from the data set's ids."""
        return self.class_ids != self.dataset_ids

    @classmethod
    def build(cls, categories: list[dict], space: TokenSpace, path_for_errors: str) -> CategoryMap:
        """Builds the map from COCO `categories` entries (`id`, `name`, optional `keypoints`).

        Class id = data-set id when every id is in [1, space.max_class_id];
        otherwise ids are remapped to 1..K in sorted-id order.
        """
        check_categories(categories, path_for_errors)
        ordered = sorted(categories, key=lambda c: c["id"])
        if len(ordered) > space.max_class_id:
            raise DataError(
                path_for_errors,
                f"{len(ordered)} categories but the token space holds {space.max_class_id} classes",
                "raise vocab.coord_shift (and vocab.text_shift with it)",
            )
        dataset_ids = tuple(int(c["id"]) for c in ordered)
        fits = dataset_ids[-1] <= space.max_class_id if dataset_ids else True
        class_ids = dataset_ids if fits else tuple(range(1, len(dataset_ids) + 1))
        keypoint_names: tuple[str, ...] = ()
        for c in ordered:
            if c.get("keypoints"):
                keypoint_names = tuple(str(k) for k in c["keypoints"])
                break
        return cls(
            dataset_ids=dataset_ids,
            names=tuple(str(c.get("name", c["id"])) for c in ordered),
            class_ids=class_ids,
            keypoint_names=keypoint_names,
        )

    def to_class(self, ids: np.ndarray | int) -> np.ndarray:
        """Data-set category ids (any shape) → int32 class ids; unknown ids raise ValueError."""
        keys = np.asarray(self.dataset_ids, np.int64)
        return _lookup(keys, np.asarray(self.class_ids), ids, "category ids")

    def to_dataset_id(self, class_ids: np.ndarray | int) -> np.ndarray:
        """Class ids (any shape) → int32 data-set category ids, for result files."""
        # class_ids are increasing in dataset_ids order (identity or 1..K), so sorted.
        keys = np.asarray(self.class_ids, np.int64)
        return _lookup(keys, np.asarray(self.dataset_ids), class_ids, "class ids")

    def flip_permutation(self, num_keypoints: int) -> np.ndarray:
        """int32[K]: keypoint order after a horizontal flip (left_* ↔ right_*).

        Identity when the data set names no keypoints. COCO person:
        [0, 2, 1, 4, 3, 6, 5, ...].
        """
        names = [n.lower() for n in self.keypoint_names]
        if not names:
            return np.arange(num_keypoints, dtype=np.int32)
        if len(names) != num_keypoints:
            raise ValueError(
                f"the data set names {len(names)} keypoints but config.data.num_keypoints="
                f"{num_keypoints}; set --config.data.num_keypoints={len(names)}"
            )
        index = {n: i for i, n in enumerate(names)}
        return np.array([index.get(_swap_side(n), i) for i, n in enumerate(names)], np.int32)

    def save(self, path: str) -> None:
        """Writes the map as JSON (any tf.io.gfile path)."""
        folder = os.path.dirname(path)
        if folder:
            tf.io.gfile.makedirs(folder)
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: str) -> CategoryMap:
        """Reads a map written by `save`."""
        with tf.io.gfile.GFile(path) as f:
            text = f.read()
        try:
            content = json.loads(text)
            fields = {f.name: tuple(content[f.name]) for f in dataclasses.fields(cls)}
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(
                path, f"not a category map written by CategoryMap.save ({e})", "rerun training"
            ) from e
        return cls(**fields)
