"""Keypoint detection as tokens: one person's keypoints (DESIGN §3).

Sequence: `[12, ymin, xmin, ymax, xmax, class] y1 x1 … yK xK EOS`. The
prompt is the person's box (in the crop around it); each keypoint is written
as its coordinate tokens, or as two invisible tokens (41 41) when it is not
labelled or lies outside the canvas. Invisible targets are trained at
`invisible_weight` (0.1; the paper: 1.0 costs ~1 AP, 0.0 ~12 AP). In
training, a random share of the answer's *input* tokens is replaced by the
invisible token (official input masking), so the model cannot lean on the
previous point alone.

Answers are sampled under a grammar (`answer_grammar`): K pairs, each two
coordinates or two invisible tokens, then EOS. At inference an invisible
token is replaced by the model's best coordinate guess there, the argmax
of its logits over the coordinate range: COCO's OKS only scores keypoints
that are labelled in the ground truth, and a labelled-but-hidden point is
still better guessed than left out.
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
from unified_seq.tasks.instances import PROMPT_LENGTH, InstanceTask, build_prompt
from unified_seq.tasks.sequence import build_sequences
from unified_seq.tasks.task import Labels, SamplerOptions, Truth

# Visibility flags written in predictions. COCO's evaluation ignores them;
# they tell a reader which coordinates the model wrote and which are guesses.
PREDICTED = 2
GUESSED = 1
MISSING = 0


def sequence_length(cfg: Any, num_keypoints: int = 17) -> int:
    """Input/target length: the 6-token prompt and 2 tokens per keypoint."""
    del cfg  # The length depends on the data set's keypoint count only.
    return PROMPT_LENGTH + 2 * num_keypoints


def _keypoint_tokens(keypoints: tf.Tensor, space: vocab.TokenSpace) -> tf.Tensor:
    """float32[K, 3] (y, x, v) → int32[K, 2] coordinate or invisible tokens."""
    yx = keypoints[:, :2]
    # Written so that NaN coordinates count as outside.
    inside = tf.reduce_all((yx >= 0.0) & (yx <= 1.0), axis=-1)
    visible = (keypoints[:, 2] > 0) & inside
    coords = space.coord_tokens(tf.where(visible[:, None], yx, 0.0))
    return tf.where(visible[:, None], coords, vocab.INVISIBLE)


def _mask_answer_inputs(input_seq: tf.Tensor, answer_len: int, seed: tf.Tensor) -> tf.Tensor:
    """Replaces each answer input token by INVISIBLE with a random rate ~ U(0, 1).

    The prompt's input tokens are never touched.
    """
    rate_seed, token_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    rate = tf.random.stateless_uniform([], rate_seed)
    position = tf.range(tf.shape(input_seq)[0])
    in_answer = (position >= PROMPT_LENGTH) & (position < PROMPT_LENGTH + answer_len)
    hit = tf.random.stateless_uniform(tf.shape(input_seq), token_seed) < rate
    return tf.where(in_answer & hit, vocab.INVISIBLE, input_seq)


def encode(
    bbox: tf.Tensor,
    class_id: tf.Tensor,
    keypoints: tf.Tensor,
    seed: tf.Tensor,
    cfg: Any,
    space: vocab.TokenSpace,
    training: bool = True,
) -> dict[str, tf.Tensor]:
    """Tokenizes one person's keypoints.

    Args:
      bbox: float32[4] (ymin, xmin, ymax, xmax) normalised to the canvas.
      class_id: int32[] class id of the person category.
      keypoints: float32[K, 3] (y, x, v) with y, x normalised to the canvas
        and v as COCO (0 not labelled, 1 occluded, 2 visible); K static.
      seed: int32[2] or int64[2] stateless seed (input masking).
      cfg: the `keypoint_detection` task config (invisible_weight,
        eos_weight, input_mask_rate).
      space: token space.
      training: apply input masking (when `cfg.input_mask_rate`).

    Returns:
      `input_seq`, `target_seq` int32[L] and `token_weights` float32[L],
      L = sequence_length(cfg, K).
    """
    keypoints = tf.convert_to_tensor(keypoints, tf.float32)
    num_keypoints = keypoints.shape[0]
    if num_keypoints is None:
        raise ValueError(
            "keypoints.encode needs a static number of keypoints; "
            "give the tensor a known shape (tf.ensure_shape(keypoints, [K, 3]))."
        )
    answer = tf.reshape(_keypoint_tokens(keypoints, space), [-1])
    weights = tf.where(answer == vocab.INVISIBLE, float(cfg.invisible_weight), 1.0)
    prompt = build_prompt(vocab.TASK_PROMPTS["keypoint_detection"], bbox, class_id, space)
    seq = build_sequences(
        prompt,
        answer,
        weights,
        sequence_length(cfg, num_keypoints),
        float(cfg.eos_weight),
    )
    if training and cfg.input_mask_rate:
        seq["input_seq"] = _mask_answer_inputs(seq["input_seq"], 2 * num_keypoints, seed)
    return seq


def answer_grammar(space: vocab.TokenSpace, num_keypoints: int = 17) -> Grammar:
    """`num_keypoints` pairs, each (y, x) coordinates or `41 41`, then EOS."""
    tokens = np.arange(space.vocab_size)
    transitions: dict[str, dict[str, str]] = {}
    for k in range(num_keypoints):
        following = f"y{k + 1}" if k + 1 < num_keypoints else "end"
        transitions[f"y{k}"] = {"coord": f"x{k}", "invisible": f"hidden{k}"}
        transitions[f"x{k}"] = {"coord": following}
        transitions[f"hidden{k}"] = {"invisible": following}
    transitions["end"] = {"eos": "end"}
    return Grammar.build(
        kinds={
            "coord": space.is_coord(tokens),
            "invisible": tokens == vocab.INVISIBLE,
            "eos": tokens == vocab.EOS,
        },
        transitions=transitions,
        start="y0",
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _answer(tokens: np.ndarray, length: int) -> tuple[np.ndarray, int]:
    """First `length` answer tokens, EOS-padded after the first EOS; and how many were read."""
    tokens = np.asarray(tokens).reshape(-1)[:length]
    ends = np.flatnonzero(tokens == vocab.EOS)
    read = int(ends[0]) if ends.size else len(tokens)
    answer = np.full([length], vocab.EOS, np.int64)
    answer[:read] = tokens[:read]
    return answer, read


def _guesses(
    logits: np.ndarray | None, box: np.ndarray | None, length: int, space: vocab.TokenSpace
) -> tuple[np.ndarray, np.ndarray]:
    """Fallback coordinate of every answer position, float32[2K], and whether one exists."""
    if logits is not None:
        coord_logits = np.asarray(logits)[
            :length, space.coord_shift : space.coord_shift + space.bins
        ]
        found = np.arange(length) < len(coord_logits)
        guess = np.zeros([length], np.float32)
        guess[found] = space.token_coords(np.argmax(coord_logits, axis=-1) + space.coord_shift)
        return guess, found
    if box is not None:
        box = np.asarray(box, np.float32)
        return np.tile((box[:2] + box[2:]) / 2.0, length // 2), np.ones([length], bool)
    return np.zeros([length], np.float32), np.zeros([length], bool)


def _score(logits: np.ndarray | None, answer: np.ndarray, read: int) -> float:
    """Mean probability of the first `read` answer tokens (0 when none; 1 without logits)."""
    if logits is None:
        return 1.0
    if read == 0:
        return 0.0
    probs = _softmax(np.asarray(logits)[:read])
    return float(np.mean(probs[np.arange(read), answer[:read]]))


def _visible(logits: np.ndarray | None, answer: np.ndarray, read: int, k: int) -> np.ndarray:
    """float32[K]: how sure the model is that each keypoint is visible.

    1 − P(invisible) at the keypoint's first token, under the raw logits; a
    keypoint after the answer ended scores 0. Without logits: 1 where two
    coordinates were written, else 0.
    """
    if logits is None:
        coords = answer[: 2 * k].reshape(k, 2) != vocab.INVISIBLE
        return (coords.all(axis=-1) & (np.arange(k) * 2 < read)).astype(np.float32)
    first = np.asarray(logits)[0 : 2 * k : 2]
    hidden = _softmax(first)[:, vocab.INVISIBLE]
    return np.where(np.arange(k) * 2 < read, 1.0 - hidden, 0.0).astype(np.float32)


def decode(
    tokens: np.ndarray,
    logits: np.ndarray | None,
    frame: np.ndarray,
    space: vocab.TokenSpace,
    cfg: Any,
    *,
    box: np.ndarray | None = None,
    num_keypoints: int = 17,
) -> dict[str, Any]:
    """Keypoints of one person from its answer tokens.

    A keypoint whose two tokens are coordinates is predicted (v = 2). At a
    non-coordinate position (invisible 41, an early EOS, a stray token) the
    coordinate is guessed (v = 1): the argmax of that position's logits over
    the coordinate range, or without logits the centre of `box`; with
    neither the keypoint is missing (v = 0, at the frame's origin).

    Args:
      tokens: int[T] answer tokens (after the prompt); the first 2K are read,
        up to the first EOS.
      logits: float[T, V] raw logits at those positions, or None.
      frame: float32[4] frame of the canvas.
      space: token space.
      cfg: the `keypoint_detection` task config (unused; every codec's
        decode takes it).
      box: float[4] prompt box normalised to the canvas (fallback guess).
      num_keypoints: K.

    Returns:
      `keypoints` float32[K, 3] (y, x, v) in original pixels, `score`: the
      mean probability of the answer's tokens before EOS (1.0 without
      logits), and `visible` float32[K]: each keypoint's visibility score
      (`_visible`).
    """
    del cfg
    length = 2 * num_keypoints
    answer, read = _answer(tokens, length)
    is_coord = space.is_coord(answer)
    guess, found = _guesses(logits, box, length, space)
    coords = np.where(
        is_coord, space.token_coords(np.where(is_coord, answer, space.coord_shift)), guess
    )
    written = is_coord.reshape(num_keypoints, 2).all(axis=-1)
    guessed = ~written & (is_coord | found).reshape(num_keypoints, 2).all(axis=-1)
    visibility = np.where(written, PREDICTED, np.where(guessed, GUESSED, MISSING))
    pixels = to_pixels(coords.reshape(num_keypoints, 2), frame)
    keypoints = np.concatenate([pixels, visibility[:, None].astype(np.float32)], axis=-1)
    return {
        "keypoints": keypoints,
        "score": _score(logits, answer, read),
        "visible": _visible(logits, answer, read, num_keypoints),
    }


def to_coco_results(pred: dict, image_id: int, category_id_dataset: int) -> dict:
    """One COCO `keypoints` result: flat [x, y, v] * K in original pixels, and
    `visibility_scores` (K values in [0, 1]; pycocotools ignores them)."""
    keypoints = np.asarray(pred["keypoints"], np.float64)
    flat = np.stack([keypoints[:, 1], keypoints[:, 0], keypoints[:, 2]], axis=-1)
    return {
        "image_id": int(image_id),
        "category_id": int(category_id_dataset),
        "keypoints": [float(v) for v in flat.reshape(-1)],
        "score": float(pred["score"]),
        **(
            {"visibility_scores": [round(float(v), 4) for v in pred["visible"]]}
            if "visible" in pred
            else {}
        ),
    }


class KeypointDetection(InstanceTask):
    """Keypoints: prompt a person's box and class, answer its keypoints (module docstring)."""

    prompt_token = vocab.TASK_PROMPTS["keypoint_detection"]
    annotations = ("boxes", "keypoints")
    geometry_key = "keypoints"

    @property
    def sequence_length(self) -> int:
        return sequence_length(self.cfg, self.run.num_keypoints)

    def candidates(self, example: dict) -> tf.Tensor:
        person = example["objects/class"] == self.cfg.person_class
        labelled = tf.reduce_any(example["objects/keypoints"][..., 2] > 0, axis=-1)
        return views.target_objects(example) & person & labelled

    def accepts_classes(self, classes: tf.Tensor) -> tf.Tensor:
        return classes == self.cfg.person_class

    def geometry(self, objects: dict) -> Any:
        return objects["keypoints"]

    def flip_permutation(self, labels: Labels) -> Any:
        return labels.category_map.flip_permutation(self.run.num_keypoints)

    def encode_instance(self, box, class_id, geometry, seed) -> dict[str, tf.Tensor]:
        return encode(box, class_id, geometry, seed, self.cfg, self.space, training=True)

    def answer_grammar(self, labels: Labels | None) -> Grammar:
        del labels
        return answer_grammar(self.space, self.run.num_keypoints)

    def sampler_options(self, labels: Labels | None = None) -> SamplerOptions:
        # The logits give invisible points their best coordinate and the score.
        return dataclasses.replace(super().sampler_options(labels), return_logits=True)

    def results(self, batch: dict, samples: dict, labels: Labels) -> list[dict]:
        # Official compute_weighted_scores: points and box score, weighted.
        w = float(self.cfg.get("points_score_weight", 1.0))
        results = []
        for i, image_id in enumerate(batch["image/id"]):
            pred = decode(
                samples["tokens"][i], samples["logits"][i], batch["frame"][i], self.space,
                self.cfg, box=batch["prompt_box"][i], num_keypoints=self.run.num_keypoints,
            )  # fmt: skip
            pred["score"] = w * pred["score"] + (1.0 - w) * float(batch["score"][i])
            category = int(labels.category_map.to_dataset_id(np.array([batch["class"][i]]))[0])
            results.append(to_coco_results(pred, int(image_id), category))
        return results

    def metric(self, results: list[dict], truth: Truth) -> dict[str, float]:
        gt = truth.coco("person_keypoints")
        return {"AP": coco_metrics.coco_ap(gt, results, "keypoints", truth.image_ids)["AP"]}

    def preview(self, example: dict, labels: Labels):
        del labels
        frame, k = self.canvas_frame(), self.run.num_keypoints
        people = [
            decode(a, None, frame, self.space, self.cfg, num_keypoints=k)["keypoints"]
            for a in self.target_answers(example)
        ]
        return visualize.draw(example["image"], keypoints=np.stack(people) if people else None)
