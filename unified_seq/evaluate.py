"""Evaluation: sample every task's answers, decode them, score them as COCO does.

Per task: detection (prompt [10], class-range scores, fake class dropped),
instance segmentation (N sampled polygons per instance, mask vote), keypoints
(a crop around each person) and captioning (BLEU-4, CIDEr). Segmentation and
keypoint prompts come from ground-truth boxes or, with
`eval.prompt_boxes=detections`, from the model's own detections.

Writes `WORKDIR/<task>_results.json` (COCO result format, original pixels and
dataset category ids) and `WORKDIR/eval_results.json` (DESIGN §7).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from unified_seq import caption_metrics, decoding, vocab
from unified_seq.data import inputs, pipeline
from unified_seq.tasks import captioning, detection, instance_segmentation, keypoints, prompts

PROMPT_BOXES = ("gt", "detections")
# Prompt length of each task's inference sequence.
PROMPT_LEN = {
    "object_detection": 1,
    "instance_segmentation": prompts.PROMPT_LENGTH,
    "keypoint_detection": prompts.PROMPT_LENGTH,
    "captioning": 1,
}


class Predictor:
    """Jitted image encoding and cached sampling, one compile per task setting."""

    def __init__(self, model: Any, params: Any, config: Any, space: vocab.TokenSpace, lengths):
        self.model = model
        self.variables = {"params": params}
        self.config = config
        self.space = space
        self.lengths = lengths
        self._encode = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))
        self._samplers: dict[tuple, Any] = {}

    def max_answer(self, task: str) -> int:
        """Answer tokens (EOS included) that fit the task's sequence."""
        return self.lengths[task] - PROMPT_LEN[task] + 1

    def _sampler(self, task: str, logits: bool, logits_range: tuple | None):
        key = (task, logits, logits_range)
        if key not in self._samplers:
            cfg = self.config.tasks[task]
            token_mask = None
            if task == "object_detection" and cfg.decode_all_objects:
                token_mask = detection.slot_token_mask(self.space)
            self._samplers[key] = jax.jit(
                functools.partial(
                    decoding.sample_sequences,
                    self.model,
                    max_len=self.max_answer(task),
                    temperature=float(cfg.temperature),
                    top_k=int(cfg.top_k),
                    top_p=float(cfg.top_p),
                    logits_range=logits_range,
                    return_logits=logits,
                    token_mask=token_mask,
                )
            )
        return self._samplers[key]

    def sample(
        self,
        task: str,
        images: np.ndarray,
        prompt_tokens: np.ndarray,
        rng: jax.Array,
        *,
        num_samples: int = 1,
        logits: bool = False,
        logits_range: tuple | None = None,
    ) -> dict[str, np.ndarray]:
        """Answers for a batch; rows b·S … b·S+S-1 are the samples of example b."""
        encoded = self._encode(self.variables, jnp.asarray(images))
        prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
        if num_samples > 1:
            encoded = jnp.repeat(encoded, num_samples, axis=0)
            prompt_tokens = jnp.repeat(prompt_tokens, num_samples, axis=0)
        fn = self._sampler(task, logits, logits_range)
        return jax.device_get(fn(self.variables, encoded, prompt_tokens, rng))


def _padded(batch: dict[str, np.ndarray], size: int) -> tuple[dict[str, np.ndarray], int]:
    """Pads a partial last batch to `size` rows (one compile for every batch)."""
    n = len(next(iter(batch.values())))
    if n == size:
        return batch, n
    pad = {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in batch.items()}
    return pad, n


def _batches(task: str, data: inputs.SplitData, config: Any, space, detections=None):
    """Numpy evaluation batches of `task`, padded to the evaluation batch size."""
    max_examples = int(config.eval.max_examples)
    examples = data.examples
    if detections is not None:
        examples = pipeline.attach_detections(examples, detections, max_examples)
        max_examples = 0
    ds = pipeline.eval_dataset(
        task,
        examples,
        config,
        space,
        batch_size=int(config.eval.batch_size),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        max_examples=max_examples,
    )
    for batch in inputs.numpy_batches(ds, data):
        yield _padded(batch, int(config.eval.batch_size))


def predict_detections(predictor: Predictor, data, config, space, rng) -> dict[int, dict]:
    """Detections of every evaluated image: image id → boxes (pixels), classes, scores."""
    cfg = config.tasks.object_detection
    out = {}
    class_range = (vocab.CLASS_SHIFT, space.coord_shift)
    for k, (batch, n) in enumerate(_batches("object_detection", data, config, space)):
        prompt = np.full([len(batch["image"]), 1], vocab.TASK_PROMPTS["object_detection"])
        res = predictor.sample(
            "object_detection", batch["image"], prompt, jax.random.fold_in(rng, k),
            logits_range=class_range,
        )  # fmt: skip
        for i in range(n):
            pred = detection.decode(
                res["tokens"][i], res["range_probs"][i], batch["frame"][i], space, cfg
            )
            # The class range is wider than the data set: classes it lacks
            # have nothing to be scored under, nor to prompt other tasks with.
            known = np.isin(pred["classes"], data.category_map.class_ids)
            out[int(batch["image/id"][i])] = {k: v[known] for k, v in pred.items()}
    return out


def _instance_results(task, predictor, data, config, space, rng, detections) -> list[dict]:
    cfg = config.tasks[task]
    results = []
    samples = int(cfg.num_samples) if task == "instance_segmentation" else 1
    k_points = int(config.data.num_keypoints)
    for k, (batch, n) in enumerate(_batches(task, data, config, space, detections)):
        res = predictor.sample(
            task, batch["image"], batch["prompt"], jax.random.fold_in(rng, k),
            num_samples=samples, logits=task == "keypoint_detection",
        )  # fmt: skip
        for i in range(n):
            image_id = int(batch["image/id"][i])
            if task == "instance_segmentation":
                mask = instance_segmentation.decode(
                    res["tokens"][i * samples : (i + 1) * samples],
                    batch["frame"][i],
                    batch["image/size"][i],
                    space,
                    cfg,
                )
                results.append(
                    instance_segmentation.to_coco_results(
                        mask, batch["score"][i], batch["class"][i], image_id, data.category_map
                    )
                )
            else:
                pred = keypoints.decode(
                    res["tokens"][i], res["logits"][i], batch["frame"][i], space, cfg,
                    box=batch["prompt_box"][i], num_keypoints=k_points,
                )  # fmt: skip
                dataset_id = int(data.category_map.to_dataset_id(np.array([batch["class"][i]]))[0])
                results.append(keypoints.to_coco_results(pred, image_id, dataset_id))
    return results


def _caption_results(predictor, data, config, space, rng) -> list[dict]:
    predictions = {}
    for k, (batch, n) in enumerate(_batches("captioning", data, config, space)):
        prompt = np.full([len(batch["image"]), 1], vocab.TASK_PROMPTS["captioning"])
        res = predictor.sample("captioning", batch["image"], prompt, jax.random.fold_in(rng, k))
        for i in range(n):
            text = captioning.decode(res["tokens"][i], data.tokenizer, space)
            predictions[int(batch["image/id"][i])] = text
    return [captioning.to_coco_results(t, i) for i, t in predictions.items()]


def _coco_ap(gt: COCO, results: list[dict], iou_type: str, image_ids: list[int]) -> dict:
    """COCOeval summary numbers (AP as pycocotools reports it, 0–1)."""
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


def _ground_truth(config: Any, kind: str) -> COCO:
    path = os.path.join(
        inputs.coco_dir(config), "annotations", f"{kind}_{config.data.eval_split}2017.json"
    )
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def evaluate(config: Any, workdir: str, params: Any, model: Any, step: int) -> dict:
    """Evaluates every configured task; writes result files and eval_results.json."""
    if config.eval.prompt_boxes not in PROMPT_BOXES:
        raise ValueError(
            f"config.eval.prompt_boxes={config.eval.prompt_boxes!r}; choose one of {PROMPT_BOXES}"
        )
    if config.data.source == "tfds":
        raise ValueError(
            "evaluation reads COCO JSON ground truth: use data.source=coco_json (tfds coco/2017 "
            "has no masks, keypoints or captions to score against)"
        )
    from unified_seq import train  # Local: train imports the codecs evaluate shares.

    space = vocab.TokenSpace.from_config(config.vocab)
    data = inputs.load_split(config, config.data.eval_split, space)
    predictor = Predictor(model, params, config, space, train.sequence_lengths(config))
    rng = jax.random.key(int(config.seed) + 1)
    report: dict[str, Any] = {"step": int(step)}
    tasks = list(config.tasks)
    detections = None
    tic = time.perf_counter()
    need_det = "object_detection" in tasks or config.eval.prompt_boxes == "detections"
    if need_det:
        detections = predict_detections(predictor, data, config, space, jax.random.fold_in(rng, 0))
        min_score = float(config.eval.min_detection_score)
        results = _gather(
            [
                r
                for image_id, pred in detections.items()
                for r in detection.to_coco_results(pred, image_id, data.category_map)
                if r["score"] >= min_score
            ]
        )
        _write(workdir, "object_detection", results)
        if "object_detection" in tasks:
            gt = _ground_truth(config, "instances")
            ids = _evaluated_image_ids(data, config)
            report["object_detection"] = _coco_ap(gt, results, "bbox", ids)
    prompts_from = detections if config.eval.prompt_boxes == "detections" else None
    for t, (task, kind, iou) in enumerate(
        [
            ("instance_segmentation", "instances", "segm"),
            ("keypoint_detection", "person_keypoints", "keypoints"),
        ]
    ):
        if task not in tasks:
            continue
        results = _gather(
            _instance_results(
                task, predictor, data, config, space, jax.random.fold_in(rng, t + 1), prompts_from
            )
        )
        _write(workdir, task, results)
        gt = _ground_truth(config, kind)
        ids = _evaluated_image_ids(data, config)
        report[task] = {"AP": _coco_ap(gt, results, iou, ids)["AP"]}
    if "captioning" in tasks:
        results = _gather(
            _caption_results(predictor, data, config, space, jax.random.fold_in(rng, 9))
        )
        _write(workdir, "captioning", results)
        gt = _ground_truth(config, "captions")
        refs: dict[int, list[str]] = {}
        for ann in gt.dataset["annotations"]:
            refs.setdefault(int(ann["image_id"]), []).append(ann["caption"])
        preds = {r["image_id"]: r["caption"] for r in results}
        report["captioning"] = caption_metrics.caption_scores(refs, preds)
    report["seconds"] = round(time.perf_counter() - tic, 1)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval_results.json"), "w") as f:
            json.dump(report, f, indent=2)
        # Every evaluation of the run, one JSON line each: the learning curve.
        with open(os.path.join(workdir, "eval_history.jsonl"), "a") as f:
            f.write(json.dumps({**report, "wall_time": round(time.time(), 1)}) + "\n")
    logging.info("Evaluation at step %d: %s", step, report)
    return report


def _evaluated_image_ids(data: inputs.SplitData, config: Any) -> list[int]:
    ids = data.examples.map(lambda ex: ex["image/id"])
    if int(config.eval.max_examples):
        ids = ids.take(int(config.eval.max_examples))
    return [int(i) for i in ids.as_numpy_iterator()]


def _gather(results: list[dict]) -> list[dict]:
    """Every process's results, on every process (each evaluated its own shard)."""
    if jax.process_count() == 1:
        return results
    blob = np.frombuffer(json.dumps(results).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([blob.size]))
    padded = np.zeros([int(sizes.max())], np.uint8)
    padded[: blob.size] = blob
    blobs = multihost_utils.process_allgather(padded)
    merged = []
    for row, size in zip(blobs, sizes.reshape(-1), strict=True):
        merged += json.loads(bytes(row[: int(size)]).decode())
    return merged


def _write(workdir: str, task: str, results: list[dict]) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"{task}_results.json"), "w") as f:
            json.dump(results, f)
