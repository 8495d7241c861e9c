"""Object detection as tokens: `[10] ymin xmin ymax xmax class … EOS` (DESIGN §3).

Objects are written in random order, at most `max_instances` of them, each as
four coordinate tokens and its class token `100 + class id`.

Sequence augmentation (Pix2Seq, official `augment_bbox`): in training the
object list is filled up to `max_instances` with noise objects after the real
ones — jittered duplicates of real boxes, and "bad" boxes (real boxes moved to
a random centre, and random boxes) — whose target class is the fake class 30.
Their coordinates are not trained (weight 0), their class is: the model learns
to call its own weak guesses fake, and that fake mass is what lowers a
prediction's score at inference. The decoder's input copy of every class token
is corrupted (`rand_n_fake_cls`: a random class or the fake class, 50/50) while
the targets keep the true classes.

At inference an object's class is the argmax of the softmax over the whole
vocabulary restricted to the class range, and its score that probability (not
renormalised, so fake-class mass counts against it); with `drop_fake`,
objects whose sampled class token is the fake class are dropped.

Answers are sampled under a grammar (`answer_grammar`): coordinate
positions may only hold coordinate tokens and class positions only class
tokens or the fake class; EOS may come only where an object would start.
Without it a small model drifts into malformed slots (fake tokens where
coordinates belong) and the object list ends there. `decode_all_objects`
also rules EOS out, filling every one of the `max_instances` slots as the
official decoder (which always runs the full length) does: the model's extra
guesses become low-score detections, which raise recall and cost little
precision under AP's ranking.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf
from ml_collections import ConfigDict

from unified_seq import coco_metrics, visualize, vocab
from unified_seq.data import transforms, views
from unified_seq.frame import boxes_to_pixels
from unified_seq.grammar import Grammar
from unified_seq.tasks.sequence import build_sequences
from unified_seq.tasks.task import Labels, SamplerOptions, Task, Truth, one_example

PROMPT_TOKEN = vocab.TASK_PROMPTS["object_detection"]
TOKENS_PER_OBJECT = 5
# Official noise recipe: duplicates jitter each coordinate by N(0, 0.05 x box
# size) truncated at 2 sd; random boxes take |N(0, 0.5)| sizes truncated at 2 sd.
DUPLICATE_JITTER_SD = 0.05
RANDOM_BOX_SIZE_SD = 0.5
NOISE_CLASS_WEIGHT = 1.0
OBJECT_ORDERS = ("random", "raster")
CLASS_CORRUPTIONS = ("rand_n_fake_cls", "none")


def sequence_length(cfg: ConfigDict) -> int:
    """Input/target length: the prompt and 5 tokens per object (EOS fits after them)."""
    return 1 + TOKENS_PER_OBJECT * int(cfg.max_instances)


def answer_grammar(
    space: vocab.TokenSpace, allow_eos: bool = True, class_ids: Any = None
) -> Grammar:
    """Objects of four coordinate tokens and a class token (a class or the fake
    class); EOS only where an object would start, and not at all without
    `allow_eos`. `class_ids`: the data set's classes (the class range is
    wider than any data set); None: the whole class range."""
    tokens = np.arange(space.vocab_size)
    classes = space.is_class(tokens)
    if class_ids is not None:
        classes &= np.isin(tokens - vocab.CLASS_SHIFT, np.asarray(class_ids))
    slot = {"coord": "x0"}
    if allow_eos:
        slot["eos"] = "end"
    return Grammar.build(
        kinds={
            "coord": space.is_coord(tokens),
            "class": classes | (tokens == vocab.FAKE_CLASS),
            "eos": tokens == vocab.EOS,
        },
        transitions={
            "y0": slot,
            "x0": {"coord": "y1"},
            "y1": {"coord": "x1"},
            "x1": {"coord": "class"},
            "class": {"class": "y0"},
            "end": {"eos": "end"},
        },
        start="y0",
    )


def check_config(cfg: ConfigDict) -> None:
    """Raises ValueError, naming the field, on settings `encode` cannot honour."""
    if cfg.object_order not in OBJECT_ORDERS:
        raise ValueError(
            f"object_detection.object_order={cfg.object_order!r}; use one of {OBJECT_ORDERS}"
        )
    if cfg.class_corruption not in CLASS_CORRUPTIONS:
        raise ValueError(
            f"object_detection.class_corruption={cfg.class_corruption!r}; "
            f"use one of {CLASS_CORRUPTIONS}"
        )


def _clip01(boxes: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(boxes, 0.0, 1.0)


def _centred_boxes(centre: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """float32[n, 2] (cy, cx) centres and (h, w) sizes → clipped boxes float32[n, 4]."""
    half = tf.abs(size) / 2.0
    return _clip01(tf.concat([centre - half, centre + half], axis=-1))


def _jittered_boxes(boxes: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Duplicates: each coordinate moves by a truncated normal share of the box size."""
    hw = boxes[:, 2:] - boxes[:, :2]
    rate = tf.random.stateless_truncated_normal(tf.shape(boxes), seed, stddev=DUPLICATE_JITTER_SD)
    return _clip01(boxes + tf.tile(hw, [1, 2]) * rate)


def _shifted_boxes(boxes: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Bad boxes: real box sizes at uniformly random centres."""
    centre = tf.random.stateless_uniform(tf.shape(boxes[:, :2]), seed)
    return _centred_boxes(centre, boxes[:, 2:] - boxes[:, :2])


def _random_boxes(count: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Bad boxes: random centres, sizes |truncated N(0, 0.5)|."""
    centre_seed, size_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    centre = tf.random.stateless_uniform([count, 2], centre_seed)
    size = tf.random.stateless_truncated_normal([count, 2], size_seed, stddev=RANDOM_BOX_SIZE_SD)
    return _centred_boxes(centre, size)


def _noise_boxes(boxes: tf.Tensor, count: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Noise objects for sequence augmentation, as the official `augment_bbox`.

    A random number of duplicates (uniform in [0, count]; none without real
    boxes) and the rest bad boxes, drawn from a 50/50 pool of shifted copies
    and random boxes; the result is shuffled. Source boxes are drawn without
    replacement from the real boxes tiled to cover `count`.

    Args:
      boxes: float32[n, 4] real boxes (ymin, xmin, ymax, xmax) in [0, 1].
      count: int32[] number of noise boxes.
      seed: stateless seed.

    Returns:
      float32[count, 4] boxes clipped to [0, 1].
    """
    s = tf.random.experimental.stateless_split(seed, 8)
    n = tf.shape(boxes)[0]
    dup_count = tf.random.stateless_uniform([], s[0], 0, count + 1, dtype=tf.int32)
    dup_count = tf.where(n > 0, dup_count, 0)
    bad_count = count - dup_count
    tiled = tf.tile(boxes, [count // tf.maximum(n, 1) + 1, 1])

    sources = tf.random.experimental.stateless_shuffle(tiled, s[1])
    bad_pool = tf.concat(
        [_shifted_boxes(sources[:bad_count], s[2]), _random_boxes(bad_count, s[3])], axis=0
    )
    bad = tf.random.experimental.stateless_shuffle(bad_pool, s[4])[:bad_count]

    sources = tf.random.experimental.stateless_shuffle(tiled, s[5])
    duplicates = _jittered_boxes(sources[:dup_count], s[6])
    return tf.random.experimental.stateless_shuffle(tf.concat([bad, duplicates], axis=0), s[7])


def _corrupt_classes(
    class_tokens: tf.Tensor, seed: tf.Tensor, space: vocab.TokenSpace
) -> tf.Tensor:
    """rand_n_fake_cls: each token becomes a uniform class token or FAKE_CLASS, 50/50."""
    coin_seed, class_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.shape(class_tokens)
    random_class = tf.random.stateless_uniform(
        shape, class_seed, vocab.CLASS_SHIFT, space.coord_shift, dtype=tf.int32
    )
    fake = tf.random.stateless_uniform(shape, coin_seed) < 0.5
    return tf.where(fake, vocab.FAKE_CLASS, random_class)


def encode(
    bbox: tf.Tensor,
    classes: tf.Tensor,
    seed: tf.Tensor,
    cfg: ConfigDict,
    space: vocab.TokenSpace,
    training: bool = True,
    extent: tf.Tensor | None = None,
) -> dict[str, tf.Tensor]:
    """Tokenizes an image's objects.

    Args:
      bbox: float32[N, 4] (ymin, xmin, ymax, xmax) normalised to the padded
        canvas; crowd and degenerate boxes already removed.
      classes: int32[N] class ids (token = 100 + id).
      seed: int32[2] or int64[2] stateless seed.
      cfg: the `object_detection` task config (max_instances, eos_weight,
        noise_objects, class_corruption).
      space: token space.
      training: add noise objects and corrupt input classes (per cfg);
        objects are in `cfg.object_order` either way (random: the paper).
      extent: float32[2] (height, width) of the image inside the canvas, as a
        share of the canvas side; noise boxes stay inside it, as the official
        code draws them before padding. None: the whole canvas.

    Returns:
      `input_seq`, `target_seq` int32[L], `token_weights` float32[L]
      (L = sequence_length(cfg)), and `num_truncated` int32[]: objects beyond
      `max_instances` that were left out.
    """
    check_config(cfg)
    max_instances = int(cfg.max_instances)
    # stateless_split draws seeds of the seed's dtype: one dtype makes int32
    # and int64 seeds of equal value give equal sequences.
    seed = tf.cast(seed, tf.int64)
    order_seed, noise_seed, corrupt_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3)
    )
    bbox = tf.reshape(tf.cast(bbox, tf.float32), [-1, 4])
    classes = tf.reshape(tf.cast(classes, tf.int32), [-1])
    n = tf.shape(bbox)[0]
    if cfg.object_order == "raster":
        # Top-to-bottom, then left-to-right: one answer per image, which a
        # small model learns far sooner than the paper's random order.
        q = space.coord_tokens(bbox[:, :2])
        order = tf.argsort(q[:, 0] * space.bins + q[:, 1], stable=True)[:max_instances]
    else:
        order = tf.random.experimental.stateless_shuffle(tf.range(n), order_seed)
        order = order[:max_instances]
    bbox = tf.gather(bbox, order)
    class_tokens = tf.gather(classes, order) + vocab.CLASS_SHIFT
    num_real = tf.shape(order)[0]

    if training and cfg.noise_objects:
        scale = tf.ones([2]) if extent is None else tf.cast(extent, tf.float32)
        scale = tf.tile(scale, [2])
        noise = _noise_boxes(bbox / scale, max_instances - num_real, noise_seed) * scale
        bbox = tf.concat([bbox, noise], axis=0)
        class_tokens = tf.concat(
            [class_tokens, tf.fill([max_instances - num_real], vocab.FAKE_CLASS)], axis=0
        )

    is_real = tf.range(tf.shape(bbox)[0]) < num_real
    coord_weight = tf.cast(is_real, tf.float32)
    class_weight = tf.where(is_real, 1.0, NOISE_CLASS_WEIGHT)
    weights = tf.concat([tf.tile(coord_weight[:, None], [1, 4]), class_weight[:, None]], axis=1)
    coords = space.coord_tokens(bbox)

    def sequences(cls_tokens: tf.Tensor) -> dict[str, tf.Tensor]:
        answer = tf.concat([coords, cls_tokens[:, None]], axis=1)
        return build_sequences(
            tf.constant([PROMPT_TOKEN]),
            tf.reshape(answer, [-1]),
            tf.reshape(weights, [-1]),
            sequence_length(cfg),
            float(cfg.eos_weight),
        )

    seq = sequences(class_tokens)
    if training and cfg.class_corruption == "rand_n_fake_cls":
        corrupted = sequences(_corrupt_classes(class_tokens, corrupt_seed, space))
        seq["input_seq"] = corrupted["input_seq"]
    seq["num_truncated"] = tf.maximum(n - max_instances, 0)
    return seq


def class_range_probs(scores: np.ndarray, space: vocab.TokenSpace) -> np.ndarray:
    """Probabilities of the class tokens [100, coord_shift), float64[T, coord_shift - 100].

    Args:
      scores: float[T, V] raw logits over the whole vocabulary (softmax taken
        here), or float[T, coord_shift - 100] that softmax already sliced to
        the class range (`decoding.sample_sequences(logits_range=...)`).
    """
    scores = np.asarray(scores, np.float64)
    num_classes = space.coord_shift - vocab.CLASS_SHIFT
    if scores.shape[-1] == num_classes:
        return scores
    if scores.shape[-1] < space.coord_shift:
        raise ValueError(
            f"detection scores have {scores.shape[-1]} entries per token; expected the whole "
            f"vocabulary (≥ {space.coord_shift}) or the class range ({num_classes})"
        )
    z = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e[:, vocab.CLASS_SHIFT : space.coord_shift] / e.sum(axis=-1, keepdims=True)


def _complete_objects(tokens: np.ndarray, space: vocab.TokenSpace) -> int:
    """How many leading quintuples are objects: before the first EOS, all four coordinates."""
    ends = np.flatnonzero(tokens == vocab.EOS)
    count = (ends[0] if ends.size else len(tokens)) // TOKENS_PER_OBJECT
    quints = tokens[: count * TOKENS_PER_OBJECT].reshape(count, TOKENS_PER_OBJECT)
    malformed = np.flatnonzero(~space.is_coord(quints[:, :4]).all(axis=1))
    return int(malformed[0]) if malformed.size else count


def decode(
    tokens: np.ndarray,
    logits: np.ndarray | None,
    frame: np.ndarray,
    space: vocab.TokenSpace,
    cfg: ConfigDict,
    class_ids: Any = None,
) -> dict[str, np.ndarray]:
    """Detections from generated answer tokens.

    Objects are read five tokens at a time up to the first EOS or the first
    object whose coordinate positions hold anything but coordinate tokens.

    Args:
      tokens: int[T] answer tokens (after the prompt).
      logits: float[T, V] raw logits each token was sampled from, or
        float[T, coord_shift - 100] class-range probabilities (see
        `class_range_probs`); None: classes from the sampled tokens, scores 1.
        Without them an object whose class token is not a class is skipped.
      frame: float32[4] frame of the canvas (pixel = c * scale + offset).
      space: token space.
      cfg: the `object_detection` task config (drop_fake).
      class_ids: the data set's class ids: an object's class is the most
        likely of them (other classes have no category to be scored
        under); None: the most likely of the whole class range.

    Returns:
      `boxes` float32[M, 4] (ymin, xmin, ymax, xmax) in original-image
      pixels, `classes` int32[M] class ids, `scores` float32[M].
    """
    tokens = np.asarray(tokens).reshape(-1)
    count = _complete_objects(tokens, space)
    quints = tokens[: count * TOKENS_PER_OBJECT].reshape(count, TOKENS_PER_OBJECT)
    sampled_class = quints[:, 4]
    keep = np.ones([count], bool)
    if cfg.drop_fake:
        keep &= sampled_class != vocab.FAKE_CLASS
    if logits is None:
        keep &= space.is_class(sampled_class)
        classes = sampled_class - vocab.CLASS_SHIFT
        scores = np.ones([count], np.float32)
    else:
        class_positions = np.arange(count) * TOKENS_PER_OBJECT + 4
        probs = class_range_probs(np.asarray(logits)[class_positions], space)
        if class_ids is not None:
            known = np.zeros([probs.shape[-1]], bool)
            known[np.asarray(class_ids)] = True
            probs = np.where(known, probs, -1.0)
        # Index in the class range = class id, as the range starts at CLASS_SHIFT.
        classes = np.argmax(probs, axis=-1)
        scores = probs[np.arange(count), classes]
    boxes = np.clip(space.token_coords(quints[:, :4]), 0.0, 1.0)
    boxes = np.concatenate(
        [np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], axis=1
    )
    return {
        "boxes": boxes_to_pixels(boxes[keep], frame).reshape(-1, 4).astype(np.float32),
        "classes": np.asarray(classes)[keep].astype(np.int32),
        "scores": np.asarray(scores)[keep].astype(np.float32),
    }


def to_coco_results(pred: dict, image_id: int, category_map: Any) -> list[dict]:
    """COCO `bbox` results of one image: [x, y, width, height] in original pixels.

    `category_map.to_dataset_id` maps class ids back to the data set's
    category ids; detections of a class the data set lacks (the class range
    is wider than any data set) have no category to be scored under and are
    left out.
    """
    dataset_ids = {}
    for c in np.unique(pred["classes"]).tolist():
        try:
            dataset_ids[c] = int(np.asarray(category_map.to_dataset_id(np.array([c])))[0])
        except ValueError:
            continue
    results = []
    classes = np.asarray(pred["classes"]).tolist()
    for box, c, score in zip(pred["boxes"], classes, pred["scores"], strict=True):
        if c not in dataset_ids:
            continue
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        results.append(
            {
                "image_id": int(image_id),
                "category_id": dataset_ids[c],
                "bbox": [xmin, ymin, xmax - xmin, ymax - ymin],
                "score": float(score),
            }
        )
    return results


def category_names(class_ids: np.ndarray, category_map: Any) -> list[str]:
    """Category name of each class id (the id itself for classes the data set lacks)."""
    names = dict(zip(category_map.class_ids, category_map.names, strict=True))
    return [names.get(int(c), str(int(c))) for c in class_ids]


class ObjectDetection(Task):
    """Object detection: prompt `[10]`, answer five tokens per object (module docstring)."""

    prompt_token = PROMPT_TOKEN
    annotations = ("boxes",)
    gives_boxes = True

    def __init__(self, name: str, cfg: ConfigDict, run: Any):
        super().__init__(name, cfg, run)
        check_config(cfg)

    @property
    def sequence_length(self) -> int:
        return sequence_length(self.cfg)

    def has_training_target(self, example: dict) -> tf.Tensor:
        # Official: images without objects are not trained for detection.
        return tf.reduce_any(views.target_objects(example))

    def train_examples(
        self, example: dict, image: tf.Tensor, seed: tf.Tensor, labels: Labels
    ) -> dict[str, tf.Tensor]:
        del labels
        size = self.run.image_size
        seeds = tf.random.experimental.stateless_split(seed, 6)
        keep = views.target_objects(example)
        boxes = example["objects/bbox"] / tf.tile(transforms.image_hw(image), [2])
        f = {
            "image": image,
            "boxes": tf.boolean_mask(boxes, keep),
            "class": tf.boolean_mask(example["objects/class"], keep),
        }
        f = views.augment(f, seeds[:3], self.cfg, size)
        valid = transforms.valid_boxes(f["boxes"])
        f = transforms.pad_to_square(f, size, self.run.pad_value)
        seq = encode(
            tf.boolean_mask(f["boxes"], valid),
            tf.boolean_mask(f["class"], valid),
            seeds[3],
            self.cfg,
            self.space,
            training=True,
            # Noise boxes stay inside the image, not on the padding.
            extent=f["unpadded_size"] / size,
        )
        return one_example({"image": f["image"], **seq})

    def eval_examples(self, example: dict, image: tf.Tensor, labels: Labels) -> dict:
        del labels
        view = views.eval_image(example, image, self.run.image_size, self.run.pad_value)
        return one_example({**view, "prompt": tf.constant([PROMPT_TOKEN], tf.int32)})

    def answer_grammar(self, labels: Labels | None) -> Grammar:
        class_ids = labels.category_map.class_ids if labels is not None else None
        return answer_grammar(self.space, not self.cfg.decode_all_objects, class_ids)

    def sampler_options(self, labels: Labels | None = None) -> SamplerOptions:
        options = super().sampler_options(labels)
        if self.cfg.decode_all_objects and options.grammar is None:
            # Filling every slot needs the grammar that rules EOS out.
            options = dataclasses.replace(options, grammar=self.answer_grammar(labels))
        return dataclasses.replace(
            options,
            # Scores are class-token probabilities (not renormalised).
            logits_range=(vocab.CLASS_SHIFT, self.space.coord_shift),
        )

    def detections(self, batch: dict, samples: dict, labels: Labels) -> list[dict]:
        """Per evaluated image: boxes (original pixels, on the image), class ids and scores."""
        known_classes = np.asarray(labels.category_map.class_ids)
        out = []
        for i in range(len(batch["image/id"])):
            pred = decode(
                samples["tokens"][i], samples["range_probs"][i], batch["frame"][i], self.space,
                self.cfg, known_classes,
            )  # fmt: skip
            # A box may reach into the canvas padding: keep it on the image.
            height, width = (float(v) for v in batch["image/size"][i])
            pred["boxes"] = np.clip(pred["boxes"], 0.0, [height, width, height, width])
            out.append(pred)
        return out

    def results(self, batch: dict, samples: dict, labels: Labels) -> list[dict]:
        min_score = float(self.cfg.get("min_score", 0.0))
        return [
            r
            for image_id, pred in zip(
                batch["image/id"], self.detections(batch, samples, labels), strict=True
            )
            for r in to_coco_results(pred, int(image_id), labels.category_map)
            if r["score"] >= min_score
        ]

    def metric(self, results: list[dict], truth: Truth) -> dict[str, float]:
        return coco_metrics.coco_ap(truth.coco("instances"), results, "bbox", truth.image_ids)

    def preview(self, example: dict, labels: Labels):
        pred = decode(example["target_seq"], None, self.canvas_frame(), self.space, self.cfg)
        names = category_names(pred["classes"], labels.category_map)
        return visualize.draw(example["image"], pred["boxes"], names, pred["classes"])
