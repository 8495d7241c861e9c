r"""Command line prediction: a trained run on any images, every task, pictures.

    python -m unified_seq.predict --workdir /tmp/us --images 'photos/*.jpg' --out /tmp/pred

Writes, and nothing outside OUT:
  OUT/predictions.jsonl   one line per image: its objects (box, category,
                          score, mask as COCO RLE, keypoints) and caption
                          (prediction.py has the format)
  OUT/vis/<name>.png      the image with boxes, labels and scores, masks,
                          keypoint skeletons and the caption
  OUT/<task>_results.json with --annotations (a COCO JSON whose `images`
                          map file names to ids): COCO result files that
                          pycocotools' loadRes reads
  OUT/skipped.jsonl       images that could not be read, and why

`--images` takes a glob, a folder, or several of either joined by commas;
paths may be local or gs://. Unreadable or hostile files (corrupt,
truncated, decompression bombs) are reported by name and skipped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def expand_images(spec: str) -> list[str]:
    """Image paths from globs and folders, joined by commas; sorted, without repeats."""
    import tensorflow as tf

    found: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if tf.io.gfile.isdir(part):
            names = tf.io.gfile.listdir(part)
            found += sorted(
                os.path.join(part, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
            )
        else:
            found += sorted(tf.io.gfile.glob(part))
    unique = list(dict.fromkeys(found))
    if not unique:
        raise app.UsageError(f"--images={spec!r} matches no image file")
    return unique


def file_name_ids(annotations: str) -> dict[str, int]:
    """File name (without folders) → image id, from a COCO JSON's `images`."""
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(annotations) as f:
            content = json.load(f)
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise app.UsageError(f"--annotations={annotations}: cannot read it as JSON ({e})") from e
    rows = content.get("images") if isinstance(content, dict) else None
    if not isinstance(rows, list):
        raise app.UsageError(f"--annotations={annotations}: no `images` list (COCO format)")
    ids = {}
    for k, row in enumerate(rows):
        try:
            ids[os.path.basename(str(row["file_name"]))] = int(row["id"])
        except (KeyError, TypeError, ValueError):
            raise app.UsageError(
                f"--annotations={annotations}: images[{k}] needs `file_name` and an integer `id`"
            ) from None
    return ids


def unique_stems(names: Sequence[str]) -> list[str]:
    """Picture names: file stems, with _2, _3 … for repeats (a.jpg and a.png)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        stem = os.path.splitext(os.path.basename(name))[0] or "image"
        count = seen.get(stem, 0) + 1
        seen[stem] = count
        out.append(stem if count == 1 else f"{stem}_{count}")
    return out


def coco_results(record: dict, tasks: dict) -> dict[str, list[dict]]:
    """COCO-format results of one record, per task (the record's own layout undone)."""
    out: dict[str, list[dict]] = {}
    image_id = record["image_id"]
    for name, task in tasks.items():
        rows = []
        if task.gives_boxes:
            for o in record.get("objects", []):
                plain = {k: v for k, v in o.items() if not isinstance(v, dict) and k != "category"}
                rows.append({"image_id": image_id, **plain})
        elif task.takes_boxes:
            for o in record.get("objects", []):
                if name in o:
                    rows.append({"image_id": image_id, "category_id": o["category_id"], **o[name]})
        elif name in record:
            rows.append({"image_id": image_id, **record[name]})
        out[name] = rows
    return out


class Progress:
    """A one-line progress report: done/total, images/s, time left."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.start = time.perf_counter()
        self.done = 0

    def update(self, count: int = 1) -> None:
        self.done += count
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        end = "\n" if self.done >= self.total or not self.stream.isatty() else ""
        print(
            f"\rpredict: {self.done}/{self.total} images ({100 * self.done / self.total:.0f}%), "
            f"{rate:.2f} images/s, {left:.0f} s left",
            end=end,
            file=self.stream,
            flush=True,
        )


def run(
    workdir: str,
    images_spec: str,
    out: str,
    annotations: str | None = None,
    *,
    step: int | None = None,
    tasks: Sequence[str] | None = None,
    batch_size: int = 8,
    detections_per_image: int | None = None,
    seed: int | None = None,
    vis: bool = True,
    vis_min_score: float = 0.3,
    max_pixels: int | None = None,
    predictor: Any = None,
) -> dict:
    """The command, callable from Python; returns counts and timings.

    `predictor`: a Predictor already loaded from `workdir` (its compiled
    samplers are reused); default: loaded here.
    """
    import tensorflow as tf

    from unified_seq import images, visualize
    from unified_seq.predictor import Predictor

    # tf.data-style image work runs on the host; TF must not claim the accelerators.
    tf.config.set_visible_devices([], "GPU")
    paths = expand_images(images_spec)
    ids = file_name_ids(annotations) if annotations else None
    if predictor is None:
        predictor = Predictor.from_workdir(workdir, step)
    names = list(predictor.tasks) if tasks is None else list(tasks)
    image_ids, scored = list(range(len(paths))), [True] * len(paths)
    if ids is not None:
        # Files the annotations do not list still get predictions, under ids
        # no listed image has, and stay out of the COCO result files.
        spare = max(ids.values(), default=-1) + 1
        for i, path in enumerate(paths):
            known = os.path.basename(path) in ids
            image_ids[i] = ids[os.path.basename(path)] if known else spare + i
            scored[i] = known
    stems = unique_stems(paths)
    tf.io.gfile.makedirs(out)
    results: dict[str, list[dict]] = {n: [] for n in names}
    skipped, progress = [], Progress(len(paths))
    tic = time.perf_counter()
    stream = predictor.iter_predict(
        paths,
        names,
        detections_per_image=detections_per_image,
        batch_size=batch_size,
        seed=seed,
        image_ids=image_ids,
        skip_errors=True,
        max_pixels=max_pixels or images.MAX_PIXELS,
        with_pixels=vis,
    )
    with tf.io.gfile.GFile(os.path.join(out, "predictions.jsonl"), "w") as lines:
        for record in stream:
            i = record["index"]
            record["file"] = paths[i]
            if "error" in record:
                skipped.append(record)
                logging.warning("skipped %s", record["error"])
                print(f"skipped {record['error']}", file=sys.stderr, flush=True)
                progress.update()
                continue
            pixels = record.pop("pixels", None)
            if vis:
                record["picture"] = f"vis/{stems[i]}.png"
                picture = visualize.draw_prediction(pixels, record, vis_min_score)
                visualize.save_png(picture, os.path.join(out, record["picture"]))
            if scored[i]:
                for name, rows in coco_results(record, predictor.tasks).items():
                    if name in results:
                        results[name] += rows
            lines.write(json.dumps(record) + "\n")
            progress.update()
    seconds = time.perf_counter() - tic
    if ids is not None:
        for name, rows in results.items():
            with tf.io.gfile.GFile(os.path.join(out, f"{name}_results.json"), "w") as f:
                json.dump(rows, f)
    if skipped:
        with tf.io.gfile.GFile(os.path.join(out, "skipped.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in skipped))
    done = len(paths) - len(skipped)
    summary = {
        "images": done,
        "skipped": len(skipped),
        "seconds": round(seconds, 1),
        "images_per_second": round(done / seconds, 3) if seconds > 0 else 0.0,
        "step": predictor.step,
    }
    return summary


def _define_flags() -> None:
    # Defined only when run as a program: main.py defines --workdir too, and
    # both modules may be imported in one process.
    flags.DEFINE_string("workdir", None, "Folder of a training run.", required=True)
    flags.DEFINE_string(
        "images", None, "Glob, folder, or comma-separated globs/folders of images.", required=True
    )
    flags.DEFINE_string("out", None, "Output folder (local or gs://).", required=True)
    flags.DEFINE_string(
        "annotations", None, "COCO JSON mapping file names to image ids: writes COCO result files."
    )
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
    flags.DEFINE_list("tasks", None, "Tasks to run; default: every task of the run.")
    flags.DEFINE_integer("batch_size", 8, "Images per batch.")
    flags.DEFINE_integer(
        "detections_per_image",
        None,
        "Masks and keypoints for the top N detections of each image (0 = all); default: the run's.",
    )
    flags.DEFINE_integer("seed", None, "Sampling seed; default: the one evaluation uses.")
    flags.DEFINE_bool("vis", True, "Write OUT/vis/<name>.png pictures.")
    flags.DEFINE_float(
        "vis_min_score", 0.3, "Objects scored below this are not drawn (they stay in the JSON)."
    )
    flags.DEFINE_integer(
        "max_pixels", None, "Refuse images with more pixels (default: images.MAX_PIXELS)."
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    from unified_seq.data.errors import DataError
    from unified_seq.errors import ConfigError, NonFiniteError

    try:
        summary = _run_from_flags(f)
    except (FileNotFoundError, DataError, ConfigError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps(summary), flush=True)


def _run_from_flags(f: Any) -> dict:
    return run(
        f.workdir,
        f.images,
        f.out,
        f.annotations,
        step=f.step,
        tasks=f.tasks,
        batch_size=f.batch_size,
        detections_per_image=f.detections_per_image,
        seed=f.seed,
        vis=f.vis,
        vis_min_score=f.vis_min_score,
        max_pixels=f.max_pixels,
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
