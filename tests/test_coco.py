"""COCO-format JSON source: joins, conversions, errors, category maps, tf.data layout."""

import copy
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils

from unified_seq.data import coco, example
from unified_seq.data.categories import CategoryMap
from unified_seq.data.errors import DataError
from unified_seq.vocab import TokenSpace

K = 17
KEYPOINT_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
]  # fmt: skip
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 4, "name": "box", "supercategory": "shape"},
    {"id": 90, "name": "blob", "supercategory": "shape"},
]
SIZES = {1: (60, 80), 2: (72, 64), 3: (64, 64), 4: (50, 70)}  # image id → (height, width)


def _rect(x, y, w, h):
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _rle(mask, compressed=True):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if compressed:
        return {"size": rle["size"], "counts": rle["counts"].decode()}
    # Uncompressed COCO RLE: run lengths in column-major order, starting with zeros.
    flat = mask.astype(np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def _blob_mask():
    mask = np.zeros(SIZES[2], np.uint8)
    yy, xx = np.mgrid[: SIZES[2][0], : SIZES[2][1]]
    mask[((yy - 30) ** 2 + (xx - 25) ** 2) < 14**2] = 1  # a disc...
    mask[50:60, 40:60] = 1  # ...and a separate bar: two polygons from one mask
    return mask


def _bar_mask():
    mask = np.zeros(SIZES[2], np.uint8)
    mask[2:8, 2:30] = 1
    return mask


def _keypoints(x, y):
    """17 [x, y, v]; keypoints 3 and 4 not labelled."""
    out = []
    for k in range(K):
        out += [0, 0, 0] if k in (3, 4) else [x + k, y + 2 * k, 1 + k % 2]
    return out


def _ann(ann_id, image_id, cat, bbox, seg, crowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox,
            "segmentation": seg, "area": float(bbox[2] * bbox[3]), "iscrowd": crowd}  # fmt: skip


def _content():
    images = [
        {"id": i, "file_name": f"{i:012d}.png", "height": h, "width": w}
        for i, (h, w) in SIZES.items()
    ]
    crowd = np.zeros(SIZES[3], np.uint8)
    crowd[5:60, 5:60] = 1
    instances = [
        _ann(11, 1, 1, [10, 5, 30, 50], [_rect(10, 5, 30, 50)]),
        _ann(12, 1, 4, [50, 30, 20, 20], [_rect(50, 30, 20, 20), _rect(45, 52, 8, 6)]),
        _ann(21, 2, 90, [11, 16, 49, 44], _rle(_blob_mask())),
        _ann(22, 2, 4, [2, 2, 28, 6], _rle(_bar_mask(), compressed=False)),
        _ann(32, 3, 90, [5, 5, 55, 55], _rle(crowd), crowd=1),
    ]
    person = {**instances[0], "keypoints": _keypoints(12, 6), "num_keypoints": 15}
    # Person 31 is only in the keypoint file: it becomes an instance too.
    only_kp = {
        **_ann(31, 3, 1, [30, 8, 24, 50], [_rect(30, 8, 24, 50)]),
        "keypoints": _keypoints(31, 9),
        "num_keypoints": 15,
    }
    captions = [
        {"id": 100 + 10 * i + j, "image_id": i, "caption": f"image {i} caption {j}"}
        for i in SIZES
        for j in range(3 if i != 2 else 2)
    ]
    person_category = {**CATEGORIES[0], "keypoints": KEYPOINT_NAMES, "skeleton": []}
    content = {
        "instances": {"images": images, "annotations": instances, "categories": CATEGORIES},
        "person_keypoints": {
            "images": images,
            "annotations": [person, only_kp],
            "categories": [person_category],
        },
        "captions": {"images": images, "annotations": captions},
    }
    return copy.deepcopy(content)  # tests edit it; the module constants must not change


def _write(root, content, split="train"):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, f"{split}2017"), exist_ok=True)
    for image in content[next(iter(content))]["images"]:
        path = os.path.join(root, f"{split}2017", image["file_name"])
        Image.new("RGB", (image["width"], image["height"]), (90, 120, 30)).save(path)
    for kind, body in content.items():
        with open(coco.annotation_path(root, kind, split), "w") as f:
            json.dump(body, f)
    return str(root)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    content = _content()
    root = _write(tmp_path_factory.mktemp("coco"), content)
    examples, category_map, stats = coco.load_coco_json(root, "train", TokenSpace())
    return content, root, examples, category_map, stats


def _by_id(examples):
    return {int(ex["image/id"]): ex for ex in examples}


def _rasterise(points, h, w):
    """float32[P, 2] (y, x) NaN-separated polygons → bool[h, w] (pycocotools, as COCO eval)."""
    splits = np.flatnonzero(np.isnan(points[:, 0]))
    parts = np.split(points, splits)
    flat = [p[~np.isnan(p[:, 0])][:, ::-1].ravel().tolist() for p in parts]
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(flat, h, w))).astype(bool)


def _iou(a, b):
    return np.sum(a & b) / np.sum(a | b)


def test_examples_follow_the_layout_sorted_by_image_id(loaded):
    _, root, examples, _, _ = loaded
    assert [int(ex["image/id"]) for ex in examples] == [1, 2, 3, 4]
    for ex in examples:
        example.check_example(ex, K)
        assert ex["image/encoded"] == b""
        assert os.path.isabs(ex["image/filename"]) and os.path.exists(ex["image/filename"])
        assert ex["image/filename"].startswith(os.path.join(root, "train2017"))
        assert tuple(ex["image/size"]) == SIZES[int(ex["image/id"])]
        assert ex["image/size"].dtype == np.int32


def test_boxes_classes_and_crowd_are_converted(loaded):
    _, _, examples, category_map, _ = loaded
    ex = _by_id(examples)
    # COCO [x, y, w, h] → [ymin, xmin, ymax, xmax].
    np.testing.assert_array_equal(ex[1]["objects/bbox"], [[5, 10, 55, 40], [30, 50, 50, 70]])
    np.testing.assert_array_equal(ex[1]["objects/id"], [11, 12])
    # Ids 1, 4, 90 fit below coord_shift - 100: used as they are.
    assert not category_map.remapped
    np.testing.assert_array_equal(ex[1]["objects/class"], [1, 4])
    np.testing.assert_array_equal(ex[2]["objects/class"], [90, 4])
    np.testing.assert_array_equal(ex[3]["objects/class"], [90, 1])
    np.testing.assert_array_equal(ex[3]["objects/is_crowd"], [True, False])
    np.testing.assert_array_equal(ex[1]["objects/area"], [1500, 400])
    assert ex[3]["objects/polygons"][0].shape == (0, 2)  # crowd RLE: no polygon needed


def test_polygons_are_y_x_and_joined_by_nan(loaded):
    _, _, examples, _, _ = loaded
    person, box = _by_id(examples)[1]["objects/polygons"]
    np.testing.assert_array_equal(person, [[5, 10], [5, 40], [55, 40], [55, 10]])
    assert box.shape == (9, 2) and box.dtype == np.float32
    assert np.all(np.isnan(box[4])) and not np.any(np.isnan(np.delete(box, 4, 0)))
    np.testing.assert_array_equal(box[:4], [[30, 50], [30, 70], [50, 70], [50, 50]])
    np.testing.assert_array_equal(box[5:], [[52, 45], [52, 53], [58, 53], [58, 45]])


@pytest.mark.parametrize("index,mask_fn", [(0, _blob_mask), (1, _bar_mask)])
def test_rle_masks_become_polygons_that_rasterise_back(loaded, index, mask_fn):
    _, _, examples, _, stats = loaded
    points = _by_id(examples)[2]["objects/polygons"][index]
    h, w = SIZES[2]
    assert _iou(_rasterise(points, h, w), mask_fn().astype(bool)) >= 0.9
    if index == 0:
        assert np.sum(np.isnan(points[:, 0])) == 1  # disc and bar: two polygons
    assert stats["rle_converted"] == 2


def test_large_mask_is_simplified_within_the_point_budget():
    yy, xx = np.mgrid[:400, :500]
    mask = ((yy - 200) ** 2 / 180**2 + (xx - 250) ** 2 / 230**2) < 1
    points = coco.mask_to_points(mask)
    assert len(points) <= coco.MAX_POLYGON_POINTS
    assert _iou(_rasterise(points, 400, 500), mask) >= 0.97


def test_keypoints_join_by_annotation_id(loaded):
    content, _, examples, _, stats = loaded
    ex = _by_id(examples)
    xyv = np.array(content["person_keypoints"]["annotations"][0]["keypoints"]).reshape(K, 3)
    np.testing.assert_array_equal(ex[1]["objects/keypoints"][0], xyv[:, [1, 0, 2]])
    np.testing.assert_array_equal(ex[1]["objects/keypoints"][1], np.zeros([K, 3]))
    # Annotation 31 exists only in the keypoint file: added as an instance.
    np.testing.assert_array_equal(ex[3]["objects/id"], [32, 31])
    np.testing.assert_array_equal(ex[3]["objects/bbox"][1], [8, 30, 58, 54])
    assert ex[3]["objects/keypoints"][1, 0].tolist() == [9, 31, 1]
    assert stats["with_keypoints"] == 2


def test_captions_and_empty_image(loaded):
    _, _, examples, _, stats = loaded
    ex = _by_id(examples)
    assert ex[1]["captions"] == [f"image 1 caption {j}" for j in range(3)]
    assert ex[2]["captions"] == ["image 2 caption 0", "image 2 caption 1"]
    assert len(ex[4]["objects/id"]) == 0 and ex[4]["objects/keypoints"].shape == (0, K, 3)
    assert stats == {
        "images": 4, "objects": 6, "crowd": 1, "with_keypoints": 2, "with_masks": 5,
        "captions": 11, "empty_images": 1, "skipped_images": 0, "rle_converted": 2,
        "dropped_polygons": 0, "dropped_boxes/empty": 0, "dropped_boxes/outside": 0,
        "clipped_boxes": 0, "nan_keypoints": 0, "empty_captions": 0,
    }  # fmt: skip


def test_category_map_keeps_keypoint_names_and_flip_permutation(loaded):
    _, _, _, category_map, _ = loaded
    assert category_map.names == ("person", "box", "blob")
    assert category_map.keypoint_names == tuple(KEYPOINT_NAMES)
    expected = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    np.testing.assert_array_equal(category_map.flip_permutation(K), expected)
    no_names = CategoryMap.build(CATEGORIES, TokenSpace(), "x.json")
    np.testing.assert_array_equal(no_names.flip_permutation(5), np.arange(5))
    with pytest.raises(ValueError, match="num_keypoints"):
        category_map.flip_permutation(5)


def test_ids_above_the_class_range_are_remapped_and_saved(tmp_path):
    space = TokenSpace(coord_shift=120, bins=64, text_shift=200, text_vocab_size=64)
    assert space.max_class_id == 19
    root = _write(tmp_path, _content())
    examples, category_map, _ = coco.load_coco_json(root, "train", space)
    assert category_map.remapped and category_map.class_ids == (1, 2, 3)
    np.testing.assert_array_equal(_by_id(examples)[2]["objects/class"], [3, 2])
    path = str(tmp_path / "run" / "categories.json")
    category_map.save(path)
    loaded_map = CategoryMap.load(path)
    assert loaded_map == category_map
    ids = np.array([[90, 1], [4, 4]])
    np.testing.assert_array_equal(loaded_map.to_dataset_id(loaded_map.to_class(ids)), ids)
    assert int(loaded_map.to_dataset_id(3)) == 90
    with pytest.raises(ValueError, match="unknown"):
        loaded_map.to_class(np.array([5]))


def test_subset_of_files_is_enough(tmp_path):
    content = _content()
    root = _write(tmp_path, {"captions": content["captions"]})
    examples, category_map, stats = coco.load_coco_json(root, "train", TokenSpace())
    assert stats["images"] == 4 and stats["objects"] == 0 and stats["captions"] == 11
    assert category_map.dataset_ids == ()
    assert _by_id(examples)[3]["captions"][0] == "image 3 caption 0"


# --- errors -------------------------------------------------------------------------


def _load_error(root, **kw):
    with pytest.raises(DataError) as info:
        coco.load_coco_json(str(root), "train", TokenSpace(), **kw)
    return str(info.value)


def test_missing_annotations_lists_expected_paths(tmp_path):
    message = _load_error(tmp_path)
    assert "instances_train2017.json" in message and "captions_train2017.json" in message


def test_truncated_json_names_the_file_and_position(tmp_path):
    root = _write(tmp_path, _content())
    path = coco.annotation_path(root, "instances", "train")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])
    message = _load_error(root)
    assert path in message and "not valid JSON" in message and "line 1, column" in message


def _break(tmp_path, kind, edit):
    content = _content()
    edit(content[kind])
    return _write(tmp_path, content)


def test_missing_top_level_key(tmp_path):
    root = _break(tmp_path, "instances", lambda c: c.pop("categories"))
    message = _load_error(root)
    assert "instances_train2017.json" in message and "'categories'" in message


def test_missing_bbox_names_field_and_annotation(tmp_path):
    root = _break(tmp_path, "instances", lambda c: c["annotations"][1].pop("bbox"))
    message = _load_error(root)
    assert "annotation 12" in message and "'bbox'" in message and "instances_train" in message


def test_bad_bbox_length(tmp_path):
    root = _break(tmp_path, "instances", lambda c: c["annotations"][0].update(bbox=[1, 2, 3]))
    message = _load_error(root)
    assert "annotation 11" in message and "4 numbers" in message


def test_bad_keypoint_count(tmp_path):
    def edit(content):
        content["annotations"][0]["keypoints"] = [1, 2, 2] * 5

    message = _load_error(_break(tmp_path, "person_keypoints", edit))
    assert "annotation 11" in message and "51" in message and "num_keypoints" in message


def test_unknown_image_id(tmp_path):
    root = _break(tmp_path, "instances", lambda c: c["annotations"][2].update(image_id=77))
    message = _load_error(root)
    assert "annotation 21" in message and "image_id 77" in message


def test_unknown_category_id(tmp_path):
    root = _break(tmp_path, "instances", lambda c: c["annotations"][2].update(category_id=5))
    message = _load_error(root)
    assert "annotation 21" in message and "category_id 5" in message


@pytest.mark.parametrize("bad_id", [0, -3])
def test_non_positive_category_id(tmp_path, bad_id):
    root = _break(tmp_path, "instances", lambda c: c["categories"][1].update(id=bad_id))
    message = _load_error(root)
    assert "categories[1]" in message and "positive" in message


def test_duplicate_category_id(tmp_path):
    root = _break(tmp_path, "instances", lambda c: c["categories"][2].update(id=4))
    assert "appears twice" in _load_error(root)


def test_missing_image_file_fails_or_is_skipped(tmp_path):
    root = _write(tmp_path, _content())
    missing = os.path.join(root, "train2017", f"{2:012d}.png")
    os.remove(missing)
    message = _load_error(root)
    assert missing in message and "instances_train2017.json" in message
    examples, _, stats = coco.load_coco_json(root, "train", TokenSpace(), on_bad_image="skip")
    assert stats["skipped_images"] == 1 and stats["images"] == 3
    assert [int(ex["image/id"]) for ex in examples] == [1, 3, 4]


@pytest.mark.parametrize(
    "name", ["../outside.png", "/etc/passwd", "a/../../outside.png", "gs://bucket/x.png", ".."]
)
def test_file_names_outside_the_image_folder_are_refused(tmp_path, name):
    root = _write(tmp_path / "data", _content())
    # Written into the JSON only: no file is ever created at the hostile name.
    path = coco.annotation_path(root, "instances", "train")
    with open(path) as f:
        content = json.load(f)
    content["images"][1]["file_name"] = name
    with open(path, "w") as f:
        json.dump(content, f)
    for policy in ("fail", "skip"):
        message = _load_error(root, on_bad_image=policy)
        assert message.startswith(f"{path}: image 2: file_name {name!r} points outside")


def test_file_names_in_subfolders_stay_allowed():
    for name in ("a/b.png", "a/../b.png", "./b.png", "x..y.png"):
        assert coco._inside_image_folder(name), name


def test_missing_image_folder(tmp_path):
    root = _write(tmp_path, _content())
    os.rename(os.path.join(root, "train2017"), os.path.join(root, "elsewhere"))
    message = _load_error(root, on_bad_image="skip")
    assert os.path.join(root, "train2017") in message and "image folder not found" in message


# --- tf.data layout -----------------------------------------------------------------


def test_examples_to_dataset_round_trip(loaded):
    _, _, examples, _, _ = loaded
    ds = coco.examples_to_dataset(examples, K)
    assert isinstance(ds.element_spec["objects/polygons"], tf.RaggedTensorSpec)
    assert ds.element_spec["objects/bbox"] == tf.TensorSpec([None, 4], tf.float32)
    got = list(ds.as_numpy_iterator())
    assert len(got) == len(examples)
    for want, have in zip(examples, got, strict=True):
        for key in example.KEYS:
            if key == "objects/polygons":
                assert have[key].shape[0] == len(want[key])
                for p_want, p_have in zip(want[key], have[key], strict=True):
                    np.testing.assert_array_equal(p_have, p_want)  # NaN rows included
            elif key == "captions":
                assert [c.decode() for c in have[key]] == want[key]
            elif key == "image/filename":
                assert have[key].decode() == want[key]
            elif key == "image/encoded":
                assert have[key] == want[key]
            else:
                np.testing.assert_array_equal(have[key], want[key], err_msg=key)
                assert have[key].dtype == np.asarray(want[key]).dtype, key


def test_examples_to_dataset_inside_map(loaded):
    _, _, examples, _, _ = loaded

    def summary(ex):
        points = tf.reduce_sum(ex["objects/polygons"].row_lengths())
        area = tf.reduce_sum((ex["objects/bbox"][:, 2] - ex["objects/bbox"][:, 0]) *
                             (ex["objects/bbox"][:, 3] - ex["objects/bbox"][:, 1]))  # fmt: skip
        return ex["image/id"], points, area, tf.size(ex["captions"])

    ds = coco.examples_to_dataset(examples, K).map(summary, num_parallel_calls=2)
    got = list(ds.as_numpy_iterator())
    for ex, (image_id, points, area, n_captions) in zip(examples, got, strict=True):
        b = ex["objects/bbox"]
        assert image_id == ex["image/id"]
        assert points == sum(len(p) for p in ex["objects/polygons"])
        assert area == pytest.approx(np.sum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))
        assert n_captions == len(ex["captions"])


def test_examples_to_dataset_of_empty_images_only():
    examples = [
        {"image/id": np.int64(5), "image/filename": "x.png", "image/encoded": b"",
         "image/size": np.array([4, 6], np.int32), **example.empty_objects(K), "captions": []}
    ]  # fmt: skip
    (got,) = list(coco.examples_to_dataset(examples, K).as_numpy_iterator())
    assert got["objects/bbox"].shape == (0, 4) and got["objects/keypoints"].shape == (0, K, 3)
    assert got["objects/polygons"].shape[0] == 0 and got["captions"].shape == (0,)
