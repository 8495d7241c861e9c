"""Teacher-forcing sequences: layout and weights."""

import numpy as np
import tensorflow as tf

from unified_seq.tasks.sequence import build_sequences


def _build(prompt, answer, length, eos_weight=0.1):
    out = build_sequences(
        tf.constant(prompt), tf.constant(answer), tf.ones([len(answer)]), length, eos_weight
    )
    return {k: v.numpy() for k, v in out.items()}


def test_full_answer_fits_with_eos():
    out = _build([11, 1, 2, 3, 4, 5], [200, 201, 202, 203], 10)
    np.testing.assert_array_equal(out["input_seq"], [11, 1, 2, 3, 4, 5, 200, 201, 202, 203])
    np.testing.assert_array_equal(out["target_seq"], [1, 2, 3, 4, 5, 200, 201, 202, 203, 0])
    np.testing.assert_allclose(out["token_weights"], [0, 0, 0, 0, 0, 1, 1, 1, 1, 0.1])


def test_short_answer_pads_with_zero_weight():
    out = _build([10], [7, 8], 6, eos_weight=0.5)
    np.testing.assert_array_equal(out["input_seq"], [10, 7, 8, 0, 0, 0])
    np.testing.assert_array_equal(out["target_seq"], [7, 8, 0, 0, 0, 0])
    np.testing.assert_allclose(out["token_weights"], [1, 1, 0.5, 0, 0, 0])


def test_too_long_answer_is_cut_and_still_ends():
    out = _build([10], list(range(100, 110)), 4)
    np.testing.assert_array_equal(out["target_seq"], [100, 101, 102, 0])
    assert out["token_weights"].shape == (4,)
