"""The shared token space: one vocabulary for every task (DESIGN §2).

Layout (official defaults in brackets):

    0                      padding, also end-of-sequence (EOS)
    10..29                 task prompts: detection 10, segmentation 11,
                           keypoints 12, captioning 13
    30                     fake class (noise objects) / fake text (input drop)
    40                     separator between polygons of one instance
    41                     invisible keypoint
    100 .. coord_shift-1   class tokens: 100 + class id        [100 .. 999]
    coord_shift + q        quantised coordinate, q < bins      [1000 .. 1999]
    text_shift + piece     SentencePiece pieces                [3000 .. 34999]

This module is the single place where coordinates become tokens and back:
every codec and every decoder calls `quantize` / `dequantize` here, so the
`bins - 1` divisor cannot drift between call sites.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

PADDING = 0
EOS = 0
FAKE_CLASS = 30
FAKE_TEXT = 30
SEPARATOR = 40
INVISIBLE = 41
CLASS_SHIFT = 100

TASK_PROMPTS = {
    "object_detection": 10,
    "instance_segmentation": 11,
    "keypoint_detection": 12,
    "captioning": 13,
}


def _is_tf(x: Any) -> bool:
    # Imported lazily so numpy-only callers (evaluation, decoding on the host)
    # never pay for TensorFlow's import.
    mod = type(x).__module__
    return mod.startswith("tensorflow")


def _is_jax(x: Any) -> bool:
    return type(x).__module__.startswith("jax")


def quantize(coords: Any, bins: int) -> Any:
    """Maps normalised coordinates in [0, 1] to integer bins.

    `q = clip(round(c * (bins - 1)), 0, bins - 1)`; rounding is half-to-even
    in numpy, TensorFlow and JAX alike.

    Args:
      coords: float array (numpy, tf.Tensor or jax.Array), any shape.
      bins: number of quantisation bins.

    Returns:
      int32 array of the same shape and framework, values in [0, bins - 1].
    """
    if _is_tf(coords):
        import tensorflow as tf

        q = tf.round(tf.cast(coords, tf.float32) * (bins - 1))
        return tf.cast(tf.clip_by_value(q, 0.0, bins - 1.0), tf.int32)
    if _is_jax(coords):
        import jax.numpy as jnp

        return jnp.clip(jnp.round(coords * (bins - 1)), 0, bins - 1).astype(jnp.int32)
    q = np.round(np.asarray(coords, np.float64) * (bins - 1))
    return np.clip(q, 0, bins - 1).astype(np.int32)


def dequantize(q: Any, bins: int) -> Any:
    """Inverse of `quantize`: bin index → coordinate in [0, 1] (float32)."""
    if _is_tf(q):
        import tensorflow as tf

        return tf.cast(q, tf.float32) / (bins - 1)
    if _is_jax(q):
        import jax.numpy as jnp

        return q.astype(jnp.float32) / (bins - 1)
    return np.asarray(q, np.float32) / np.float32(bins - 1)


@dataclasses.dataclass(frozen=True)
class TokenSpace:
    """Token ranges of one run, built from the config (`config.vocab`).

    Attributes:
      coord_shift: first coordinate token.
      bins: number of coordinate bins.
      text_shift: first text token.
      text_vocab_size: number of SentencePiece pieces.
    """

    coord_shift: int = 1000
    bins: int = 1000
    text_shift: int = 3000
    text_vocab_size: int = 32000

    def __post_init__(self):
        if self.coord_shift <= CLASS_SHIFT:
            raise ValueError(f"vocab.coord_shift={self.coord_shift} must exceed {CLASS_SHIFT}.")
        if self.text_shift < self.coord_shift + self.bins:
            raise ValueError(
                f"vocab.text_shift={self.text_shift} overlaps the coordinate range "
                f"[{self.coord_shift}, {self.coord_shift + self.bins}); raise text_shift."
            )
        if self.bins < 2:
            raise ValueError(f"vocab.bins={self.bins} must be at least 2.")

    @classmethod
    def from_config(cls, vocab_config: Any) -> TokenSpace:
        """Builds the token space from a `config.vocab` ConfigDict or dict."""
        get = vocab_config.get
        return cls(
            coord_shift=int(get("coord_shift", 1000)),
            bins=int(get("bins", 1000)),
            text_shift=int(get("text_shift", 3000)),
            text_vocab_size=int(get("text_vocab_size", 32000)),
        )

    @property
    def vocab_size(self) -> int:
        return self.text_shift + self.text_vocab_size

    @property
    def max_class_id(self) -> int:
        """Largest class id that has a token below the coordinate range."""
        return self.coord_shift - CLASS_SHIFT - 1

    def coord_tokens(self, coords: Any) -> Any:
        """Normalised coordinates → coordinate tokens (same framework)."""
        return quantize(coords, self.bins) + self.coord_shift

    def token_coords(self, tokens: Any) -> Any:
        """Coordinate tokens → normalised coordinates in [0, 1]."""
        return dequantize(tokens - self.coord_shift, self.bins)

    def is_coord(self, tokens: Any) -> Any:
        return (tokens >= self.coord_shift) & (tokens < self.coord_shift + self.bins)

    def is_class(self, tokens: Any) -> Any:
        return (tokens >= CLASS_SHIFT) & (tokens < self.coord_shift)

    def is_text(self, tokens: Any) -> Any:
        return (tokens >= self.text_shift) & (tokens < self.vocab_size)

    def bin_size(self) -> float:
        """Width of one bin in normalised units."""
        return 1.0 / (self.bins - 1)
