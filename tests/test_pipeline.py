"""tf.data pipelines on a small COCO-format fixture with the awkward cases."""

import os
import pathlib

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from tests import coco_fixture
from unified_seq import defaults, frame, vocab
from unified_seq.data import inputs, pipeline
from unified_seq.data.errors import DataError
from unified_seq.tasks import (
    TASKS,
    build_tasks,
    captioning,
    detection,
    instance_segmentation,
    keypoints,
)

SIZE = 64
BATCH = 4


def _config(coco_dir: str, **data) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 3
    config.vocab = defaults.vocab_config()
    config.vocab.update(coord_shift=200, bins=64, text_shift=264, text_vocab_size=256)
    config.data = defaults.data_config()
    config.data.update(source="coco_json", coco_dir=coco_dir, image_size=SIZE, shuffle_buffer=8)
    config.data.update(data)
    config.tasks = defaults.task_configs()
    config.tasks.object_detection.max_instances = 4
    config.tasks.instance_segmentation.max_points = 16
    config.tasks.captioning.max_len = 12
    config.tasks.captioning.captions_per_image = 2
    return config


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    coco_fixture.write_fixture(root, "train")
    return root


@pytest.fixture(scope="module")
def train_data(fixture_dir):
    config = _config(fixture_dir)
    space = vocab.TokenSpace.from_config(config.vocab)
    return config, space, inputs.load_split(config, "train", space)


def _batches(task, config, space, data, seed=3, n=2, **kw):
    del space  # The task objects carry the token space.
    ds = pipeline.train_dataset(
        build_tasks(config)[task], data.examples, data, config, batch_size=BATCH, seed=seed, **kw
    )
    it = inputs.numpy_batches(ds, data)
    return [next(it) for _ in range(n)]


def _eval(task, examples, data, config, **kw):
    return pipeline.eval_dataset(build_tasks(config)[task], examples, data, config, **kw)


# Segmentation without a crop trains 10 instances (rows) per image (official).
EXPECTED_SHAPE = {
    "object_detection": (5 * 4 + 1,),
    "instance_segmentation": (10, 6 + 2 * 16),
    "keypoint_detection": (6 + 2 * 17,),
    "captioning": (2, 12),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_train_batches_have_the_right_shapes(train_data, task):
    config, space, data = train_data
    (batch,) = _batches(task, config, space, data, n=1)
    assert batch["image"].shape == (BATCH, SIZE, SIZE, 3)
    assert batch["image"].dtype == np.float32
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    shape = (BATCH, *EXPECTED_SHAPE[task])
    assert build_tasks(config)[task].sequence_shape == shape[1:]
    for key in ("input_seq", "target_seq", "token_weights"):
        assert batch[key].shape == shape, key
    assert np.all(batch["input_seq"][..., 0] == vocab.TASK_PROMPTS[task])
    assert np.all(batch["token_weights"] >= 0) and np.any(batch["token_weights"] > 0)
    # Every token is inside the vocabulary.
    assert batch["target_seq"].max() < space.vocab_size


def test_detection_targets_use_category_ids_as_class_tokens(train_data):
    config, space, data = train_data
    config = _config(config.data.coco_dir)
    config.tasks.object_detection.noise_objects = False
    seen = set()
    for batch in _batches("object_detection", config, space, data, n=3):
        cls = batch["target_seq"][:, 4::5]
        seen |= set(cls[cls >= vocab.CLASS_SHIFT].ravel().tolist())
        # At most two non-crowd objects per image, then EOS.
        assert np.all(batch["target_seq"][:, 10] == vocab.EOS)
    # Ids 1, 4, 90 fit below coord_shift: token = 100 + id (DESIGN §2).
    assert seen == {101, 104, 190}


def test_flip_swaps_left_and_right_keypoints(train_data):
    config, space, data = train_data
    flipped = _batches("keypoint_detection", config, space, data, n=2)
    config_nf = _config(config.data.coco_dir)
    config_nf.tasks.keypoint_detection.flip = False
    plain = _batches("keypoint_detection", config_nf, space, data, n=2)
    frame_px = np.array([SIZE, SIZE, 0, 0], np.float32)
    differs = 0
    for bf, bp in zip(flipped, plain, strict=True):
        for i in range(BATCH):
            kf = keypoints.decode(
                bf["target_seq"][i, 5:], None, frame_px, space, config.tasks.keypoint_detection
            )
            kp = keypoints.decode(
                bp["target_seq"][i, 5:], None, frame_px, space, config.tasks.keypoint_detection
            )
            for k in (kf, kp):
                pts = k["keypoints"]
                # The fixture draws left_* points on the image's left; after a
                # flip the swapped names keep left points on the left.
                for left in (5, 7, 9, 11, 13, 15):
                    assert pts[left, 1] < pts[left + 1, 1]
            differs += not np.allclose(kf["keypoints"], kp["keypoints"])
    assert differs > 0


def test_pipeline_is_deterministic_given_a_seed(train_data):
    config, space, data = train_data
    a = _batches("object_detection", config, space, data, seed=5)
    b = _batches("object_detection", config, space, data, seed=5)
    c = _batches("object_detection", config, space, data, seed=6)
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert any(
        not np.array_equal(x["input_seq"], z["input_seq"]) for x, z in zip(a, c, strict=True)
    )


def test_processes_read_disjoint_slices(train_data):
    config, space, data = train_data
    seen = []
    for index in range(2):
        ds = _eval(
            "object_detection", data.examples, data, config, batch_size=8,
            process_index=index, process_count=2,
        )  # fmt: skip
        seen.append({int(i) for b in ds.as_numpy_iterator() for i in b["image/id"]})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {1, 2, 3, 4}


def test_too_many_objects_are_truncated_and_counted(train_data):
    config, space, data = train_data
    config = _config(config.data.coco_dir)
    config.tasks.object_detection.max_instances = 1
    config.tasks.object_detection.scale_jitter = (1.0, 1.0)
    batches = _batches("object_detection", config, space, data, n=3)
    assert sum(int(b["num_truncated"].sum()) for b in batches) > 0
    assert batches[0]["input_seq"].shape == (BATCH, 6)


@pytest.mark.parametrize("seg_crop", [False, True])
def test_eval_instances_prompt_with_their_ground_truth_box(train_data, seg_crop):
    config, space, data = train_data
    config = ml_collections.ConfigDict(config.to_dict())
    config.tasks.instance_segmentation.update(crop_to_box=seg_crop, crop_scale=1.5)
    for task, count in (("instance_segmentation", 5), ("keypoint_detection", 2)):
        ds = _eval(task, data.examples, data, config, batch_size=16)
        (batch,) = list(ds.as_numpy_iterator())
        assert len(batch["image"]) == count
        for i in range(count):
            box = space.token_coords(batch["prompt"][i, 1:5])
            px = frame.boxes_to_pixels(box, batch["frame"][i])
            bin_px = batch["frame"][i][:2].max() / (space.bins - 1)
            np.testing.assert_allclose(px, batch["box"][i], atol=bin_px)
            if task == "instance_segmentation" and seg_crop:
                # The box fills 1/1.5 of the crop's long side (less where the
                # crop meets the image border).
                side = (box[2:] - box[:2]).max()
                assert 1 / 1.5 - 2 / space.bins <= side <= 1.0, side


def test_eval_detection_frames_map_the_canvas_to_the_image(train_data):
    config, space, data = train_data
    ds = _eval("object_detection", data.examples, data, config, batch_size=8)
    (batch,) = list(ds.as_numpy_iterator())
    for f, (h, w) in zip(batch["frame"], batch["image/size"], strict=True):
        uh, uw = frame.fit_size(h, w, SIZE)
        np.testing.assert_allclose(frame.to_pixels([uh / SIZE, uw / SIZE], f), [h, w], rtol=1e-5)


def test_undecodable_image_fails_naming_the_file(tmp_path):
    root = str(tmp_path)
    coco_fixture.write_fixture(root, "train")
    bad = os.path.join(root, "train2017", f"{2:012d}.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    config = _config(root)
    space = vocab.TokenSpace.from_config(config.vocab)
    # COCO JSON images are all decoded once before use: the error comes first.
    with pytest.raises(DataError, match=f"{2:012d}.png: image cannot be decoded"):
        inputs.load_split(config, "train", space)
    # Without that pass, the pipeline names the file.
    config = _config(root, check_images=False)
    data = inputs.load_split(config, "train", space)
    with pytest.raises(DataError, match=f"{2:012d}.png: image cannot be decoded") as info:
        ds = _eval("captioning", data.examples, data, config, batch_size=2)
        list(inputs.numpy_batches(ds, data))
    assert "\n" not in str(info.value) and "function_node" not in str(info.value)

    config = _config(root, on_bad_image="skip")
    data = inputs.load_split(config, "train", space)
    assert data.stats["skipped_images"] == 1 and data.num_images == 3
    ds = _eval("captioning", data.examples, data, config, batch_size=8)
    (batch,) = list(inputs.numpy_batches(ds, data))
    assert sorted(batch["image/id"].tolist()) == [1, 3, 4]


def test_codecs_decode_pipeline_targets(train_data):
    """Training targets decode to annotations inside the canvas (no crash on real batches)."""
    config, space, data = train_data
    frame_px = np.array([SIZE, SIZE, 0, 0], np.float32)
    (det,) = _batches("object_detection", config, space, data, n=1)
    pred = detection.decode(
        det["target_seq"][0], None, frame_px, space, config.tasks.object_detection
    )
    assert len(pred["boxes"]) >= 1 and np.all(pred["boxes"] <= SIZE)
    (seg,) = _batches("instance_segmentation", config, space, data, n=1)
    polys = instance_segmentation.decode_polygons(seg["target_seq"][0, 0, 5:], frame_px, space)
    assert len(polys) >= 1
    (cap,) = _batches("captioning", config, space, data, n=1)
    text = captioning.decode(cap["target_seq"][0, 0], data.tokenizer, space)
    assert text.startswith("image ") and "caption" in text


@pytest.mark.parametrize("seg_crop", [False, True])
def test_eval_instances_prompt_with_attached_detections(train_data, seg_crop):
    config, space, data = train_data
    config = ml_collections.ConfigDict(config.to_dict())
    config.tasks.instance_segmentation.update(crop_to_box=seg_crop, crop_scale=1.5)
    ids = [int(i) for i in data.examples.map(lambda ex: ex["image/id"]).as_numpy_iterator()]
    # Two made-up detections on the first image (one a person), none elsewhere.
    boxes = np.array([[4.0, 6.0, 20.0, 30.0], [10.0, 2.0, 40.0, 18.0]], np.float32)
    detections = {
        ids[0]: {"boxes": boxes, "classes": np.array([1, 5]), "scores": np.array([0.9, 0.4])}
    }
    examples = pipeline.attach_detections(data.examples, detections)
    for task, expected in (("instance_segmentation", [0, 1]), ("keypoint_detection", [0])):
        ds = _eval(task, examples, data, config, batch_size=16)
        (batch,) = list(ds.as_numpy_iterator())
        assert batch["image/id"].tolist() == [ids[0]] * len(expected)
        np.testing.assert_allclose(batch["score"], [[0.9, 0.4][k] for k in expected])
        np.testing.assert_array_equal(batch["class"], [[1, 5][k] for k in expected])
        for i, k in enumerate(expected):
            box = space.token_coords(batch["prompt"][i, 1:5])
            px = frame.boxes_to_pixels(box, batch["frame"][i])
            bin_px = batch["frame"][i][:2].max() / (space.bins - 1)
            np.testing.assert_allclose(px, boxes[k], atol=bin_px)


def _segmentation_config(coco_dir, **seg):
    config = _config(coco_dir)
    config.tasks.instance_segmentation.update(scale_jitter=(1.0, 1.0), flip=False, **seg)
    return config


def test_segmentation_rows_share_one_image_and_pad_with_zero_weight(train_data):
    config, space, data = train_data
    config = _segmentation_config(config.data.coco_dir, instances_per_image=3)
    (batch,) = _batches("instance_segmentation", config, space, data, n=1)
    assert batch["input_seq"].shape == (BATCH, 3, 6 + 2 * 16)
    for weights, inputs_ in zip(batch["token_weights"], batch["input_seq"], strict=True):
        real = weights.sum(axis=-1) > 0
        # The fixture's images hold 1 or 2 instances with polygons: those rows
        # come first, the rest is padding that is never trained.
        assert real.sum() in (1, 2) and not real[real.sum() :].any()
        prompts = {tuple(p) for p in inputs_[real, :6]}
        assert len(prompts) == real.sum()  # distinct instances


def test_cropped_segmentation_gives_one_example_per_instance(train_data):
    config, space, data = train_data
    config = _segmentation_config(config.data.coco_dir, instances_per_image=0, crop_to_box=True)
    task = build_tasks(config)["instance_segmentation"]
    assert task.sequence_shape == (6 + 2 * 16,)
    ds = pipeline.train_dataset(task, data.examples, data, config, batch_size=5, seed=1)
    batch = next(inputs.numpy_batches(ds, data))
    # One visit of each image gives all five non-crowd instances with polygons:
    # two persons (class 1), two boxes (4) and the RLE blob (90).
    assert sorted(batch["input_seq"][:, 5].tolist()) == [101, 101, 104, 104, 190]
    # Each is seen in its own crop: the box fills 1/crop_scale of the crop's
    # long side (or the crop meets the image border).
    boxes = space.token_coords(batch["input_seq"][:, 1:5])
    sides = (boxes[:, 2:] - boxes[:, :2]).max(axis=1)
    assert np.all(sides >= 1 / 2.0 - 2 / space.bins)


@pytest.mark.parametrize("per_image, expected", [(1, 1), (2, 2), (0, 4), (9, 4)])
def test_instances_of_a_visit_are_a_random_run_of_the_candidates(train_data, per_image, expected):
    config, _, _ = train_data
    config = _segmentation_config(
        config.data.coco_dir, instances_per_image=per_image, crop_to_box=True
    )
    task = build_tasks(config)["instance_segmentation"]
    candidates = tf.constant([False, True, True, False, True, True, False])
    starts = set()
    for s in range(20):
        chosen = task._choose(candidates, tf.constant([s, 7], tf.int64)).numpy()
        assert len(chosen) == expected and len(set(chosen)) == expected
        ring = [1, 2, 4, 5]
        k = ring.index(chosen[0])
        assert chosen.tolist() == [ring[(k + j) % 4] for j in range(expected)]
        starts.add(int(chosen[0]))
    assert len(starts) > 1  # the run starts at a random candidate


def test_instances_per_image_zero_needs_a_crop(train_data):
    config, _, _ = train_data
    config = _segmentation_config(config.data.coco_dir, instances_per_image=0, crop_to_box=False)
    with pytest.raises(ValueError, match="instances_per_image=0"):
        build_tasks(config)


def _listing(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


def test_tokenizer_is_written_to_the_cache_and_workdir_never_to_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFIED_SEQ_CACHE", str(tmp_path / "cache"))
    root = str(tmp_path / "data")
    for split in ("train", "val"):
        coco_fixture.write_fixture(root, split)
    files = _listing(root)
    config = _config(root)
    space = vocab.TokenSpace.from_config(config.vocab)
    workdir = tmp_path / "run"
    train = inputs.load_split(config, "train", space, workdir=str(workdir))
    assert _listing(root) == files  # the data folder may be read-only
    assert train.tokenizer.path.startswith(str(tmp_path / "cache" / "tokenizers"))
    own = (workdir / "tokenizer.model").read_bytes()
    assert own == pathlib.Path(train.tokenizer.path).read_bytes()
    # Evaluation (and a resumed run) read the run's own copy...
    val = inputs.load_split(config, "val", space, workdir=str(workdir))
    assert val.tokenizer.path == str(workdir / "tokenizer.model")
    # ...and another run on the same captions reuses the cached model.
    other = inputs.load_split(config, "train", space, workdir=str(tmp_path / "other"))
    assert other.tokenizer.path == train.tokenizer.path
    text = "image 3 caption 1"
    assert val.tokenizer.encode(text) == other.tokenizer.encode(text)
    assert other.tokenizer.decode(other.tokenizer.encode(text)) == text
    # Other captions get another model.
    assert inputs.trained_tokenizer_path(["a cat"], 256) != inputs.trained_tokenizer_path(
        ["a dog"], 256
    )
