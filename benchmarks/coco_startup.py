r"""Start-up cost of a COCO-2017-sized data set: load time and peak memory of one host.

    python benchmarks/coco_startup.py [--images 118287] [--dir /tmp/coco_startup] \
        [--hosts 1,8] [--out coco_startup.json]

Synthesises the three train annotation files of a data set shaped like COCO
2017 train (118,287 images, ~7.3 instances per image with polygons, ~1% crowd
regions as uncompressed RLE, ~30% persons, all of them in the keypoint file
with keypoints on ~57%, 5 captions per image; file sizes within a few percent
of the real ones), then measures each step in a fresh subprocess: wall
seconds, CPU seconds (steadier on a shared machine) and peak resident memory
(ru_maxrss), next to the resident memory right after the imports.

No pixels are written: the image folder holds empty stub files, because
`load_coco_json` lists the folder and requires every `file_name` in it (it
never decodes them). The caption tokenizer is a small SentencePiece model
trained once on 20k captions (`data.tokenizer_path`), so `load_split` times
loading it, not training it (which a run without a tokenizer does once).

Figures: `parse` (the three files one at a time, stdlib json and, when
installed, orjson), then `load_coco_json` and `load_split` on process 0 of
each host count in --hosts (`process_count=n` keeps that process's 1/n of the
images). Prints them and writes benchmarks/results/<--out> (default
coco_startup.json). The set is kept in --dir and reused while its parameters
match (synthesising it takes a few minutes).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf

RESULTS = os.path.join(os.path.dirname(__file__), "results")
COCO_TRAIN_IMAGES = 118287
# COCO 2017 train, for comparison with what is synthesised.
REAL_SIZES_MB = {"instances": 469.8, "person_keypoints": 238.9, "captions": 91.9}
KINDS = ("instances", "person_keypoints", "captions")
MARKER = "coco_startup.json"
GENERATOR_VERSION = 1
CHUNK = 4096  # images generated and written at a time

_WORDS = (
    "a an the man woman person people child boy girl dog cat horse bird train bus car truck "
    "bicycle motorcycle plane boat table chair couch bed kitchen room street road field beach "
    "wave surfboard skateboard snow skis ball frisbee kite pizza sandwich cake plate bowl cup "
    "clock tower building sign light traffic giraffe elephant zebra sheep cow bear umbrella "
    "laptop computer phone tv window door toilet sink refrigerator oven microwave banana "
    "apple orange broccoli carrot donut teddy book vase scissors is are sitting standing "
    "riding holding walking playing eating looking lying flying parked next to on in of with "
    "near at by top front back side large small white black red blue green yellow brown two "
    "three several group couple some young old big little open wooden grassy busy city while "
    "and that his her their its down up over under behind around across"
)


def _syllable_words(rng: np.random.Generator, count: int) -> list[str]:
    """Rare made-up words, so the caption vocabulary has a long tail as COCO's (~25k words)."""
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ee", "ou")]
    picks = rng.integers(0, len(syllables), size=(count, 3))
    lengths = rng.integers(2, 4, size=count)
    return ["".join(syllables[s] for s in row[:n]) for row, n in zip(picks, lengths, strict=True)]


def _categories() -> tuple[list[dict], np.ndarray]:
    """COCO's 80 categories (person with its 17 keypoints) and the instance share of each."""
    from unified_seq.data import synthetic
    from unified_seq.data.tfds_source import COCO_80_CATEGORIES

    categories = [dict(c) for c in COCO_80_CATEGORIES]
    categories[0].update(keypoints=list(synthetic.KEYPOINT_NAMES), skeleton=synthetic.SKELETON)
    others = 1.0 / np.arange(1, len(categories))  # a Zipf tail over the other 79
    share = np.concatenate([[0.305], 0.695 * others / others.sum()])
    return categories, share


def _polygon_instances(rng, heights, widths, detail):
    """Polygons of instances on images of the given sizes (one row per instance).

    Sizes follow COCO's spread (about 40% small, 35% medium, 25% large); the
    vertex count grows with the object's size (median ~20 points, up to a few
    hundred) times `detail` (persons have more), ~12% of instances have 2-4
    parts. Coordinates have 2 decimals as in COCO files.

    Returns:
      per instance: list of flat [x, y, ...] polygons, bbox [x, y, w, h], area.
    """
    count = len(heights)
    side = np.clip(np.exp(rng.normal(np.log(48), 1.0, count)), 4, None)
    side = np.minimum(side, 0.95 * np.minimum(heights, widths))
    aspect = np.exp(rng.normal(0, 0.4, count))
    bw = np.clip(side * aspect, 3, 0.98 * widths)
    bh = np.clip(side / aspect, 3, 0.98 * heights)
    x0 = rng.random(count) * (widths - bw)
    y0 = rng.random(count) * (heights - bh)
    parts = np.where(rng.random(count) < 0.12, rng.integers(2, 5, count), 1)
    points = detail * np.exp(rng.normal(np.log(9 + np.sqrt(bw * bh) / 5), 0.45, count))
    points = np.clip(np.round(points), 4, 400).astype(int)
    instances = []
    for i in range(count):
        # Each part is a wobbly ellipse in its own share of the box.
        polys, area = [], 0.0
        n_parts = parts[i]
        for p in range(n_parts):
            n = max(3, int(points[i] // n_parts))
            t = 2 * np.pi * (np.arange(n) + rng.random(n) * 0.8) / n
            r = 0.75 + 0.25 * rng.random(n)
            pw = bw[i] / n_parts
            cx, cy = x0[i] + pw * (p + 0.5), y0[i] + bh[i] / 2
            xs = np.round(cx + 0.5 * pw * r * np.cos(t), 2)
            ys = np.round(cy + 0.5 * bh[i] * r * np.sin(t), 2)
            area += 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
            polys.append(np.stack([xs, ys], 1).ravel().tolist())
        flat = np.concatenate([np.asarray(q) for q in polys])
        xmin, ymin = flat[0::2].min(), flat[1::2].min()
        bbox = [xmin, ymin, flat[0::2].max() - xmin, flat[1::2].max() - ymin]
        instances.append((polys, [round(float(v), 2) for v in bbox], float(area)))
    return instances


def _crowd_rle(rng, height: int, width: int) -> tuple[dict, list[float], float]:
    """An elliptic crowd region as uncompressed RLE (column-major counts), as COCO stores crowds."""
    bw = int(rng.integers(width // 4, width))
    bh = int(rng.integers(height // 4, height))
    x0 = int(rng.integers(0, width - bw + 1))
    y0 = int(rng.integers(0, height - bh + 1))
    xs = np.arange(x0, x0 + bw)
    half = 0.5 * bh * np.sqrt(np.clip(1 - ((xs + 0.5 - x0 - bw / 2) / (bw / 2)) ** 2, 0, 1))
    top = np.round(y0 + bh / 2 - half).astype(np.int64)
    bottom = np.maximum(np.round(y0 + bh / 2 + half).astype(np.int64), top + 1)
    edges = np.stack([xs * height + top, xs * height + bottom], 1).ravel()
    counts = np.diff(np.concatenate([[0], edges, [height * width]])).tolist()
    area = float(np.sum(bottom - top))
    return {"counts": counts, "size": [height, width]}, [x0, y0, bw, bh], area


def _keypoints(rng, bbox: list[float]) -> tuple[list[int], int]:
    """COCO keypoints [x, y, v] * 17 as integers; ~43% of persons have none labelled."""
    if rng.random() < 0.43:
        return [0] * 51, 0
    labelled = rng.random(17) < rng.uniform(0.3, 1.0)
    x, y, w, h = bbox
    flat = []
    for k in range(17):
        if labelled[k]:
            flat += [int(x + w * rng.random()), int(y + h * rng.random()), int(rng.integers(1, 3))]
        else:
            flat += [0, 0, 0]
    return flat, int(labelled.sum())


def _caption(rng, vocabulary: list[str], weights: np.ndarray) -> str:
    words = rng.choice(len(vocabulary), size=int(rng.integers(8, 16)), p=weights)
    text = " ".join(vocabulary[w] for w in words)
    return text[0].upper() + text[1:] + "."


def _image_entry(image_id: int, height: int, width: int) -> dict:
    name = f"{image_id:012d}.jpg"
    return {
        "license": int(image_id % 8 + 1),
        "file_name": name,
        "coco_url": f"http://images.cocodataset.org/train2017/{name}",
        "height": height,
        "width": width,
        "date_captured": "2013-11-14 11:18:45",
        "flickr_url": f"http://farm4.staticflickr.com/3153/{image_id}_883ad3ad4c_z.jpg",
        "id": image_id,
    }


def _dump(items: list) -> str:
    """Items of a JSON list, comma-separated (no brackets), compact as COCO files."""
    return json.dumps(items, separators=(",", ":"))[1:-1]


def synthesise(root: str, num_images: int, seed: int = 0) -> dict:
    """Writes ROOT/annotations/{instances,person_keypoints,captions}_train2017.json and stubs.

    Files are written a chunk of images at a time, so generating needs little
    memory. Keys are in COCO's order (info, licenses, images, annotations,
    categories; annotation fields as COCO writes them).

    Returns:
      counts of what was written and the file sizes in MB.
    """
    rng = np.random.default_rng(seed)
    categories, share = _categories()
    category_ids = np.array([c["id"] for c in categories])
    vocabulary = _WORDS.split() + _syllable_words(rng, 20000)
    ranks = np.arange(1, len(vocabulary) + 1)
    word_weights = (1.0 / ranks) / np.sum(1.0 / ranks)
    image_ids = np.sort(rng.choice(581929, size=num_images, replace=False) + 1)
    heights = np.where(rng.random(num_images) < 0.75, rng.integers(360, 481, num_images), 640)
    widths = np.where(heights == 640, rng.integers(360, 481, num_images), 640)
    # Instances per image: 1% empty, else 1 + negative binomial (mean 7.3 overall, long tail).
    per_image = 1 + rng.negative_binomial(1.4, 1.4 / (1.4 + 6.37), num_images)
    per_image = np.where(rng.random(num_images) < 0.01, 0, np.minimum(per_image, 93))

    ann_dir = os.path.join(root, "annotations")
    image_dir = os.path.join(root, "train2017")
    tf.io.gfile.makedirs(ann_dir)
    tf.io.gfile.makedirs(image_dir)
    paths = {k: os.path.join(ann_dir, f"{k}_train2017.json") for k in KINDS}
    header = {
        "info": {"description": "coco_startup synthetic COCO 2017 train", "version": "1.0"},
        "licenses": [{"url": "", "id": i, "name": f"license {i}"} for i in range(1, 9)],
    }
    files = {k: tf.io.gfile.GFile(paths[k], "w") for k in KINDS}
    for f in files.values():
        f.write(json.dumps(header, separators=(",", ":"))[:-1] + ',"images":[')
    # The image list first (each file holds all of it), then the annotations.
    for start in range(0, num_images, CHUNK):
        stop = min(start + CHUNK, num_images)
        entries = [
            _image_entry(int(image_ids[i]), int(heights[i]), int(widths[i]))
            for i in range(start, stop)
        ]
        text = ("," if start else "") + _dump(entries)
        for f in files.values():
            f.write(text)
        for entry in entries:
            with tf.io.gfile.GFile(os.path.join(image_dir, entry["file_name"]), "wb") as f:
                f.write(b"")  # an empty stub (GFile creates a file on its first write)
    for f in files.values():
        f.write('],"annotations":[')

    counts = {"images": num_images, "instances": 0, "crowd": 0, "persons": 0}
    counts.update(with_keypoints=0, captions=0, polygon_points=0)
    first = {k: True for k in KINDS}
    ann_id = caption_id = 0
    for start in range(0, num_images, CHUNK):
        stop = min(start + CHUNK, num_images)
        owners = np.repeat(np.arange(start, stop), per_image[start:stop])
        classes = rng.choice(category_ids, size=len(owners), p=share)
        detail = np.where(classes == 1, 1.27, 0.91)  # sizes of the real files' polygons
        polygons = _polygon_instances(rng, heights[owners], widths[owners], detail)
        crowd = rng.random(len(owners)) < 0.009
        chunk = {k: [] for k in KINDS}
        for owner, (polys, bbox, area), cid, is_crowd in zip(
            owners, polygons, classes, crowd, strict=True
        ):
            ann_id += 1
            h, w = int(heights[owner]), int(widths[owner])
            if is_crowd:
                segmentation, bbox, area = _crowd_rle(rng, h, w)
            else:
                segmentation = polys
                counts["polygon_points"] += sum(len(p) for p in polys) // 2
            ann = {
                "segmentation": segmentation,
                "area": area,
                "iscrowd": int(is_crowd),
                "image_id": int(image_ids[owner]),
                "bbox": bbox,
                "category_id": int(cid),
                "id": ann_id,
            }
            chunk["instances"].append(ann)
            counts["instances"] += 1
            counts["crowd"] += int(is_crowd)
            if cid == 1:
                keypoints, labelled = _keypoints(rng, bbox)
                chunk["person_keypoints"].append(
                    {**ann, "num_keypoints": labelled, "keypoints": keypoints}
                )
                counts["persons"] += 1
                counts["with_keypoints"] += labelled > 0
        for i in range(start, stop):
            for _ in range(5 + int(rng.random() < 0.003)):
                caption_id += 1
                chunk["captions"].append(
                    {
                        "image_id": int(image_ids[i]),
                        "id": caption_id,
                        "caption": _caption(rng, vocabulary, word_weights),
                    }
                )
        counts["captions"] += len(chunk["captions"])
        for kind, items in chunk.items():
            if items:
                files[kind].write(("" if first[kind] else ",") + _dump(items))
                first[kind] = False
    tails = {
        "instances": '],"categories":' + json.dumps([_plain(c) for c in categories]) + "}",
        "person_keypoints": '],"categories":' + json.dumps([categories[0]]) + "}",
        "captions": "]}",
    }
    for kind, f in files.items():
        f.write(tails[kind])
        f.close()
    counts["file_mb"] = {k: round(tf.io.gfile.stat(p).length / 1e6, 1) for k, p in paths.items()}
    return counts


def _plain(category: dict) -> dict:
    """The instances file's category entry (no keypoint fields)."""
    return {k: category[k] for k in ("supercategory", "id", "name")}


def _train_tokenizer(root: str, captions: list[str], vocab_size: int) -> str:
    from unified_seq.tasks.tokenizer import CaptionTokenizer

    path = os.path.join(root, f"spm{vocab_size}.model")
    CaptionTokenizer.train(captions, path, vocab_size)
    return path


def _read_captions(root: str, limit: int | None = None) -> list[str]:
    path = os.path.join(root, "annotations", "captions_train2017.json")
    with tf.io.gfile.GFile(path, "rb") as f:
        content = json.loads(f.read())
    return [a["caption"] for a in content["annotations"][:limit]]


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process: steadier than wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def measure(what: str, root: str, process_count: int, tokenizer_path: str) -> dict:
    """One figure, in this (fresh) process: seconds, peak GB and GB after the imports."""
    from unified_seq import vocab
    from unified_seq.data import coco, inputs

    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs/multitask_coco.py"))
    config.data.coco_dir = root
    config.data.tokenizer_path = tokenizer_path
    space = vocab.TokenSpace.from_config(config.vocab)
    # Keyword arguments only when sharding, so the script also runs against a loader without them.
    shard = {"process_index": 0, "process_count": process_count} if process_count > 1 else {}
    result = {"what": what, "process_count": process_count, "imports_gb": round(_peak_gb(), 2)}
    tic, cpu = time.perf_counter(), _cpu_seconds()
    if what in ("parse", "parse_orjson"):
        # The parse alone, of the text the loader reads, with the collector paused as it does.
        loads = json.loads
        if what == "parse_orjson":
            import orjson

            loads = orjson.loads
        result["files_s"] = {}
        for kind in KINDS:
            data = bytearray()
            with tf.io.gfile.GFile(coco.annotation_path(root, kind, "train"), "rb") as f:
                while chunk := f.read(1 << 24):
                    data += chunk
            start = time.perf_counter()
            gc.disable()
            content = loads(data)
            gc.enable()
            result["files_s"][kind] = round(time.perf_counter() - start, 2)
            del content, data
    elif what == "load_coco_json":
        examples, _, stats = coco.load_coco_json(root, "train", space, **shard)
        result["images"], result["objects"] = stats["images"], stats["objects"]
    elif what == "load_split":
        data = inputs.load_split(config, "train", space, **shard)
        result["images"] = data.num_images
    else:
        raise ValueError(what)
    result["seconds"] = round(time.perf_counter() - tic, 2)
    result["cpu_s"] = round(_cpu_seconds() - cpu, 2)
    result["peak_gb"] = round(_peak_gb(), 2)
    return result


def _in_subprocess(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES)
    parser.add_argument("--dir", default="/tmp/coco_startup")
    parser.add_argument("--hosts", default="1,8", help="process counts to measure, e.g. 1,4,8")
    parser.add_argument("--out", default="coco_startup.json")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one figure
    parser.add_argument("--process-count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dir, args.process_count, args.tokenizer)))
        return

    params = {"generator_version": GENERATOR_VERSION, "images": args.images}
    marker = os.path.join(args.dir, MARKER)
    written = None
    if tf.io.gfile.exists(marker):
        with tf.io.gfile.GFile(marker) as f:
            written = json.loads(f.read())
    if written is None or written["params"] != params:
        if tf.io.gfile.exists(args.dir):
            tf.io.gfile.rmtree(args.dir)
        tic = time.perf_counter()
        counts = synthesise(args.dir, args.images)
        tokenizer = _train_tokenizer(args.dir, _read_captions(args.dir, 20000), 4000)
        written = {"params": params, "counts": counts, "tokenizer": tokenizer}
        written["synthesis_s"] = round(time.perf_counter() - tic, 1)
        with tf.io.gfile.GFile(marker, "w") as f:
            f.write(json.dumps(written))
    print(json.dumps(written, indent=1), flush=True)

    result = {**written, "real_coco_mb": REAL_SIZES_MB, "figures": []}
    common = ["--dir", args.dir, "--tokenizer", written["tokenizer"]]
    runs = [("parse", 1)]
    if importlib.util.find_spec("orjson"):
        runs.append(("parse_orjson", 1))
    for n in (int(h) for h in args.hosts.split(",")):
        runs += [("load_coco_json", n), ("load_split", n)]
    for what, n in runs:
        figure = _in_subprocess([*common, "--measure", what, "--process-count", str(n)])
        print(json.dumps(figure), flush=True)
        result["figures"].append(figure)
    tf.io.gfile.makedirs(RESULTS)
    with tf.io.gfile.GFile(os.path.join(RESULTS, args.out), "w") as f:
        f.write(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
