"""The per-instance prompt shared by segmentation and keypoints (DESIGN §3).

`[task_token, ymin, xmin, ymax, xmax, class_token]`: the object's box as
coordinate tokens and its class as `CLASS_SHIFT + class id`. Training builds
it in TensorFlow from ground-truth boxes; inference in numpy from detections,
so the same function serves both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from unified_seq import vocab

PROMPT_LENGTH = 6


def build_prompt(task_token: int, bbox: Any, class_id: Any, space: vocab.TokenSpace) -> Any:
    """Builds instance prompts.

    Args:
      task_token: the task's prompt token (`vocab.TASK_PROMPTS[task]`).
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
