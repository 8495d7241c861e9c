"""Caption codec and tokenizer: text → pieces → tokens → text, caption choice, input drop."""

import pathlib

import numpy as np
import pytest
import tensorflow as tf

from unified_seq import defaults, vocab
from unified_seq.tasks import captioning
from unified_seq.tasks.tokenizer import CaptionTokenizer

SPACE = vocab.TokenSpace()
SUBJECTS = ["A man", "Two dogs", "The woman", "A red bus", "Some kids", "An old cat"]
VERBS = ["is riding", "sits on", "walks past", "looks at", "plays with", "stands near"]
OBJECTS = ["a bench", "the beach", "a bicycle", "two trees", "a kite", "the street"]
ENDINGS = [".", "!", "?", ", today.", " (again).", " - 3 times."]


def _captions(rng, count=200):
    return [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def corpus():
    return _captions(np.random.default_rng(0))


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "captions.model"
    return CaptionTokenizer.train(corpus, str(path), vocab_size=1000)


def _cfg(**overrides):
    cfg = defaults.task_configs().captioning
    cfg.update(overrides)
    return cfg


def _ragged(rows):
    return tf.RaggedTensor.from_row_lengths(
        tf.constant([i for row in rows for i in row], tf.int32),
        tf.constant([len(row) for row in rows], tf.int64),
    )


def _encode(rows, cfg, seed=(1, 2), training=True):
    seq = captioning.encode(_ragged(rows), tf.constant(seed, tf.int32), cfg, SPACE, training)
    return {k: v.numpy() for k, v in seq.items()}


def test_tokenizer_round_trip(tokenizer, corpus):
    assert tokenizer.vocab_size <= 1000
    for text in corpus:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    # Characters never seen in training come back through the byte pieces.
    assert tokenizer.decode(tokenizer.encode("Ünïcode café — 42%!")) == "Ünïcode café — 42%!"
    assert pathlib.Path(tokenizer.path).with_suffix(".vocab").exists()


def test_small_vocab_without_byte_fallback_round_trips_seen_text(corpus, tmp_path):
    small = CaptionTokenizer.train(corpus, str(tmp_path / "small.model"), vocab_size=80)
    assert small.vocab_size <= 80
    assert all(small.decode(small.encode(text)) == text for text in corpus)
    assert (tmp_path / "small.vocab").read_text().count("\n") == small.vocab_size


def test_training_is_deterministic(corpus, tmp_path):
    CaptionTokenizer.train(corpus, str(tmp_path / "a.model"), vocab_size=500)
    CaptionTokenizer.train(corpus, str(tmp_path / "b.model"), vocab_size=500)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


def test_vocab_limits(corpus, tmp_path):
    with pytest.raises(ValueError, match="distinct characters"):
        CaptionTokenizer.train(corpus, str(tmp_path / "tiny.model"), vocab_size=20)
    path = str(tmp_path / "big.model")
    big = CaptionTokenizer.train(corpus, path, vocab_size=600)
    with pytest.raises(ValueError, match="text_vocab_size"):
        CaptionTokenizer.load_or_train(path, lambda: corpus, vocab_size=big.vocab_size - 1)


def test_load_or_train_reuses_the_model_file(corpus, tmp_path):
    path = str(tmp_path / "reuse.model")
    calls = []

    def captions_fn():
        calls.append(1)
        return corpus

    first = CaptionTokenizer.load_or_train(path, captions_fn, vocab_size=400)
    second = CaptionTokenizer.load_or_train(path, captions_fn, vocab_size=400)
    assert calls == [1]
    assert second.vocab_size == first.vocab_size
    assert second.encode(corpus[0]) == first.encode(corpus[0])


@pytest.mark.parametrize("num_captions", [0, 1, 3, 7])
def test_shapes_weights_and_caption_choice(tokenizer, corpus, num_captions):
    cfg = _cfg(max_len=64, captions_per_image=5, input_drop_rate=0.0)
    rows = [tokenizer.encode(t) for t in corpus[:num_captions]]
    for training in (True, False):
        seq = _encode(rows, cfg, training=training)
        assert captioning.sequence_length(cfg) == 64
        for key in ("input_seq", "target_seq", "token_weights"):
            assert seq[key].shape == (5, 64)
        np.testing.assert_array_equal(seq["input_seq"][:, 0], 13)
        if num_captions == 0:
            np.testing.assert_array_equal(seq["token_weights"], 0.0)
            continue
        chosen = []
        for target, weight in zip(seq["target_seq"], seq["token_weights"], strict=True):
            n = int(np.argmax(target == vocab.EOS))
            pieces = (target[:n] - SPACE.text_shift).tolist()
            chosen.append(rows.index(pieces))
            np.testing.assert_array_equal(weight[:n], 1.0)
            assert weight[n] == pytest.approx(cfg.eos_weight)
            np.testing.assert_array_equal(weight[n + 1 :], 0.0)
        if not training:
            assert chosen == [i % num_captions for i in range(5)]
        else:
            # Without replacement while there are enough, then every caption again.
            assert len(set(chosen)) == min(num_captions, 5)
            if num_captions <= 5:
                counts = np.bincount(chosen, minlength=num_captions)
                assert counts.max() - counts.min() <= 1


def test_training_choice_varies_with_seed(tokenizer, corpus):
    cfg = _cfg(max_len=24, captions_per_image=2, input_drop_rate=0.0)
    rows = [tokenizer.encode(t) for t in corpus[:7]]
    firsts = {tuple(_encode(rows, cfg, seed=(s, 0))["target_seq"][0]) for s in range(10)}
    assert len(firsts) > 3


def test_encode_decode_text_round_trip(tokenizer, corpus):
    cfg = _cfg(max_len=40, captions_per_image=1)
    for text in corpus[:50]:
        seq = _encode([tokenizer.encode(text)], cfg)
        assert captioning.decode(seq["target_seq"][0], tokenizer, SPACE) == text
    assert captioning.Captioning.prompt_token == 13
    assert captioning.to_coco_results("a cat.", 9) == {"image_id": 9, "caption": "a cat."}


def test_decode_stops_at_eos_and_keeps_text_tokens(tokenizer):
    ids = np.array(tokenizer.encode("A man is riding a bicycle.")) + SPACE.text_shift
    tokens = np.concatenate([[vocab.FAKE_TEXT], ids[:3], [1500, 120], ids[3:], [0], ids[:2]])
    assert captioning.decode(tokens, tokenizer, SPACE) == "A man is riding a bicycle."
    # Text tokens past the tokenizer's vocabulary (unused rows of the range) are skipped.
    beyond = np.array([SPACE.text_shift + tokenizer.vocab_size + 5])
    assert captioning.decode(np.concatenate([ids, beyond]), tokenizer, SPACE) == (
        "A man is riding a bicycle."
    )


def test_long_caption_is_cut_before_eos():
    cfg = _cfg(max_len=10, captions_per_image=1, input_drop_rate=0.0)
    seq = _encode([list(range(5, 25))], cfg)
    np.testing.assert_array_equal(seq["target_seq"][0, :9], np.arange(5, 14) + SPACE.text_shift)
    assert seq["target_seq"][0, 9] == vocab.EOS
    assert seq["token_weights"][0, 9] == pytest.approx(cfg.eos_weight)


def test_input_drop_hits_answer_inputs_only():
    cfg = _cfg(max_len=30, captions_per_image=5, input_drop_rate=0.5)
    rows = [list(range(10, 10 + n)) for n in (12, 20, 29, 5, 40)]
    dropped, answer_inputs = 0, 0
    for s in range(20):
        seq = _encode(rows, cfg, seed=(s, 1))
        clean = _encode(rows, cfg, seed=(s, 1), training=False)
        np.testing.assert_array_equal(seq["input_seq"][:, 0], 13)
        for k in range(5):
            target = seq["target_seq"][k]
            n = int(np.argmax(target == vocab.EOS))
            answer_in = seq["input_seq"][k, 1 : n + 1]
            hit = answer_in == vocab.FAKE_TEXT
            # A kept input is the true previous piece; targets are never dropped.
            np.testing.assert_array_equal(answer_in[~hit], target[:n][~hit])
            assert not np.any(target == vocab.FAKE_TEXT)
            np.testing.assert_array_equal(seq["input_seq"][k, n + 1 :], 0)
            dropped += hit.sum()
            answer_inputs += n
        assert not np.any(clean["input_seq"] == vocab.FAKE_TEXT)
    assert 0.45 < dropped / answer_inputs < 0.55


def test_deterministic_and_same_in_tf_data():
    cfg = _cfg(max_len=16, captions_per_image=3)
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    a = _encode(rows, cfg, seed=(3, 4))
    b = _encode(rows, cfg, seed=(3, 4))
    c = _encode(rows, cfg, seed=(3, 5))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["input_seq"], c["input_seq"])
    ds = tf.data.Dataset.from_tensors({"ids": _ragged(rows)}).map(
        lambda ex: captioning.encode(ex["ids"], tf.constant([3, 4], tf.int64), cfg, SPACE)
    )
    (mapped,) = list(ds.as_numpy_iterator())
    for k in a:
        np.testing.assert_array_equal(mapped[k], a[k])
