"""Tasks prompted by one object: its prompt, which objects train, how they are seen.

Segmentation and keypoints answer for one object at a time, named by the
prompt `[task_token, ymin, xmin, ymax, xmax, class_token]` (DESIGN §3): the
object's box as coordinate tokens and its class as `CLASS_SHIFT + class id`.

Training (per image visit) takes up to `instances_per_image` of the image's
candidate objects (0 = all of them), a random cyclic run of them in
annotation order:
- with `crop_to_box`, each object is its own example: a crop `crop_scale`
  times its box around it, augmented and tokenized on its own;
- without, the objects share one augmented view and one image encoding: the
  example holds `instances_per_image` sequences (rows), and rows beyond the
  image's objects have weight 0 (the official code trained them).

Evaluation gives one example per object to prompt: the ground truth's
candidates, or, when detections were attached to the example
(`pipeline.attach_detections`), the top `detections_per_image` detections by
score that the task accepts (keypoints: persons).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf
from ml_collections import ConfigDict

from unified_seq import vocab
from unified_seq.data import transforms, views
from unified_seq.tasks.task import Labels, RunSpec, Task

PROMPT_LENGTH = 6


def build_prompt(task_token: int, bbox: Any, class_id: Any, space: vocab.TokenSpace) -> Any:
    """Builds instance prompts; the same function serves training (TF) and inference (numpy).

    Args:
      task_token: the task's prompt token.
      bbox: float[..., 4] (ymin, xmin, ymax, xmax) normalised to the canvas;
        numpy or tf.Tensor.
      class_id: int[...] class ids (token = CLASS_SHIFT + id).
      space: token space.

    Returns:
      int32[..., 6] prompt tokens, a tf.Tensor when either input is one,
      numpy otherwise.
    """
    if tf.is_tensor(bbox) or tf.is_tensor(class_id):
        coords = space.coord_tokens(tf.convert_to_tensor(bbox, tf.float32))
        cls = tf.cast(class_id, tf.int32) + vocab.CLASS_SHIFT
        task = tf.fill(tf.shape(cls), tf.constant(task_token, tf.int32))
        return tf.concat([task[..., None], coords, cls[..., None]], axis=-1)
    coords = space.coord_tokens(np.asarray(bbox, np.float32))
    cls = np.asarray(class_id, np.int32) + vocab.CLASS_SHIFT
    task = np.full(cls.shape, task_token, np.int32)
    return np.concatenate([task[..., None], coords, cls[..., None]], axis=-1).astype(np.int32)


def instance_seed(seed: tf.Tensor, j: Any) -> tf.Tensor:
    """Seed of the j-th chosen instance: (s0, s1 + j), so instance 0 keeps the visit's seed."""
    return seed + tf.stack([tf.constant(0, tf.int64), tf.cast(j, tf.int64)])


class InstanceTask(Task):
    """Base of the tasks whose prompt is one object's box and class.

    Subclasses name the per-object geometry they answer with (`geometry_key`:
    transforms.py's `points` for polygons, `keypoints` for keypoints) and
    fill in the abstract methods.
    """

    takes_boxes = True
    geometry_key: ClassVar[str]
    # Counts of what did not fit, beyond the sequences, that encode_instance returns.
    count_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, cfg: ConfigDict, run: RunSpec):
        super().__init__(name, cfg, run)
        per_image = int(cfg.instances_per_image)
        if per_image < 0 or (per_image == 0 and not cfg.crop_to_box):
            raise ValueError(
                f"config.tasks.{name}.instances_per_image={per_image}: use N > 0, or 0 (every "
                "instance) together with crop_to_box=True; without a crop the instances share "
                "one image as a fixed number of sequences"
            )
        if int(cfg.detections_per_image) < 0:
            raise ValueError(f"config.tasks.{name}.detections_per_image must be ≥ 0 (0 = all)")

    @property
    def prompt_length(self) -> int:
        return PROMPT_LENGTH

    @property
    def sequence_shape(self) -> tuple[int, ...]:
        if self.cfg.crop_to_box:
            return (self.sequence_length,)
        return (int(self.cfg.instances_per_image), self.sequence_length)

    # --- What subclasses define.
    @abc.abstractmethod
    def candidates(self, example: dict) -> tf.Tensor:
        """bool[N]: the example's objects this task can train and be scored on."""

    def accepts_classes(self, classes: tf.Tensor) -> tf.Tensor:
        """bool[M]: detections of these classes may prompt this task."""
        return tf.ones_like(classes, tf.bool)

    @abc.abstractmethod
    def geometry(self, objects: dict) -> Any:
        """The answer's geometry of every object, from `views.normalised_objects`."""

    @abc.abstractmethod
    def encode_instance(
        self, box: tf.Tensor, class_id: tf.Tensor, geometry: tf.Tensor, seed: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        """Training sequences of one object seen on the canvas (box normalised to it)."""

    def flip_permutation(self, labels: Labels) -> Any:
        """int32[K] keypoint order after a horizontal flip, or None."""
        del labels
        return None

    # --- Training.
    def has_training_target(self, example: dict) -> tf.Tensor:
        return tf.reduce_any(self.candidates(example))

    def _choose(self, candidates: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """int32[n]: up to `instances_per_image` candidate indices, a random cyclic run."""
        index = tf.cast(tf.where(candidates)[:, 0], tf.int32)
        count = tf.shape(index)[0]
        start = tf.random.stateless_uniform([], seed, 0, count, dtype=tf.int32)
        per_image = int(self.cfg.instances_per_image)
        n = count if per_image == 0 else tf.minimum(per_image, count)
        return tf.gather(index, (start + tf.range(n)) % count)

    def _sequence_signature(self) -> dict[str, tf.TensorSpec]:
        length = self.sequence_length
        spec = {
            "input_seq": tf.TensorSpec([length], tf.int32),
            "target_seq": tf.TensorSpec([length], tf.int32),
            "token_weights": tf.TensorSpec([length], tf.float32),
        }
        return {**spec, **{k: tf.TensorSpec([], tf.int32) for k in self.count_keys}}

    def train_examples(
        self, example: dict, image: tf.Tensor, seed: tf.Tensor, labels: Labels
    ) -> dict[str, tf.Tensor]:
        seeds = tf.random.experimental.stateless_split(seed, 6)
        objects = views.normalised_objects(example, image)
        chosen = self._choose(self.candidates(example), seeds[5])
        flip_perm = self.flip_permutation(labels)
        if flip_perm is not None:
            flip_perm = tf.constant(flip_perm, tf.int32)
        if self.cfg.crop_to_box:
            return self._cropped_examples(image, objects, example, chosen, seed, flip_perm)
        return self._shared_example(image, objects, example, chosen, seed, seeds, flip_perm)

    def _cropped_examples(self, image, objects, example, chosen, seed, flip_perm) -> dict:
        """One example per chosen object, each seen in a crop around its box."""
        cfg, size = self.cfg, self.run.image_size
        geometry = self.geometry(objects)

        def one(j):
            i = chosen[j]
            seeds = tf.random.experimental.stateless_split(instance_seed(seed, j), 6)
            f = {"image": image, "boxes": objects["boxes"][i][None], self.geometry_key: geometry[i]}
            f = transforms.crop_to_box(f, f["boxes"][0], cfg.crop_scale)
            del f["region"]
            f = views.augment(f, seeds[:3], cfg, size, flip_perm)
            f = transforms.pad_to_square(f, size, self.run.pad_value)
            seq = self.encode_instance(
                f["boxes"][0], example["objects/class"][i], f[self.geometry_key], seeds[3]
            )
            return {"image": f["image"], **seq}

        signature = {
            "image": tf.TensorSpec([size, size, 3], tf.float32),
            **self._sequence_signature(),
        }
        return tf.map_fn(one, tf.range(tf.shape(chosen)[0]), fn_output_signature=signature)

    def _shared_example(self, image, objects, example, chosen, seed, seeds, flip_perm) -> dict:
        """One example: the chosen objects as rows over one augmented view."""
        cfg, size = self.cfg, self.run.image_size
        rows = int(cfg.instances_per_image)
        geometry = tf.gather(self.geometry(objects), chosen)
        ragged = isinstance(geometry, tf.RaggedTensor)
        f = {
            "image": image,
            "boxes": tf.gather(objects["boxes"], chosen),
            # Polygons travel as one flat point list through the transforms.
            self.geometry_key: geometry.flat_values if ragged else geometry,
        }
        f = views.augment(f, seeds[:3], cfg, size, flip_perm)
        f = transforms.pad_to_square(f, size, self.run.pad_value)
        moved = geometry.with_flat_values(f[self.geometry_key]) if ragged else f[self.geometry_key]
        classes = tf.gather(example["objects/class"], chosen)
        n = tf.shape(chosen)[0]

        def row(j):
            i = tf.minimum(j, n - 1)  # rows past the objects repeat the last, at weight 0
            row_seed = tf.random.experimental.stateless_split(instance_seed(seed, j), 6)[3]
            seq = self.encode_instance(f["boxes"][i], classes[i], moved[i], row_seed)
            real = j < n
            seq["token_weights"] *= tf.cast(real, tf.float32)
            for key in self.count_keys:
                seq[key] = tf.where(real, seq[key], 0)
            return seq

        seq = tf.map_fn(row, tf.range(rows), fn_output_signature=self._sequence_signature())
        for key in self.count_keys:
            seq[key] = tf.reduce_sum(seq[key])
        return {k: v[None] for k, v in {"image": f["image"], **seq}.items()}

    def target_answers(self, example: dict) -> list[np.ndarray]:
        """Answer tokens of a training example's trained sequences (rows of weight 0 left out)."""
        targets = np.atleast_2d(example["target_seq"])
        weights = np.atleast_2d(example["token_weights"])
        # Target position j predicts input j + 1: the answer starts at PROMPT_LENGTH - 1.
        return [t[PROMPT_LENGTH - 1 :] for t, w in zip(targets, weights, strict=True) if w.sum()]

    # --- Evaluation.
    def eval_examples(self, example: dict, image: tf.Tensor, labels: Labels) -> dict:
        cfg, size = self.cfg, self.run.image_size
        hw = transforms.image_hw(image)
        if "detections/bbox" in example:
            pixel_boxes = example["detections/bbox"]
            classes = example["detections/class"]
            scores = example["detections/score"]
            ids = tf.zeros_like(classes, tf.int64)
            keep = transforms.valid_boxes(pixel_boxes) & self.accepts_classes(classes)
            kept = tf.where(keep)[:, 0]
            order = tf.argsort(-tf.gather(scores, kept), stable=True)
            if int(cfg.detections_per_image):
                order = order[: int(cfg.detections_per_image)]
            index = tf.gather(kept, order)
        else:
            pixel_boxes = example["objects/bbox"]
            classes = example["objects/class"]
            scores = tf.ones_like(example["objects/area"])
            ids = example["objects/id"]
            index = tf.where(self.candidates(example))[:, 0]
        boxes = pixel_boxes / tf.tile(hw, [2])

        def one(i):
            f = {"image": image, "boxes": boxes[i][None]}
            region = views.whole_image(image)
            if cfg.crop_to_box:
                f = transforms.crop_to_box(f, f["boxes"][0], cfg.crop_scale)
                region = f.pop("region")
            f, frame = views.eval_view(f, region, size, self.run.pad_value)
            return {
                "image": f["image"],
                "frame": frame,
                "prompt": build_prompt(self.prompt_token, f["boxes"][0], classes[i], self.space),
                "prompt_box": f["boxes"][0],
                "class": tf.cast(classes[i], tf.int32),
                "score": tf.cast(scores[i], tf.float32),
                "box": pixel_boxes[i],
                "object/id": tf.cast(ids[i], tf.int64),
                # Which prompt of the image: with the image id, the row's sampling key.
                "prompt/index": tf.cast(i, tf.int32),
                "image/id": example["image/id"],
                "image/size": tf.cast(hw, tf.int32),
            }

        signature = {
            "image": tf.TensorSpec([size, size, 3], tf.float32),
            "frame": tf.TensorSpec([4], tf.float32),
            "prompt": tf.TensorSpec([PROMPT_LENGTH], tf.int32),
            "prompt_box": tf.TensorSpec([4], tf.float32),
            "class": tf.TensorSpec([], tf.int32),
            "score": tf.TensorSpec([], tf.float32),
            "box": tf.TensorSpec([4], tf.float32),
            "object/id": tf.TensorSpec([], tf.int64),
            "prompt/index": tf.TensorSpec([], tf.int32),
            "image/id": tf.TensorSpec([], tf.int64),
            "image/size": tf.TensorSpec([2], tf.int32),
        }
        return tf.map_fn(one, tf.cast(index, tf.int32), fn_output_signature=signature)
