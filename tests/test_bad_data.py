"""Hostile and broken COCO-format inputs: each a clear DataError or a counted skip.

Every case of the battery starts from the good fixture (tests/coco_fixture.py)
and breaks one thing; the expected outcome is a one-line DataError naming the
file and the offending field or id, or exact counts in the load stats.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import resource
import stat
import struct
import time
import zlib
from collections.abc import Callable

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from tests import coco_fixture
from unified_seq import defaults, vocab
from unified_seq.data import checks, coco, image_decode, inputs, pipeline, views
from unified_seq.data.errors import DataError
from unified_seq.tasks import build_tasks

SIZE = 64
TRAIN = "train"


def _config(root: str, **data) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 3
    config.vocab = defaults.vocab_config()
    config.vocab.update(coord_shift=200, bins=64, text_shift=264, text_vocab_size=256)
    config.data = defaults.data_config()
    config.data.update(source="coco_json", coco_dir=root, image_size=SIZE, shuffle_buffer=8)
    config.data.update(data)
    config.tasks = defaults.task_configs()
    config.tasks.object_detection.max_instances = 4
    config.tasks.instance_segmentation.max_points = 16
    config.tasks.captioning.max_len = 12
    config.tasks.captioning.captions_per_image = 2
    return config


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # One cache for the file: a tokenizer trained on the fixture's captions is reused.
    monkeypatch.setenv("UNIFIED_SEQ_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# --- ways to break the fixture --------------------------------------------------------


def _ann_path(root: str, kind: str) -> str:
    return coco.annotation_path(root, kind, TRAIN)


def _image_path(root: str, image_id: int, ext: str = "png") -> str:
    return os.path.join(root, f"{TRAIN}2017", f"{image_id:012d}.{ext}")


def _edit(kind: str, fn: Callable[[dict], None]) -> Callable[[str], None]:
    def mutate(root: str) -> None:
        with open(_ann_path(root, kind)) as f:
            content = json.load(f)
        fn(content)
        with open(_ann_path(root, kind), "w") as f:
            json.dump(content, f)  # writes NaN and Infinity as json.loads reads them

    return mutate


def _ann(content: dict, ann_id: int) -> dict:
    return next(a for a in content["annotations"] if a.get("id") == ann_id)


def _set_ann(kind: str, ann_id: int, **fields) -> Callable[[str], None]:
    return _edit(kind, lambda c: _ann(c, ann_id).update(fields))


def _every_file(fn: Callable[[dict], None]) -> Callable[[str], None]:
    def mutate(root: str) -> None:
        for kind in coco.KINDS:
            _edit(kind, fn)(root)

    return mutate


def _set_image(image_id: int, **fields) -> Callable[[dict], None]:
    def fn(content: dict) -> None:
        next(im for im in content["images"] if im["id"] == image_id).update(fields)

    return fn


def _write_bytes(image_id: int, data: bytes | Callable[[bytes], bytes]) -> Callable[[str], None]:
    def mutate(root: str) -> None:
        path = _image_path(root, image_id)
        with open(path, "rb") as f:
            old = f.read()
        with open(path, "wb") as f:
            f.write(data(old) if callable(data) else data)

    return mutate


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(height: int = 20000, width: int = 20000) -> bytes:
    """A 70-byte PNG whose header declares height x width RGB pixels (its data is a stub)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _chunk(b"IEND", b""))  # fmt: skip


def zero_png(height: int, width: int, rows: int = 100) -> bytes:
    """A valid PNG of black pixels, about 1/1000 of its decoded size: a real bomb.

    Deflate blocks ended by a full flush do not refer back, so one block of
    `rows` rows is repeated; the zlib checksum of n zeros is (n mod 65521, 1).
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(b"\0" * ((1 + 3 * width) * rows))
    block += compressor.flush(zlib.Z_FULL_FLUSH)
    raw = block * (height // rows) + compressor.flush(zlib.Z_FINISH)
    adler = (((1 + 3 * width) * height % 65521) << 16) | 1
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = b"\x78\x01" + raw + struct.pack(">I", adler)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))  # fmt: skip


def asymmetric(height: int, width: int) -> np.ndarray:
    """An image no flip or turn maps onto itself: gradients plus a corner block."""
    yy, xx = np.mgrid[:height, :width]
    pixels = np.stack([255 * yy / height, 255 * xx / width, np.full_like(yy, 60.0)], -1)
    pixels[: height // 3, : width // 4] = [250, 250, 250]
    return pixels.astype(np.uint8)


def exif_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def _rotated_jpeg(root: str) -> None:
    # Stored 80 high and 60 wide, tagged "turn 90° clockwise": shown 60 x 80, as listed.
    with open(_image_path(root, 1, "jpg"), "wb") as f:
        f.write(exif_jpeg(asymmetric(80, 60), 6))
    os.remove(_image_path(root, 1))
    _every_file(_set_image(1, file_name=f"{1:012d}.jpg"))(root)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _remove(path_fn: Callable[[str], str]) -> Callable[[str], None]:
    return lambda root: os.remove(path_fn(root))


def _truncate_json(root: str) -> None:
    path = _ann_path(root, "instances")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])


def _short_polygons(content: dict) -> None:
    for ann in content["annotations"]:
        if not ann.get("iscrowd"):
            ann["segmentation"] = [[1, 2, 3, 4]]  # 2 points each, RLE included


def _blank_captions(content: dict) -> None:
    for k, ann in enumerate(content["annotations"]):
        ann["caption"] = ["", "   ", "\n\t"][k % 3]


def _blank_captions_of(image_id: int) -> Callable[[dict], None]:
    def fn(content: dict) -> None:
        for ann in content["annotations"]:
            if ann["image_id"] == image_id:
                ann["caption"] = " "

    return fn


def _keypoint_nan(content: dict) -> None:
    _ann(content, 11)["keypoints"][0] = math.nan


# --- the battery ----------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One fault and what it must give.

    stage: `coco` (coco.load_coco_json), `split` (inputs.load_split), `tasks`
      (load_split, then inputs.check_task_examples) or `eval` (one batch of
      the detection evaluation pipeline).
    error: substrings of the DataError (None: no error, check `counts`).
    counts: exact values in the stats.
    """

    name: str
    mutate: Callable[[str], None]
    stage: str
    error: tuple[str, ...] | None = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    data: dict = dataclasses.field(default_factory=dict)
    train_tokenizer: bool = False


INSTANCES = "instances_train2017.json"
KEYPOINTS = "person_keypoints_train2017.json"
CAPTIONS = "captions_train2017.json"
IMAGE2 = f"{2:012d}.png"

CASES = [
    Case("malformed_json", _truncate_json, "coco", (INSTANCES, "not valid JSON", "line 1")),
    Case("missing_top_level_key", _edit("captions", lambda c: c.pop("annotations")), "coco",
         (CAPTIONS, "missing top-level key 'annotations'")),
    Case("top_level_not_object", lambda r: _write_text(_ann_path(r, "captions"), "[]"), "coco",
         (CAPTIONS, "top level is not a JSON object")),
    Case("unknown_category_id", _set_ann("instances", 12, category_id=5), "coco",
         (INSTANCES, "annotation 12", "category_id 5")),
    Case("duplicate_category_id", _edit("instances", lambda c: c["categories"][2].update(id=4)),
         "coco", (INSTANCES, "category id 4 appears twice")),
    Case("bbox_not_4_numbers", _set_ann("instances", 12, bbox=[1, 2, 3]), "coco",
         (INSTANCES, "annotation 12", "'bbox' must be 4 numbers")),
    Case("bbox_string", _set_ann("instances", 12, bbox=["50", 30, 20, 20]), "coco",
         (INSTANCES, "annotation 12", "'bbox' must be 4 numbers")),
    Case("bbox_nan", _set_ann("instances", 12, bbox=[math.nan, 30, 20, 20]), "coco",
         (INSTANCES, "annotation 12", "'bbox'", "non-finite")),
    Case("bbox_infinity", _set_ann("instances", 22, bbox=[2, 45, math.inf, 20]), "coco",
         (INSTANCES, "annotation 22", "'bbox'", "non-finite")),
    Case("area_nan", _set_ann("instances", 12, area=math.nan), "coco",
         (INSTANCES, "annotation 12", "'area'")),
    Case("annotation_id_twice", _set_ann("instances", 12, id=11), "coco",
         (INSTANCES, "annotation 11", "appears twice")),
    Case("negative_width", _set_ann("instances", 12, bbox=[50, 30, -20, 20]), "coco",
         counts={"dropped_boxes/empty": 1, "objects": 5}),
    Case("zero_height", _set_ann("instances", 22, bbox=[2, 45, 16, 0]), "coco",
         counts={"dropped_boxes/empty": 1, "objects": 5}),
    Case("keypoint_person_without_area", _set_ann("instances", 11, bbox=[10, 5, 0, 50]), "coco",
         counts={"dropped_boxes/empty": 1, "with_keypoints": 1}),
    Case("box_entirely_outside", _set_ann("instances", 12, bbox=[500, 400, 20, 20]), "coco",
         counts={"dropped_boxes/outside": 1, "objects": 5, "clipped_boxes": 0}),
    Case("box_partly_outside", _set_ann("instances", 12, bbox=[70, 30, 20, 20]), "coco",
         counts={"clipped_boxes": 1, "objects": 6, "dropped_boxes/outside": 0}),
    Case("box_negative_corner", _set_ann("instances", 11, bbox=[-5, -5, 30, 50]), "coco",
         counts={"clipped_boxes": 1, "objects": 6}),
    Case("wrong_keypoint_length", _set_ann("person_keypoints", 11, keypoints=[1, 2, 2] * 5),
         "coco", (KEYPOINTS, "annotation 11", "'keypoints'", "51", "num_keypoints")),
    Case("nan_keypoint", _edit("person_keypoints", _keypoint_nan), "coco",
         counts={"nan_keypoints": 1, "with_keypoints": 2}),
    Case("polygon_nan", _set_ann("instances", 22, segmentation=[[2, 45, math.nan, 45, 18, 65]]),
         "coco", counts={"dropped_polygons": 1, "with_masks": 4}),
    Case("image_id_not_in_images", _set_ann("instances", 21, image_id=77), "coco",
         (INSTANCES, "annotation 21", "image_id 77 is not in 'images'")),
    Case("caption_image_id_not_in_images", _set_ann("captions", 100, image_id=99), "coco",
         (CAPTIONS, "image_id 99 is not in 'images'")),
    Case("duplicate_image_id", _edit("instances", _set_image(2, id=1)), "coco",
         (INSTANCES, "image id 1 appears twice")),
    Case("one_id_two_file_names", _edit("captions", _set_image(3, file_name="other.png")),
         "coco", (CAPTIONS, "image 3", "'other.png'", "differs")),
    Case("height_not_integer", _edit("instances", _set_image(2, height="72")), "coco",
         (INSTANCES, "image 2", "height/width")),
    Case("file_name_dot_dot", _edit("instances", _set_image(2, file_name="../x.png")), "coco",
         (INSTANCES, "image 2", "'../x.png'", "outside")),
    Case("file_name_absolute", _edit("instances", _set_image(2, file_name="/etc/passwd")),
         "coco", (INSTANCES, "image 2", "'/etc/passwd'", "outside")),
    Case("file_name_url", _edit("instances", _set_image(2, file_name="https://a.b/c.png")),
         "coco", (INSTANCES, "image 2", "https://a.b/c.png", "outside")),
    Case("no_annotation_file", lambda r: [os.remove(_ann_path(r, k)) for k in coco.KINDS],
         "coco", ("annotations", "no annotation file for split 'train'")),
    Case("annotation_file_over_limit", lambda r: None, "split",
         (INSTANCES, "bytes", "data.max_annotation_bytes=1,000"),
         data={"max_annotation_bytes": 1000}),
    Case("missing_image_fail", _remove(lambda r: _image_path(r, 2)), "split",
         (IMAGE2, "image file not found", "on_bad_image=skip")),
    Case("missing_image_skip", _remove(lambda r: _image_path(r, 2)), "split",
         counts={"skipped_images": 1, "images": 3}, data={"on_bad_image": "skip"}),
    Case("zero_byte_image_fail", _write_bytes(2, b""), "split",
         (IMAGE2, "image cannot be decoded", "on_bad_image=skip")),
    Case("zero_byte_image_skip", _write_bytes(2, b""), "split",
         counts={"skipped_images": 1, "undecodable_images": 1, "too_large_images": 0},
         data={"on_bad_image": "skip"}),
    Case("truncated_png_fail", _write_bytes(2, lambda b: b[: len(b) // 2]), "split",
         (IMAGE2, "image cannot be decoded")),
    Case("truncated_png_skip", _write_bytes(2, lambda b: b[: len(b) // 2]), "split",
         counts={"skipped_images": 1, "undecodable_images": 1}, data={"on_bad_image": "skip"}),
    Case("two_bad_images_named_at_once",
         lambda r: [_write_bytes(i, b"")(r) for i in (2, 4)], "split",
         (IMAGE2, "1 more of the split's 4 images cannot be used", f"{4:012d}.png")),
    Case("pixel_bomb_fail", _write_bytes(2, bomb_png()), "split",
         (IMAGE2, "declares 20000x20000 pixels", "data.max_image_pixels=50000000")),
    Case("pixel_bomb_skip", _write_bytes(2, bomb_png()), "split",
         counts={"skipped_images": 1, "too_large_images": 1, "undecodable_images": 0},
         data={"on_bad_image": "skip"}),
    Case("pixel_bomb_in_pipeline", _write_bytes(2, bomb_png()), "eval",
         (IMAGE2, "declares 20000x20000 pixels", "data.max_image_pixels"),
         data={"check_images": False}),
    Case("pixel_limit_lowered", lambda r: None, "split",
         ("declares", "more than data.max_image_pixels=4000"), data={"max_image_pixels": 4000}),
    Case("undecodable_in_pipeline", _write_bytes(2, b"\0\1 not an image"), "eval",
         (IMAGE2, "image cannot be decoded"), data={"check_images": False}),
    Case("exif_rotated_jpeg", _rotated_jpeg, "eval", counts={"size_mismatch": 0}),
    Case("json_size_disagrees", _every_file(_set_image(4, height=55)), "split",
         counts={"size_mismatch": 1}),
    Case("no_keypoint_file", _remove(lambda r: _ann_path(r, "person_keypoints")), "tasks",
         ("keypoint_detection", "no instance has labelled keypoints",
          f"{KEYPOINTS} does not exist")),
    Case("all_polygons_short", _edit("instances", _short_polygons), "tasks",
         ("instance_segmentation", "no instance has a polygon of >= 3 points", "5 shorter")),
    Case("no_usable_box", _every_file(lambda c: c.update(annotations=[])
                                      if "categories" in c else None), "tasks",
         ("object_detection: no image can train this task: no object outside crowd regions",
          "keypoint_detection: ", "instance_segmentation: ")),
    Case("all_captions_empty", _edit("captions", _blank_captions), "split",
         (CAPTIONS, "no non-empty caption", "tokenizer_path"), train_tokenizer=True),
    Case("one_image_blank_captions", _edit("captions", _blank_captions_of(2)), "tasks",
         counts={"empty_captions": 3, "captions": 15, "usable_images/captioning": 3},
         train_tokenizer=True),
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tok"))
    coco_fixture.write_fixture(root, TRAIN)
    config = _config(root)
    space = vocab.TokenSpace.from_config(config.vocab)
    return inputs.load_tokenizer(config, space)


def _run(case: Case, root: str, tokenizer) -> dict:
    """Runs a case's stage; returns its stats (raises what it raises)."""
    config = _config(root, **case.data)
    space = vocab.TokenSpace.from_config(config.vocab)
    if case.stage == "coco":
        _, _, stats = coco.load_coco_json(root, TRAIN, space)
        return stats
    data = inputs.load_split(config, TRAIN, space, None if case.train_tokenizer else tokenizer)
    if case.stage == "tasks":
        inputs.check_task_examples(config, data)
    if case.stage == "eval":
        task = build_tasks(config)["object_detection"]
        ds = pipeline.eval_dataset(task, data.examples, data, config, batch_size=8)
        (batch,) = list(inputs.numpy_batches(ds, data))
        sizes = zip(batch["image/id"].tolist(), batch["image/size"].tolist(), strict=True)
        data.stats["eval_sizes"] = dict(sizes)
    return data.stats


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case, tmp_path, tokenizer):
    root = str(tmp_path / "data")
    coco_fixture.write_fixture(root, TRAIN)
    case.mutate(root)
    if case.error is not None:
        with pytest.raises(DataError) as info:
            _run(case, root, tokenizer)
        message = str(info.value)
        for part in case.error:
            assert part in message, (part, message)
        assert "\n" not in message and "function_node" not in message, message
        return
    stats = _run(case, root, tokenizer)
    assert {k: stats.get(k) for k in case.counts} == case.counts, stats
    if case.name == "exif_rotated_jpeg":
        assert stats["eval_sizes"][1] == [60, 80]  # shown upright, as the JSON lists it


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


def test_clipped_box_and_nan_keypoint_values(tmp_path):
    root = str(tmp_path)
    coco_fixture.write_fixture(root, TRAIN)
    _set_ann("instances", 12, bbox=[70, 30, 20, 20])(root)
    _edit("person_keypoints", _keypoint_nan)(root)
    examples, _, _ = coco.load_coco_json(root, TRAIN, vocab.TokenSpace())
    first = examples[0]
    # Image 1 is 80 wide: x 70..90 becomes 70..80.
    np.testing.assert_array_equal(first["objects/bbox"][1], [30, 70, 50, 80])
    assert first["objects/keypoints"][0, 0].tolist() == [0, 0, 0]
    assert first["objects/keypoints"][0, 1, 2] > 0


# --- pixel bombs never decoded ----------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def test_zero_png_is_a_valid_image():
    image = tf.io.decode_png(zero_png(300, 20, rows=100)).numpy()
    assert image.shape == (300, 20, 3) and not image.any()


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_pixel_bomb_is_refused_quickly_without_allocating(tmp_path, tokenizer, policy):
    root = str(tmp_path)
    coco_fixture.write_fixture(root, TRAIN)
    _write_bytes(2, zero_png(20000, 20000))(root)  # 1.2 MB; 1.2 GB decoded
    config = _config(root, on_bad_image=policy)
    space = vocab.TokenSpace.from_config(config.vocab)
    before, start = _peak_rss_mb(), time.perf_counter()
    if policy == "fail":
        with pytest.raises(DataError, match="declares 20000x20000 pixels"):
            inputs.load_split(config, TRAIN, space, tokenizer)
    else:
        data = inputs.load_split(config, TRAIN, space, tokenizer)
        assert data.stats["too_large_images"] == 1 and data.num_images == 3
    # Decoding it would fill 1.2 GB (20000 x 20000 x 3).
    assert _peak_rss_mb() - before < 300
    assert time.perf_counter() - start < 10


def test_declared_sizes_of_each_format():
    pixels = asymmetric(24, 40)
    webp = [("WEBP", {}), ("WEBP", {"lossless": True}), ("WEBP", {"exif": Image.Exif()})]
    for fmt, options in [("PNG", {}), ("GIF", {}), ("BMP", {}), ("JPEG", {}), *webp]:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt, **options)
        hw = image_decode.declared_size(buf.getvalue()).numpy().tolist()
        assert hw == [24, 40], (fmt, options, buf.getvalue()[12:16])
    # A top-down BMP has a negative height.
    bmp = bytearray(_bmp(pixels))
    bmp[22:26] = struct.pack("<i", -24)
    assert image_decode.declared_size(bytes(bmp)).numpy().tolist() == [24, 40]
    assert image_decode.declared_size(bomb_png(7, 9)).numpy().tolist() == [7, 9]
    for unknown in (b"", b"RIFF....WEBP", b"\x89PNG\r\n\x1a\n not a header"):
        assert image_decode.declared_size(unknown).numpy().tolist() == [-1, -1]


def _bmp(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "BMP")
    return buf.getvalue()


# --- EXIF orientation -------------------------------------------------------------------


def _decode_tf(data: bytes) -> np.ndarray:
    example = {"image/encoded": tf.constant(data), "image/filename": tf.constant("x.jpg")}
    return np.round(views.decode_image(example).numpy() * 255).astype(np.int16)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(orientation):
    data = exif_jpeg(asymmetric(24, 40), orientation)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got = _decode_tf(data)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 3  # JPEG decoders differ by a level or two
    if orientation > 1:  # and the turn or flip is really applied
        plain = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
        assert plain.shape != got.shape or np.abs(got - plain).mean() > 20


def test_orientation_is_a_stateless_branch():
    # A stateful branch op makes tf.data log a warning per image under symbolic
    # checkpointing (tens of thousands of lines in the default run).
    specs = tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int64)
    graph = tf.function(image_decode.orient).get_concrete_function(*specs).graph
    kinds = {op.type for op in graph.get_operations()}
    assert "StatelessCase" in kinds and "Case" not in kinds


def test_big_endian_exif_after_jfif():
    """An "MM" TIFF block in an APP1 segment that follows JFIF's APP0."""
    buf = io.BytesIO()
    Image.fromarray(asymmetric(24, 40)).save(buf, "JPEG", quality=95)
    plain = buf.getvalue()
    assert plain[2:4] == b"\xff\xe0"  # PIL writes JFIF first
    app0_end = 4 + int.from_bytes(plain[4:6], "big")
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, 8, 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + b"\0" * 4
    body = b"Exif\0\0" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    data = plain[:app0_end] + app1 + plain[app0_end:]
    assert int(image_decode.exif_orientation(data)) == 8
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert want.shape == (40, 24, 3)
    assert np.abs(_decode_tf(data) - want).mean() < 3


def test_orientation_of_other_formats_is_upright():
    buf = io.BytesIO()
    Image.fromarray(asymmetric(8, 12)).save(buf, "PNG")
    assert int(image_decode.exif_orientation(buf.getvalue())) == 1
    assert int(image_decode.exif_orientation(b"\xff\xd8\xff\xe1\x00")) == 1  # cut short


# --- tasks without any example ----------------------------------------------------------


def test_training_pipeline_of_a_task_without_examples_raises_not_stops(tmp_path, tokenizer):
    root = str(tmp_path)
    coco_fixture.write_fixture(root, TRAIN)
    os.remove(_ann_path(root, "person_keypoints"))
    config = _config(root)
    space = vocab.TokenSpace.from_config(config.vocab)
    data = inputs.load_split(config, TRAIN, space, tokenizer)
    task = build_tasks(config)["keypoint_detection"]
    with pytest.raises(DataError, match=f"{KEYPOINTS} does not exist"):
        pipeline.train_dataset(task, data.examples, data, config, batch_size=2, seed=0)


def test_usable_images_are_counted_per_task(tmp_path, tokenizer):
    root = str(tmp_path)
    coco_fixture.write_fixture(root, TRAIN)
    config = _config(root)
    space = vocab.TokenSpace.from_config(config.vocab)
    data = inputs.load_split(config, TRAIN, space, tokenizer)
    counts = inputs.check_task_examples(config, data)
    # Image 4 has no objects; image 2 has no person; all have captions.
    assert counts == {
        "object_detection": 3, "instance_segmentation": 3, "keypoint_detection": 2,
        "captioning": 4,
    }  # fmt: skip
    assert data.stats["usable_images/keypoint_detection"] == 2
    assert checks.has_any(data.examples)


# --- a read-only data root --------------------------------------------------------------


def _listing(root: str) -> list[tuple[str, int]]:
    return sorted(
        (os.path.relpath(os.path.join(d, f), root), os.path.getmtime(os.path.join(d, f)))
        for d, _, fs in os.walk(root)
        for f in fs
    )


def test_read_only_root_is_never_written(tmp_path):
    root = str(tmp_path / "data")
    coco_fixture.write_fixture(root, TRAIN)
    for d, dirs, fs in os.walk(root):
        for name in dirs + fs:
            os.chmod(os.path.join(d, name), stat.S_IREAD | stat.S_IEXEC)
    os.chmod(root, stat.S_IREAD | stat.S_IEXEC)
    before = _listing(root)
    try:
        config = _config(root)
        space = vocab.TokenSpace.from_config(config.vocab)
        workdir = str(tmp_path / "run")
        data = inputs.load_split(config, TRAIN, space, workdir=workdir)  # trains a tokenizer
        inputs.check_task_examples(config, data)
        task = build_tasks(config)["captioning"]
        ds = pipeline.train_dataset(task, data.examples, data, config, batch_size=2, seed=0)
        next(inputs.numpy_batches(ds, data))
        assert os.path.exists(os.path.join(workdir, inputs.WORKDIR_TOKENIZER))
        assert _listing(root) == before  # root may not be stopped by chmod: compare
    finally:
        for d, _, _ in os.walk(root):
            os.chmod(d, stat.S_IRWXU)
