"""Prediction on any images: well-formed records, the evaluation's very results, pictures,
bad files skipped, few compiles, boxes given by the caller."""

import copy
import io
import json
import os
import shutil
import zlib
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from unified_seq import coco_metrics, defaults, evaluate, predict, train
from unified_seq.data import synthetic
from unified_seq.models import sizes
from unified_seq.prediction import bucket_rows
from unified_seq.predictor import Predictor

NUM_VAL = 6
TASKS = ("object_detection", "instance_segmentation", "keypoint_detection", "captioning")


def _config(data_dir: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.init_from = ""
    config.vocab = defaults.vocab_config()
    config.vocab.update(coord_shift=200, bins=64, text_shift=264, text_vocab_size=128)
    config.data = defaults.data_config()
    config.data.update(source="coco_json", coco_dir=data_dir, image_size=64, shuffle_buffer=16)
    config.tasks = defaults.task_configs()
    config.tasks.object_detection.update(max_instances=4, decode_all_objects=True, drop_fake=False)
    config.tasks.instance_segmentation.update(
        max_points=12, num_samples=2, instances_per_image=2, detections_per_image=3
    )
    config.tasks.keypoint_detection.update(instances_per_image=1, detections_per_image=3)
    config.tasks.captioning.update(max_len=12, captions_per_image=1, color_jitter=0.0)
    config.model = sizes.model_config(
        "tiny", enc_depth=1, enc_width=32, enc_mlp_dim=64, enc_heads=2,
        dec_depth=1, dec_width=32, dec_mlp_dim=64, dec_heads=2, dropout=0.0,
    )  # fmt: skip
    config.optim = defaults.optim_config()
    config.optim.update(learning_rate=1e-3, warmup_steps=2)
    config.train = defaults.train_config()
    config.train.update(steps=3, batch_size=2, log_every=3, checkpoint_every=0)
    config.eval = defaults.eval_config()
    config.eval.update(batch_size=4, prompt_boxes="detections")
    config.mesh = defaults.mesh_config()
    config.sharding_rules = ".*=replicate"
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A briefly trained run of all four tasks, evaluated with detections as prompts."""
    data_dir = synthetic.generate(
        str(tmp_path_factory.mktemp("data")), seed=3, num_train=8, num_val=NUM_VAL, image_size=64
    )
    workdir = str(tmp_path_factory.mktemp("run"))
    config = _config(data_dir)
    with open(os.path.join(workdir, "config.json"), "w") as f:  # as main.py writes it
        f.write(config.to_json_best_effort())
    state, model = train.train(config, workdir)
    report = evaluate.evaluate(config, workdir, state.params, model, int(state.step))
    val = os.path.join(data_dir, "val2017")
    files = sorted(os.path.join(val, n) for n in os.listdir(val))
    return {"data": data_dir, "workdir": workdir, "report": report, "files": files}


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor.from_workdir(run["workdir"])


@pytest.fixture(scope="module")
def cli_out(run, predictor, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pred"))
    annotations = os.path.join(run["data"], "annotations", "instances_val2017.json")
    images = os.path.join(run["data"], "val2017", "*.png")
    summary = predict.run(run["workdir"], images, out, annotations, predictor=predictor)
    return out, summary


def test_bucket_rows():
    assert [bucket_rows(n, 32) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert bucket_rows(3, 32, multiple=8) == 8
    assert bucket_rows(40, 32) == 40  # more than the cap: the caller splits first


def _check_record(record, predictor, height, width):
    names = set(predictor.labels.category_map.names)
    assert (record["height"], record["width"]) == (height, width)
    assert isinstance(record["captioning"]["caption"], str) and record["captioning"]["caption"]
    objects = record["objects"]
    assert len(objects) == 4  # decode_all_objects: every slot is a detection
    for o in objects:
        x, y, w, h = o["bbox"]
        assert min(x, y) >= -1e-3 and x + w <= width + 1e-3 and y + h <= height + 1e-3
        assert w >= 0 and h >= 0 and 0.0 <= o["score"] <= 1.0
        assert o["category"] in names
        seg = o.get("instance_segmentation")
        if seg is not None:
            assert seg["segmentation"]["size"] == [height, width]
        kp = o.get("keypoint_detection")
        assert kp is None or o["category"] == "person"
        if kp is not None:
            assert len(kp["keypoints"]) == 3 * 17
            assert len(kp["visibility_scores"]) == 17
            assert all(0.0 <= v <= 1.0 for v in kp["visibility_scores"])
    # Masks for the top detections_per_image = 3 detections with a valid box.
    assert 1 <= sum("instance_segmentation" in o for o in objects) <= 3


def test_predict_any_image_kind_gives_well_formed_records(predictor, run, tmp_path):
    path = run["files"][0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    grey = Image.fromarray(rgb).convert("L")
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90°
    Image.fromarray(rgb).save(rotated, exif=exif, quality=95)
    records = predictor.predict([path, Image.fromarray(rgb), grey, rgba, str(rotated)])
    h, w = rgb.shape[:2]
    assert [r["image_id"] for r in records] == [0, 1, 2, 3, 4]
    for record, size in zip(records, [(h, w)] * 4 + [(w, h)], strict=True):
        _check_record(record, predictor, *size)
    assert [r["image"] for r in records] == [
        os.path.basename(path),
        "image_1",
        "image_2",
        "image_3",
        "rotated.jpg",
    ]
    # The same pixels as a path, a PIL image and an opaque RGBA array, under one
    # image id (the sampling key), give the same answers.
    same = [predictor.predict([x], image_ids=[7])[0] for x in (path, Image.fromarray(rgb), rgba)]
    for other in same[1:]:
        assert json.dumps(other["objects"]) == json.dumps(same[0]["objects"])
        assert other["captioning"] == same[0]["captioning"]
    with pytest.raises(ValueError, match="image_ids repeat"):
        predictor.predict([path, path], image_ids=[7, 7])


def test_predict_results_score_as_the_evaluation_of_the_checkpoint(run, predictor, cli_out):
    out, summary = cli_out
    assert summary["images"] == NUM_VAL and summary["skipped"] == 0
    ids = [int(os.path.splitext(os.path.basename(f))[0]) for f in run["files"]]
    truth = coco_metrics.GroundTruth(run["data"], "val", ids)
    for name in TASKS:
        with open(os.path.join(run["workdir"], f"{name}_results.json")) as f:
            evaluated = json.load(f)
        with open(os.path.join(out, f"{name}_results.json")) as f:
            predicted = json.load(f)
        # Loaded by pycocotools like any result file.
        if name != "captioning" and predicted:
            kind = "person_keypoints" if name == "keypoint_detection" else "instances"
            truth.coco(kind).loadRes(copy.deepcopy(predicted))  # it adds fields
        assert len(predicted) == len(evaluated), name

        # The same results: equal fields, scores equal up to float noise (batches
        # of other sizes).
        def canonical(results):
            return sorted(
                (json.dumps({k: v for k, v in r.items() if k != "score"}, sort_keys=True),
                 r.get("score", 0.0)) for r in results
            )  # fmt: skip

        for (key_a, score_a), (key_b, score_b) in zip(
            canonical(evaluated), canonical(predicted), strict=True
        ):
            assert key_a == key_b, name
            assert abs(score_a - score_b) < 1e-5, name
        scores = predictor.tasks[name].metric(predicted, truth)
        for metric, value in scores.items():
            assert value == pytest.approx(run["report"][name][metric], abs=1e-9), (name, metric)


def test_pictures_are_pngs_of_each_image(run, cli_out):
    out, _ = cli_out
    with open(os.path.join(out, "predictions.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == NUM_VAL
    for record in records:
        with open(os.path.join(out, record["picture"]), "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        picture = Image.open(io.BytesIO(data))
        assert picture.size == (record["width"], record["height"])
        source = Image.open(record["file"])
        assert picture.size == source.size


def test_bad_files_are_skipped_by_name_and_nothing_is_written_outside_out(run, predictor, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in run["files"][:2]:
        shutil.copy(path, images)
    data = Path(run["files"][2]).read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    (images / "noise.jpg").write_bytes(os.urandom(2000))
    # A 1x1 PNG whose header claims 60000 x 60000 pixels.
    bomb = io.BytesIO()
    Image.new("RGB", (1, 1)).save(bomb, format="PNG")
    raw = bytearray(bomb.getvalue())
    raw[16:24] = (60000).to_bytes(4, "big") * 2
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    (images / "bomb.png").write_bytes(bytes(raw))

    def snapshot():
        paths = [run["workdir"], str(images), os.getcwd()]
        return {p: sorted((n, os.path.getmtime(os.path.join(p, n))) for n in os.listdir(p))
                for p in paths}  # fmt: skip

    before = snapshot()
    out = str(tmp_path / "out")
    summary = predict.run(
        run["workdir"], str(images), out, tasks=["object_detection"], predictor=predictor
    )
    assert snapshot() == before
    assert summary["images"] == 2 and summary["skipped"] == 3
    with open(os.path.join(out, "skipped.jsonl")) as f:
        skipped = {json.loads(line)["image"]: json.loads(line)["error"] for line in f}
    assert set(skipped) == {"truncated.png", "noise.jpg", "bomb.png"}
    assert "60000" in skipped["bomb.png"]
    for name, reason in skipped.items():
        assert reason.startswith(name)
    with open(os.path.join(out, "predictions.jsonl")) as f:
        assert [json.loads(line)["image"] for line in f] == sorted(
            os.path.basename(p) for p in run["files"][:2]
        )
    assert sorted(os.listdir(out)) == ["predictions.jsonl", "skipped.jsonl", "vis"]


def test_boxes_given_by_the_caller_prompt_masks_and_keypoints(predictor, run):
    person = {"bbox": [10.0, 8.0, 20.0, 30.0], "category": "person"}
    other = {"bbox": [2.0, 3.0, 12.0, 10.0], "category_id": 3, "score": 0.5}
    (record,) = predictor.predict(
        run["files"][:1], ["instance_segmentation", "keypoint_detection"], boxes=[[person, other]]
    )
    objects = record["objects"]
    assert [o["bbox"] for o in objects] == [person["bbox"], other["bbox"]]
    assert [o["score"] for o in objects] == [1.0, 0.5]
    assert all("instance_segmentation" in o for o in objects)
    assert "keypoint_detection" in objects[0] and "keypoint_detection" not in objects[1]
    assert "captioning" not in record
    with pytest.raises(ValueError, match="answer for boxes"):
        predictor.predict(run["files"][:1], ["instance_segmentation"])
    with pytest.raises(ValueError, match="needs 'category_id' or 'category'"):
        predictor.predict(
            run["files"][:1], ["instance_segmentation"], boxes=[[{"bbox": [1, 2, 3, 4]}]]
        )


def test_per_row_keys_make_a_batch_size_change_nothing(predictor, run):
    a = predictor.predict(run["files"][:3], batch_size=3)
    b = predictor.predict(run["files"][:3], batch_size=1)
    for x, y in zip(a, b, strict=True):
        assert x["captioning"] == y["captioning"]
        assert [o["bbox"] for o in x["objects"]] == [o["bbox"] for o in y["objects"]]
    other_seed = predictor.predict(run["files"][:3], seed=123)
    assert [r["captioning"] for r in other_seed] != [r["captioning"] for r in a]


def test_a_stream_of_images_compiled_a_handful_of_times(predictor, run):
    """Run last: every prediction of this module went through one predictor."""
    predictor.predict(run["files"], batch_size=1, detections_per_image=0)
    # Up to eval.batch_size = 4 rows per call, bucketed to 1, 2 or 4 rows:
    # at most three shapes per task, however many images and instances came.
    for name, task in predictor.tasks.items():
        assert 1 <= predictor.compiled_shapes(task) <= 3, name


def test_command_line_names_what_is_wrong(run, tmp_path):
    import subprocess
    import sys

    images = os.path.join(run["data"], "val2017", "*.png")
    out = str(tmp_path / "out")
    command = [sys.executable, "-m", "unified_seq.predict", "--images", images, "--out", out]
    missing = subprocess.run(command + ["--workdir", str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode != 0
    assert f"{tmp_path}/config.json not found" in missing.stderr
    no_images = command[:3] + ["--images", str(tmp_path / "*.png"), "--out", out]
    empty = subprocess.run(
        no_images + ["--workdir", run["workdir"]], capture_output=True, text=True
    )
    assert empty.returncode != 0 and "matches no image file" in empty.stderr
    assert not os.path.exists(out)


def test_picture_names_stay_inside_the_vis_folder():
    names = predict.unique_stems(["../x/a.jpg", "a.png", "/etc/..", "..", "gs://b/.png", "c/"])
    assert names == ["a", "a_2", "..", ".._2", ".png", "image"]
    for name in names:
        path = os.path.normpath(os.path.join("out", "vis", f"{name}.png"))
        assert os.path.dirname(path) == os.path.join("out", "vis"), name
