r"""Prediction on a validation split: images/s, and the AP of what it writes next to
the evaluation's.

    python benchmarks/predict_split.py --workdir /tmp/us --coco_dir DIR [--split val]

Runs `python -m unified_seq.predict`'s code on every image of the split
(with the split's annotations, so it writes COCO result files), times it,
scores those files with pycocotools, and sets the scores beside
WORKDIR/eval_results.json. For the two to be comparable, evaluate the run
with detections as prompts, as prediction does:

    python -m unified_seq.main --config CONFIG --workdir /tmp/us --mode eval \
        --config.eval.prompt_boxes=detections

Prints the figures and writes them to benchmarks/results/predict_split.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from unified_seq import coco_metrics, predict
from unified_seq.predictor import Predictor

RESULTS = os.path.join(os.path.dirname(__file__), "results", "predict_split.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--coco_dir", required=True, help="root of the split's COCO layout")
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default="", help="prediction folder (default: a temp folder)")
    args = parser.parse_args()

    annotations = os.path.join(args.coco_dir, "annotations", f"instances_{args.split}2017.json")
    images = os.path.join(args.coco_dir, f"{args.split}2017", "*")
    out = args.out or tempfile.mkdtemp(prefix="predict_split_")
    predictor = Predictor.from_workdir(args.workdir)
    # Warm up: compile every task's sampler at every bucket size a batch can hit.
    warm = predict.expand_images(images)[: args.batch_size]
    tic = time.perf_counter()
    predictor.predict(warm, batch_size=args.batch_size)
    warm_seconds = time.perf_counter() - tic

    summary = predict.run(
        args.workdir, images, out, annotations, batch_size=args.batch_size, predictor=predictor
    )
    with open(os.path.join(out, "predictions.jsonl")) as f:
        ids = [json.loads(line)["image_id"] for line in f]
    truth = coco_metrics.GroundTruth(args.coco_dir, args.split, ids)
    scores = {}
    for name, task in predictor.tasks.items():
        with open(os.path.join(out, f"{name}_results.json")) as f:
            scores[name] = task.metric(json.load(f), truth)
    evaluated_path = os.path.join(args.workdir, "eval_results.json")
    evaluated = {}
    if os.path.exists(evaluated_path):
        with open(evaluated_path) as f:
            evaluated = json.load(f)
    figures = {
        "workdir": args.workdir,
        "step": predictor.step,
        "images": summary["images"],
        "batch_size": args.batch_size,
        "seconds": summary["seconds"],
        "images_per_second": summary["images_per_second"],
        "warm_up_seconds": round(warm_seconds, 1),
        "predict_scores": scores,
        "eval_scores": {k: v for k, v in evaluated.items() if isinstance(v, dict)},
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(figures, indent=2))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(figures, f, indent=2)
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
