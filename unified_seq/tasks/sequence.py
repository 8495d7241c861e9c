"""Teacher-forcing sequences shared by every task codec.

`label = prompt + answer + [EOS]`, zero-padded to `length + 1`; the decoder
reads `input = label[:-1]` and learns `target = label[1:]`. Weights are zero on
the prompt (the decoder is given it), the answer's own weights on the answer,
`eos_weight` on the single EOS and zero on the padding after it: unlike the
official code, padding is never trained (reference §7 quirk 2).
"""

from __future__ import annotations

import tensorflow as tf

from unified_seq import vocab


def build_sequences(
    prompt: tf.Tensor,
    answer: tf.Tensor,
    answer_weights: tf.Tensor,
    length: int,
    eos_weight: float,
) -> dict[str, tf.Tensor]:
    """Builds one training sequence.

    Args:
      prompt: int32[P] prompt tokens (task token first).
      answer: int32[A] answer tokens; cut to the `length - P` that fit.
      answer_weights: float32[A] loss weight of each answer token.
      length: length of the returned sequences.
      eos_weight: loss weight of the EOS token after the answer.

    Returns:
      dict with `input_seq` int32[length], `target_seq` int32[length],
      `token_weights` float32[length].
    """
    prompt = tf.cast(prompt, tf.int32)
    answer = tf.cast(answer, tf.int32)
    answer_weights = tf.cast(answer_weights, tf.float32)
    # label[1:] holds P - 1 prompt targets, the answer and EOS in `length`.
    room = length - tf.shape(prompt)[0]
    answer = answer[:room]
    answer_weights = answer_weights[:room]
    n_prompt = tf.shape(prompt)[0]

    label = tf.concat([prompt, answer, [vocab.EOS]], axis=0)
    label = tf.pad(label, [[0, length + 1 - tf.shape(label)[0]]], constant_values=vocab.PADDING)
    # Target position j predicts label[j + 1]: the first n_prompt - 1 targets
    # are prompt tokens.
    weights = tf.concat(
        [
            tf.zeros([n_prompt - 1], tf.float32),
            answer_weights,
            tf.constant([eos_weight], tf.float32),
        ],
        axis=0,
    )
    weights = tf.pad(weights, [[0, length - tf.shape(weights)[0]]])
    return {
        "input_seq": tf.ensure_shape(label[:-1], [length]),
        "target_seq": tf.ensure_shape(label[1:], [length]),
        "token_weights": tf.ensure_shape(weights, [length]),
    }


def sequence_length(prompt_len: int, answer_len: int) -> int:
    """Input/target length for a prompt and a maximal answer (+ EOS)."""
    return prompt_len + answer_len
