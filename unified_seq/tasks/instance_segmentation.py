"""Instance segmentation as tokens: an object's polygons (DESIGN §3).

Sequence: `[11, ymin, xmin, ymax, xmax, class] y x y x … EOS`. The prompt is
the object's box and class; the answer lists its polygons' vertices as
coordinate tokens, polygons joined by a separator point `40 40` (official:
a point, so the answer keeps an even length; it counts toward the point
budget).

Unlike the official code, which cut the vertex list at the budget (losing
the end of a polygon and every later one), an instance with more than
`max_points` points keeps its largest polygons and subsamples each one's
vertices evenly (at least 3 per polygon); in training the subsampling grid
gets a random phase so different vertices are seen across epochs.

Answers are sampled under a grammar (`answer_grammar`): coordinate pairs,
at least three points per polygon, then another point, the two-token
separator or EOS. Inference draws several answers per instance; `decode` rasterises each
with pycocotools and keeps the pixels covered by at least `mask_threshold`
of them (paper: 8 samples, 0.5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf

from unified_seq import coco_metrics, visualize, vocab
from unified_seq.data import views
from unified_seq.frame import to_pixels
from unified_seq.grammar import Grammar
from unified_seq.tasks import masks
from unified_seq.tasks.instances import PROMPT_LENGTH, InstanceTask, build_prompt
from unified_seq.tasks.sequence import build_sequences
from unified_seq.tasks.task import Labels, SamplerOptions, Truth

MIN_POLYGON_POINTS = 3


def sequence_length(cfg: Any) -> int:
    """Input/target length: the 6-token prompt and 2 tokens per point."""
    return PROMPT_LENGTH + 2 * int(cfg.max_points)


def _split_polygons(polygon: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """NaN-separated vertex list → vertices and contiguous polygon ids.

    Returns:
      points float32[N, 2] clipped to [0, 1], ids int32[N] in 0..G-1 (in
      order), counts int32[G] vertices per polygon. Empty polygons vanish.
    """
    polygon = tf.reshape(tf.cast(polygon, tf.float32), [-1, 2])
    is_sep = tf.reduce_any(tf.math.is_nan(polygon), axis=-1)
    part = tf.cumsum(tf.cast(is_sep, tf.int32))
    points = tf.clip_by_value(tf.boolean_mask(polygon, ~is_sep), 0.0, 1.0)
    return (points, *_relabel(tf.boolean_mask(part, ~is_sep)))


def _relabel(part: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Non-decreasing labels int32[N] → (ids 0..G-1 int32[N], counts int32[G])."""
    labels, ids = tf.unique(part)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(ids), ids, tf.size(labels))
    return ids, counts


def _polygon_areas(points: tf.Tensor, ids: tf.Tensor, counts: tf.Tensor) -> tf.Tensor:
    """Shoelace area of each polygon, float32[G] in normalised units."""
    starts = tf.cumsum(counts, exclusive=True)
    first = tf.gather(starts, ids)
    index = tf.range(tf.size(ids))
    last = index - first == tf.gather(counts, ids) - 1
    following = tf.gather(points, tf.where(last, first, index + 1))
    cross = points[:, 0] * following[:, 1] - points[:, 1] * following[:, 0]
    return tf.abs(tf.math.unsorted_segment_sum(cross, ids, tf.size(counts))) / 2.0


def _keep_polygons(
    points: tf.Tensor, ids: tf.Tensor, counts: tf.Tensor, max_points: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Drops polygons with < 3 vertices, then all but the largest that fit.

    With `g` polygons of 3 points and `g - 1` separator points the budget
    holds `g ≤ (max_points + 1) // 4` polygons.
    """
    valid = counts >= MIN_POLYGON_POINTS
    area = tf.where(valid, _polygon_areas(points, ids, counts), -1.0)
    rank = tf.math.invert_permutation(tf.argsort(-area, stable=True))
    keep = valid & (rank < (max_points + 1) // 4)
    keep_vertex = tf.gather(keep, ids)
    points = tf.boolean_mask(points, keep_vertex)
    return (points, *_relabel(tf.boolean_mask(ids, keep_vertex)))


def _points_per_polygon(counts: tf.Tensor, max_points: int) -> tf.Tensor:
    """How many vertices each polygon keeps, int32[G].

    Polygons and their separators fit in `max_points`; otherwise every
    polygon keeps 3 vertices and the remaining budget is shared in
    proportion to the vertices beyond 3, so no count exceeds the polygon's.
    """
    num_polygons = tf.size(counts)
    total = tf.reduce_sum(counts)
    budget = max_points - tf.maximum(num_polygons - 1, 0)
    spare = budget - MIN_POLYGON_POINTS * num_polygons
    excess = tf.maximum(total - MIN_POLYGON_POINTS * num_polygons, 1)
    shared = MIN_POLYGON_POINTS + (counts - MIN_POLYGON_POINTS) * spare // excess
    return tf.where(total <= budget, counts, shared)


def _subsample(
    points: tf.Tensor, counts: tf.Tensor, keep: tf.Tensor, phase: tf.Tensor
) -> tf.Tensor:
    """Evenly spaced vertices of each polygon, joined by NaN separator rows.

    Args:
      points: float32[N, 2] vertices grouped by polygon.
      counts: int32[G] vertices per polygon.
      keep: int32[G] vertices to keep per polygon (1 ≤ keep ≤ counts).
      phase: float32[G] in [0, 1): shift of the sampling grid.

    Returns:
      float32[sum(keep) + G - 1, 2] with a NaN row between polygons.
    """
    grid = tf.ragged.range(keep)
    rows = grid.value_rowids()
    n = tf.cast(tf.gather(counts, rows), tf.float64)
    k = tf.cast(tf.gather(keep, rows), tf.float64)
    step = tf.cast(grid.flat_values, tf.float64) + tf.cast(tf.gather(phase, rows), tf.float64)
    offset = tf.minimum(tf.cast(tf.floor(step * n / k), tf.int32), tf.gather(counts, rows) - 1)
    index = tf.gather(tf.cumsum(counts, exclusive=True), rows) + offset
    chosen = tf.RaggedTensor.from_value_rowids(
        tf.gather(points, index), rows, nrows=tf.size(counts, out_type=tf.int64)
    )
    separators = tf.fill([tf.size(counts), 1, 2], np.float32(np.nan))
    joined = tf.concat([chosen, tf.RaggedTensor.from_tensor(separators)], axis=1).flat_values
    return joined[: tf.maximum(tf.shape(joined)[0] - 1, 0)]


def _point_tokens(points: tf.Tensor, space: vocab.TokenSpace) -> tf.Tensor:
    """float32[T, 2] with NaN separator rows → int32[2T] tokens (separator 40 40)."""
    flat = tf.reshape(points, [-1])
    is_sep = tf.math.is_nan(flat)
    coords = space.coord_tokens(tf.where(is_sep, 0.0, flat))
    return tf.where(is_sep, vocab.SEPARATOR, coords)


def encode(
    bbox: tf.Tensor,
    class_id: tf.Tensor,
    polygon: tf.Tensor,
    seed: tf.Tensor,
    cfg: Any,
    space: vocab.TokenSpace,
    training: bool = True,
) -> dict[str, tf.Tensor]:
    """Tokenizes one instance's polygons.

    Args:
      bbox: float32[4] (ymin, xmin, ymax, xmax) normalised to the canvas.
      class_id: int32[] class id.
      polygon: float32[P, 2] (y, x) normalised; NaN rows separate the
        instance's polygons; P may be 0.
      seed: int32[2] or int64[2] stateless seed (phase of vertex subsampling).
      cfg: the `instance_segmentation` task config (max_points, eos_weight).
      space: token space.
      training: subsample with a random phase (else deterministic).

    Returns:
      `input_seq`, `target_seq` int32[L], `token_weights` float32[L] with
      L = sequence_length(cfg), and `num_truncated_points` int32[]: vertices
      of valid polygons (≥ 3 points) left out to fit `max_points`.
    """
    max_points = int(cfg.max_points)
    if max_points < MIN_POLYGON_POINTS:
        raise ValueError(f"instance_segmentation.max_points={max_points} must be at least 3.")
    points, ids, counts = _split_polygons(polygon)
    valid_vertices = tf.reduce_sum(tf.where(counts >= MIN_POLYGON_POINTS, counts, 0))
    points, ids, counts = _keep_polygons(points, ids, counts, max_points)
    keep = _points_per_polygon(counts, max_points)
    if training:
        phase = tf.random.stateless_uniform(tf.shape(counts), seed)
    else:
        phase = tf.zeros(tf.shape(counts))
    answer = _point_tokens(_subsample(points, counts, keep, phase), space)
    prompt = build_prompt(vocab.TASK_PROMPTS["instance_segmentation"], bbox, class_id, space)
    seq = build_sequences(
        prompt,
        answer,
        tf.ones(tf.shape(answer), tf.float32),
        sequence_length(cfg),
        float(cfg.eos_weight),
    )
    seq["num_truncated_points"] = valid_vertices - tf.reduce_sum(keep)
    return seq


def answer_grammar(space: vocab.TokenSpace) -> Grammar:
    """Polygons of at least 3 (y, x) coordinate pairs, joined by `40 40`, then EOS."""
    tokens = np.arange(space.vocab_size)
    transitions: dict[str, dict[str, str]] = {}
    # The first points of a polygon: coordinates only.
    for p in range(MIN_POLYGON_POINTS):
        after = f"y{p + 1}" if p + 1 < MIN_POLYGON_POINTS else "more"
        transitions[f"y{p}"] = {"coord": f"x{p}"}
        transitions[f"x{p}"] = {"coord": after}
    transitions["more"] = {"coord": "more_x", "sep": "sep2", "eos": "end"}
    transitions["more_x"] = {"coord": "more"}
    transitions["sep2"] = {"sep": "y0"}
    transitions["end"] = {"eos": "end"}
    return Grammar.build(
        kinds={
            "coord": space.is_coord(tokens),
            "sep": tokens == vocab.SEPARATOR,
            "eos": tokens == vocab.EOS,
        },
        transitions=transitions,
        start="y0",
    )


def decode_polygons(tokens: np.ndarray, frame: np.ndarray, space: vocab.TokenSpace) -> list:
    """Answer tokens → polygons in original pixels.

    Reads up to the first EOS. Any non-coordinate token (the separator 40,
    single or paired, or a stray token) ends the current polygon; a
    polygon's odd trailing coordinate is dropped, and so are polygons of
    fewer than 3 points.

    Args:
      tokens: int[T] answer tokens (after the prompt).
      frame: float32[4] frame of the canvas (frame.py).
      space: token space.

    Returns:
      list of float32[P, 2] (y, x) pixel polygons of the original image.
    """
    tokens = np.asarray(tokens).reshape(-1)
    ends = np.flatnonzero(tokens == vocab.EOS)
    if ends.size:
        tokens = tokens[: ends[0]]
    polygons = []
    for run in np.split(tokens, np.flatnonzero(~space.is_coord(tokens))):
        coords = run[space.is_coord(run)]
        coords = coords[: len(coords) // 2 * 2]
        if len(coords) >= 2 * MIN_POLYGON_POINTS:
            points = space.token_coords(coords).reshape(-1, 2)
            polygons.append(to_pixels(points, frame).astype(np.float32))
    return polygons


def decode(
    samples: np.ndarray,
    frame: np.ndarray,
    image_size: tuple[int, int],
    space: vocab.TokenSpace,
    cfg: Any,
) -> np.ndarray:
    """Mask of one instance from several sampled answers (the paper's ensemble).

    Args:
      samples: int[S, T] answers (after the prompt); int[T] is one sample.
      frame: float32[4] frame of the canvas.
      image_size: (height, width) of the original image in pixels.
      space: token space.
      cfg: task config (`mask_threshold`).

    Returns:
      uint8[h, w]: 1 where at least `mask_threshold` of the samples' masks
      cover the pixel (a sample without polygons votes background).
    """
    samples = np.atleast_2d(np.asarray(samples))
    height, width = (int(v) for v in image_size)
    votes = np.zeros([height, width], np.float32)
    for answer in samples:
        votes += masks.polygons_to_mask(decode_polygons(answer, frame, space), height, width)
    return (votes / len(samples) >= float(cfg.mask_threshold)).astype(np.uint8)


def to_coco_results(
    mask: np.ndarray, score: float, class_id: int, image_id: int, category_map: Any
) -> dict:
    """One COCO `segm` result; `category_map.to_dataset_id` maps the class back."""
    return {
        "image_id": int(image_id),
        "category_id": int(category_map.to_dataset_id(int(class_id))),
        "segmentation": masks.mask_to_rle(mask),
        "score": float(score),
    }


class InstanceSegmentation(InstanceTask):
    """Instance segmentation: prompt an object's box and class, answer its polygons."""

    prompt_token = vocab.TASK_PROMPTS["instance_segmentation"]
    annotations = ("boxes", "polygons")
    geometry_key = "points"
    count_keys = ("num_truncated_points",)

    @property
    def sequence_length(self) -> int:
        return sequence_length(self.cfg)

    def candidates(self, example: dict) -> tf.Tensor:
        return views.target_objects(example) & (example["objects/polygons"].row_lengths() > 0)

    def geometry(self, objects: dict) -> Any:
        return objects["polygons"]

    def encode_instance(self, box, class_id, geometry, seed) -> dict[str, tf.Tensor]:
        return encode(box, class_id, geometry, seed, self.cfg, self.space, training=True)

    def answer_grammar(self, labels: Labels | None) -> Grammar:
        del labels
        return answer_grammar(self.space)

    def sampler_options(self, labels: Labels | None = None) -> SamplerOptions:
        return dataclasses.replace(
            super().sampler_options(labels), num_samples=int(self.cfg.num_samples)
        )

    def results(self, batch: dict, samples: dict, labels: Labels) -> list[dict]:
        count = int(self.cfg.num_samples)
        results = []
        for i, image_id in enumerate(batch["image/id"]):
            mask = decode(
                samples["tokens"][i * count : (i + 1) * count],
                batch["frame"][i],
                batch["image/size"][i],
                self.space,
                self.cfg,
            )
            results.append(
                to_coco_results(
                    mask, batch["score"][i], batch["class"][i], int(image_id), labels.category_map
                )
            )
        return results

    def metric(self, results: list[dict], truth: Truth) -> dict[str, float]:
        ap = coco_metrics.coco_ap(truth.coco("instances"), results, "segm", truth.image_ids)
        return {"AP": ap["AP"]}

    def preview(self, example: dict, labels: Labels):
        del labels
        frame = self.canvas_frame()
        polygons = [decode_polygons(a, frame, self.space) for a in self.target_answers(example)]
        return visualize.draw(example["image"], polygons=polygons)
