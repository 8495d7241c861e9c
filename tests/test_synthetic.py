"""Tests for the embedded synthetic COCO-format data set."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from unified_seq.data import synthetic

SMALL = {"seed": 0, "num_train": 24, "num_val": 8, "image_size": 128}
KINDS = ("instances", "person_keypoints", "captions")


def _files(root) -> dict[str, bytes]:
    """Relative path → bytes of every file under root."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _coco(root, kind: str, split: str) -> COCO:
    return COCO(os.path.join(root, "annotations", f"{kind}_{split}2017.json"))


def _polygon_mask(ann: dict, height: int, width: int) -> np.ndarray:
    rles = mask_utils.frPyObjects(ann["segmentation"], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return synthetic.generate(str(tmp_path_factory.mktemp("synthetic")), **SMALL)


def test_layout_and_determinism(data_dir, tmp_path):
    files = _files(data_dir)
    expected = {f"annotations/{k}_{s}2017.json" for k in KINDS for s in ("train", "val")}
    assert expected <= set(files)
    assert sum(name.startswith("train2017/") for name in files) == SMALL["num_train"]
    assert sum(name.startswith("val2017/") for name in files) == SMALL["num_val"]

    again = _files(synthetic.generate(str(tmp_path / "again"), **SMALL))
    assert again.keys() == files.keys()
    assert all(again[name] == files[name] for name in files)

    other = _files(synthetic.generate(str(tmp_path / "other"), **{**SMALL, "seed": 1}))
    differing = [name for name in files if other.get(name) != files[name]]
    assert "annotations/instances_train2017.json" in differing
    assert sum(name.endswith(".png") for name in differing) >= SMALL["num_train"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_files_load_and_agree(data_dir, split):
    instances = _coco(data_dir, "instances", split)
    keypoints = _coco(data_dir, "person_keypoints", split)
    captions = _coco(data_dir, "captions", split)

    cat_ids = sorted(instances.getCatIds())
    assert cat_ids == [1, 3, 6, 9]
    assert np.any(np.diff(cat_ids) > 1)
    person = keypoints.loadCats(keypoints.getCatIds())
    assert [c["id"] for c in person] == [synthetic.PERSON_ID]
    assert person[0]["keypoints"][:3] == ["nose", "left_eye", "right_eye"]
    assert len(person[0]["keypoints"]) == 17

    image_ids = sorted(instances.getImgIds())
    assert image_ids == sorted(keypoints.getImgIds()) == sorted(captions.getImgIds())
    for image in instances.loadImgs(image_ids):
        with Image.open(os.path.join(data_dir, f"{split}2017", image["file_name"])) as im:
            assert im.size == (image["width"], image["height"])
        for side in (image["height"], image["width"]):
            assert 0.75 * SMALL["image_size"] - 1 <= side <= SMALL["image_size"]
        texts = [a["caption"] for a in captions.loadAnns(captions.getAnnIds([image["id"]]))]
        assert len(texts) == 5 and len(set(texts)) == 5
        assert all(t == t.lower() and t.strip() == t for t in texts)
        assert 1 <= len(instances.getAnnIds([image["id"]])) <= synthetic.MAX_OBJECTS

    person_ids = sorted(instances.getAnnIds(catIds=[synthetic.PERSON_ID]))
    assert person_ids == sorted(keypoints.getAnnIds())
    for ann in keypoints.loadAnns(person_ids):
        points = np.array(ann["keypoints"]).reshape(17, 3)
        assert set(points[:, 2]) <= {0, 1, 2}
        assert np.all(points[points[:, 2] == 0, :2] == 0)
        assert ann["num_keypoints"] == np.sum(points[:, 2] > 0)
        assert ann["segmentation"] == instances.loadAnns([ann["id"]])[0]["segmentation"]


def test_some_keypoints_are_hidden(data_dir):
    flags = []
    for split in ("train", "val"):
        anns = _coco(data_dir, "person_keypoints", split).dataset["annotations"]
        flags += [np.array(a["keypoints"]).reshape(17, 3)[:, 2] for a in anns]
    flags = np.concatenate(flags)
    assert np.sum(flags == 0) > 0 and np.sum(flags == 1) > 0
    assert np.mean(flags == 2) > 0.8


def test_small_vocabulary(data_dir):
    coco = _coco(data_dir, "captions", "train")
    words = {w for a in coco.dataset["annotations"] for w in a["caption"].split()}
    assert 15 <= len(words) <= 60
    assert {"red", "circle", "person", "background"} <= words


def _instance_pixels(pixels: np.ndarray, box: list[float], colors: list[tuple]) -> np.ndarray:
    """bool[H, W]: pixels of the given colours within one pixel of the box."""
    x0, y0 = (max(0, int(np.floor(v)) - 1) for v in box[:2])
    x1, y1 = int(np.ceil(box[0] + box[2])) + 1, int(np.ceil(box[1] + box[3])) + 1
    found = np.zeros(pixels.shape[:2], bool)
    window = pixels[y0:y1, x0:x1]
    for color in colors:
        found[y0:y1, x0:x1] |= np.all(window == np.array(color, np.uint8), axis=-1)
    return found


@pytest.mark.parametrize("split", ["train", "val"])
def test_polygons_match_pixels(data_dir, split):
    instances = _coco(data_dir, "instances", split)
    keypoints = _coco(data_dir, "person_keypoints", split)
    ious, dot_hits = [], []
    for image in instances.loadImgs(instances.getImgIds()):
        path = os.path.join(data_dir, f"{split}2017", image["file_name"])
        pixels = np.asarray(Image.open(path).convert("RGB"))
        h, w = image["height"], image["width"]
        for ann in instances.loadAnns(instances.getAnnIds([image["id"]])):
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
            assert sum(len(p) for p in ann["segmentation"]) <= 2 * 128
            points = np.concatenate([np.reshape(p, (-1, 2)) for p in ann["segmentation"]])
            extent = [*points.min(0), *(points.max(0) - points.min(0))]
            np.testing.assert_allclose(ann["bbox"], extent, atol=1.0)
            assert points[:, 0].max() <= w and points[:, 1].max() <= h  # x-y order

            polygon = _polygon_mask(ann, h, w)
            assert ann["area"] == polygon.sum()
            if ann["category_id"] == synthetic.PERSON_ID:
                colors = list(synthetic.PERSON_COLORS.values())
            else:
                inside = pixels[polygon]
                colors = [c for c in synthetic.COLORS.values() if np.all(inside == c, -1).any()]
                assert len(colors) == 1  # one flat colour per shape
            ious.append(_iou(polygon, _instance_pixels(pixels, ann["bbox"], colors)))

        for ann in keypoints.loadAnns(keypoints.getAnnIds([image["id"]])):
            points = np.array(ann["keypoints"]).reshape(17, 3)
            for x, y, v in points[points[:, 2] > 0]:
                color = synthetic.PERSON_COLORS["visible" if v == 2 else "occluded"]
                dot_hits.append(np.array_equal(pixels[int(y), int(x)], color))
    assert min(ious) >= 0.9
    assert np.mean(ious) >= 0.99
    assert len(dot_hits) > 0 and np.mean(dot_hits) >= 0.99


def test_person_polygon_follows_figure():
    ious = []
    for index in range(40):
        record = synthetic.make_image(3, "train", index, 128)
        for inst in record.instances:
            if inst.figure is None:
                continue
            rle = synthetic.instance_rle(inst, record.height, record.width)
            polygon = mask_utils.decode(rle).astype(bool)
            figure = synthetic.figure_mask(inst.figure, record.height, record.width)
            ious.append(_iou(polygon, figure))
            assert sum(len(p) for p in inst.polygons) <= synthetic.MAX_PERSON_POINTS
    assert len(ious) >= 8
    assert min(ious) >= 0.9


def test_generate_is_idempotent(data_dir):
    stamps = {
        os.path.join(folder, name): os.stat(os.path.join(folder, name)).st_mtime_ns
        for folder, _, names in os.walk(data_dir)
        for name in names
    }
    start = time.perf_counter()
    assert synthetic.generate(data_dir, **SMALL) == data_dir
    assert time.perf_counter() - start < 0.5
    assert all(os.stat(path).st_mtime_ns == stamp for path, stamp in stamps.items())


def test_generate_rewrites_other_parameters(tmp_path):
    out = str(tmp_path / "set")
    synthetic.generate(out, **{**SMALL, "num_train": 4, "num_val": 2})
    synthetic.generate(out, **{**SMALL, "num_train": 6, "num_val": 2})
    with open(os.path.join(out, synthetic.MARKER)) as f:
        assert json.load(f)["num_train"] == 6
    assert len(_coco(out, "instances", "train").getImgIds()) == 6


def _cfg(directory: str = "") -> dict:
    return {"dir": directory, "seed": 0, "num_train": 4, "num_val": 2, "image_size": 64}


def test_ensure_synthetic_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFIED_SEQ_CACHE", str(tmp_path))
    path = synthetic.ensure_synthetic(_cfg())
    assert os.path.dirname(path) == str(tmp_path)
    assert "s0-n4-v2-px64" in os.path.basename(path)
    assert synthetic.ensure_synthetic(_cfg()) == path
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no scratch left behind
    explicit = synthetic.ensure_synthetic(_cfg(str(tmp_path / "mine")))
    assert explicit == str(tmp_path / "mine")
    assert _files(explicit) == _files(path)


def test_ensure_synthetic_loses_race_gracefully(tmp_path, monkeypatch):
    target = str(tmp_path / "shared")
    real_generate = synthetic.generate

    def other_process_wins(out_dir, **kwargs):
        real_generate(target, **kwargs)  # the winner's copy lands first
        return real_generate(out_dir, **kwargs)

    monkeypatch.setattr(synthetic, "generate", other_process_wins)
    assert synthetic.ensure_synthetic(_cfg(target)) == target
    assert os.listdir(tmp_path) == ["shared"]


def test_ensure_synthetic_concurrent_calls(tmp_path):
    target = str(tmp_path / "shared")
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(synthetic.ensure_synthetic(_cfg(target))))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target, target]
    assert os.listdir(tmp_path) == ["shared"]
    assert len(_coco(target, "instances", "train").getImgIds()) == 4


# --- worlds and the tune split ----------------------------------------------------------

# Digest of generate(seed=0, num_train=4, num_val=2, image_size=128) as made before the
# varied world and the tune split existed: the plain default must not change.
PLAIN_DIGEST = "4cb369584bae0b6ce069dfdd587ab32c7d276dc5cfab140a607b35b46390bffa"
VARIED = {"seed": 3, "num_train": 6, "num_val": 3, "num_tune": 3, "image_size": 128}
VARIED_SPLITS = ("train", "val", "tune")


def _digest(root: str) -> str:
    """sha256 over every file's path and content, PNGs by their decoded pixels (so the
    digest does not depend on the PNG encoder's version)."""
    digest = hashlib.sha256()
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            if name.endswith(".png"):
                pixels = np.asarray(Image.open(path).convert("RGB"))
                digest.update(str(pixels.shape).encode() + pixels.tobytes())
            else:
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def test_plain_set_is_unchanged(tmp_path):
    root = synthetic.generate(str(tmp_path), seed=0, num_train=4, num_val=2, image_size=128)
    assert _digest(root) == PLAIN_DIGEST


@pytest.fixture(scope="module")
def varied_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("varied"))
    return synthetic.generate(out, **VARIED, variety="varied")


@pytest.fixture(scope="module")
def varied_records() -> list[synthetic.ImageRecord]:
    return [synthetic.make_image(0, "train", i, 128, "varied") for i in range(80)]


def test_varied_layout_determinism_and_tune_split(varied_dir, tmp_path):
    files = _files(varied_dir)
    expected = {f"annotations/{k}_{s}2017.json" for k in KINDS for s in VARIED_SPLITS}
    assert expected <= set(files)
    for split in VARIED_SPLITS:
        assert sum(n.startswith(f"{split}2017/") for n in files) == VARIED[f"num_{split}"]
    with open(os.path.join(varied_dir, synthetic.MARKER)) as f:
        marker = json.load(f)
    assert marker["variety"] == "varied" and marker["num_tune"] == VARIED["num_tune"]

    again = _files(synthetic.generate(str(tmp_path / "again"), **VARIED, variety="varied"))
    assert again == files

    ids = {s: sorted(_coco(varied_dir, "instances", s).getImgIds()) for s in VARIED_SPLITS}
    assert ids["tune"][0] == ids["val"][-1] + 1  # after val's, so ids never collide
    pixels = {
        split: [n for n in files if n.startswith(f"{split}2017/")] for split in ("val", "tune")
    }
    val_images = {files[n] for n in pixels["val"]}
    assert not val_images & {files[n] for n in pixels["tune"]}  # its own random stream


def test_tune_split_reads_like_val(varied_dir):
    from unified_seq.data import coco
    from unified_seq.vocab import TokenSpace

    loaded = {s: coco.load_coco_json(varied_dir, s, TokenSpace()) for s in ("val", "tune")}
    (val, val_map, _), (tune, tune_map, tune_stats) = loaded["val"], loaded["tune"]
    assert tune_map == val_map
    assert tune_stats["images"] == len(tune) == VARIED["num_tune"]
    assert {int(e["image/id"]) for e in val}.isdisjoint(int(e["image/id"]) for e in tune)


def test_varied_images_vary(varied_records):
    sides = np.array([(r.height, r.width) for r in varied_records])
    assert sides.max(1).min() >= 159 and sides.max(1).max() <= 401
    aspect = sides[:, 1] / sides[:, 0]
    assert aspect.min() >= 0.49 and aspect.max() <= 2.01
    assert aspect.min() < 0.7 and aspect.max() > 1.4
    objects = [sum(not i.iscrowd for i in r.instances) for r in varied_records]
    persons = [sum(i.figure is not None for i in r.instances) for r in varied_records]
    assert min(objects) == 0 and max(objects) == synthetic.VARIED.max_objects
    assert max(persons) >= 2
    assert {r.texture for r in varied_records} == set(synthetic.TEXTURES)
    sizes = [np.sqrt(i.bbox[2] * i.bbox[3]) for r in varied_records for i in r.instances]
    assert min(sizes) < 12 and max(sizes) > 150


def _is_whole_shape(inst: synthetic.Instance) -> bool:
    """Whether a shape's polygon is still the regular polygon it was drawn as (not traced)."""
    vertices = {3: synthetic.CIRCLE_VERTICES, 6: 4, 9: 3}[inst.category_id]
    return len(inst.polygons) == 1 and len(inst.polygons[0]) == vertices


def test_varied_polygons_are_the_painted_visible_parts(varied_records):
    ious, occluded = [], 0
    for r in varied_records:
        for k, inst in enumerate(r.instances):
            painted = r.owner == k
            written = mask_utils.decode(synthetic.instance_rle(inst, r.height, r.width)) > 0
            ious.append(_iou(written, painted))
            if inst.figure is None:
                assert np.all(r.pixels[painted] == synthetic.COLORS[inst.color])
            else:
                colors = [synthetic.PERSON_COLORS[c] for c in ("body", "left")]
                on_person = [np.all(r.pixels[painted] == c, -1) for c in colors]
                assert np.all(on_person[0] | on_person[1])
            if inst.iscrowd:
                continue
            x, y, w, h = inst.bbox
            points = np.concatenate(inst.polygons)
            np.testing.assert_allclose([x, y, w, h], [*points.min(0), *np.ptp(points, 0)])
            in_frame = x >= 1 and y >= 1 and x + w <= r.width - 1 and y + h <= r.height - 1
            if inst.figure is None and not _is_whole_shape(inst) and in_frame:
                occluded += 1
    assert occluded >= 10
    assert min(ious) >= synthetic.VARIED.min_agreement
    assert np.mean(ious) >= 0.98


def test_varied_files_agree_with_pixels(varied_dir):
    ious = []
    for split in VARIED_SPLITS:
        instances = _coco(varied_dir, "instances", split)
        for image in instances.loadImgs(instances.getImgIds()):
            path = os.path.join(varied_dir, f"{split}2017", image["file_name"])
            pixels = np.asarray(Image.open(path).convert("RGB"))
            h, w = image["height"], image["width"]
            for ann in instances.loadAnns(instances.getAnnIds([image["id"]])):
                if ann["iscrowd"]:
                    continue
                assert sum(len(p) for p in ann["segmentation"]) <= 2 * 128
                polygon = _polygon_mask(ann, h, w)
                assert ann["area"] == polygon.sum()
                if ann["category_id"] == synthetic.PERSON_ID:
                    colors = [synthetic.PERSON_COLORS[c] for c in ("body", "left")]
                else:  # touching shapes get different colours: the majority is its own
                    inside = pixels[polygon]
                    votes = [np.all(inside == c, -1).sum() for c in synthetic.COLORS.values()]
                    colors = [list(synthetic.COLORS.values())[int(np.argmax(votes))]]
                ious.append(_iou(polygon, _instance_pixels(pixels, ann["bbox"], colors)))
    assert len(ious) >= 30
    assert min(ious) >= 0.9


def test_varied_persons_have_no_dots_and_labelled_keypoints(varied_records):
    flags, on_person, facing = [], [], set()
    for r in varied_records:
        for color in ("visible", "occluded"):
            assert not np.any(np.all(r.pixels == synthetic.PERSON_COLORS[color], -1))
        for k, inst in enumerate(r.instances):
            if inst.figure is None:
                continue
            v = inst.figure.visibility
            flags.append(v)
            x, y = inst.figure.keypoints.T
            inside = (x >= 0) & (y >= 0) & (x < r.width) & (y < r.height)
            assert np.all((v == 0) == ~inside)
            shown = v == 2
            rows, cols = y[shown].astype(int), x[shown].astype(int)
            on_person += list(r.owner[rows, cols] == k)
            facing.add(bool(x[5] > x[6]))  # left shoulder right of the right one: front view
    flags = np.concatenate(flags)
    assert np.sum(flags == 1) > 0 and np.sum(flags == 0) > 0 and np.mean(flags == 2) > 0.6
    assert np.mean(on_person) >= 0.95
    assert facing == {True, False}  # some figures seen from behind, mirrored


def test_varied_crowd_regions_are_coco_crowds(varied_dir):
    from unified_seq.data import coco
    from unified_seq.vocab import TokenSpace

    crowds = []
    for split in VARIED_SPLITS:
        instances = _coco(varied_dir, "instances", split)
        keypoint_ids = set(_coco(varied_dir, "person_keypoints", split).getAnnIds())
        for ann in instances.loadAnns(instances.getAnnIds(iscrowd=True)):
            image = instances.loadImgs([ann["image_id"]])[0]
            h, w = image["height"], image["width"]
            seg = ann["segmentation"]
            assert seg["size"] == [h, w] and isinstance(seg["counts"], list)
            mask = mask_utils.decode(mask_utils.frPyObjects(seg, h, w))
            assert ann["area"] == mask.sum() > 0
            np.testing.assert_allclose(ann["bbox"], mask_utils.toBbox(mask_utils.encode(mask)))
            assert ann["category_id"] in synthetic.SHAPE_IDS.values()
            assert ann["id"] not in keypoint_ids
            crowds.append((split, ann["id"]))
    assert crowds
    split, ann_id = crowds[0]
    examples, _, stats = coco.load_coco_json(varied_dir, split, TokenSpace())
    assert stats["crowd"] >= 1
    for ex in examples:
        index = list(ex["objects/id"]).index(ann_id) if ann_id in ex["objects/id"] else None
        if index is not None:
            assert ex["objects/is_crowd"][index] and len(ex["objects/polygons"][index]) == 0


def test_varied_captions_are_five_and_true(varied_records):
    numbers = {word: n for n, word in synthetic.NUMBER_WORDS.items()}
    for r in varied_records:
        texts = synthetic.captions(r)
        assert len(texts) == 5 and len(set(texts)) == 5
        assert all(t == t.lower() and t.strip() == t for t in texts)
        shapes = [i for i in r.instances if i.figure is None and not i.iscrowd]
        count = texts[2]  # "there are two shapes and ...", "there is a person and no shapes"
        told = 0 if "no shapes" in count or "no objects" in count else numbers[count.split()[2]]
        assert told == len(shapes), count
        assert r.texture in texts[0] and r.background in texts[0]
        named = {c for c in synthetic.COLORS if f" {c} " in f" {texts[0]} "}
        assert named <= {i.color for i in r.instances if i.figure is None}


def test_varied_options_name_their_own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFIED_SEQ_CACHE", str(tmp_path))
    plain = synthetic.ensure_synthetic({**_cfg(), "num_tune": 0, "variety": "plain"})
    assert os.path.basename(plain) == "synthetic-g1-s0-n4-v2-px64"  # as before the options
    with open(os.path.join(plain, synthetic.MARKER)) as f:
        assert set(json.load(f)) == {"generator_version", "seed", "num_train", "num_val",
                                     "image_size"}  # fmt: skip
    varied = synthetic.ensure_synthetic({**_cfg(), "num_tune": 1, "variety": "varied"})
    assert os.path.basename(varied) == "synthetic-g1-s0-n4-v2-px64-t1-varied"
    assert len(_coco(varied, "instances", "tune").getImgIds()) == 1
    with pytest.raises(ValueError, match="variety"):
        synthetic.ensure_synthetic({**_cfg(), "variety": "fancy"})
