"""Answer grammars: every codec's own answers obey them, and under them an untrained
model's answers always parse, for every task."""

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from unified_seq import defaults, evaluate, train, vocab
from unified_seq.data import inputs, synthetic
from unified_seq.models import sizes
from unified_seq.predictor import Predictor, task_key
from unified_seq.tasks import build_tasks, captioning, detection, instance_segmentation, keypoints
from unified_seq.tasks.instance_segmentation import decode_polygons

SPACE = vocab.TokenSpace(coord_shift=200, bins=64, text_shift=264, text_vocab_size=128)


def _answer(target_seq, prompt_length):
    """Answer tokens of a target sequence: target j is the input at j + 1."""
    return np.asarray(target_seq)[prompt_length - 1 :]


def test_detection_answers_obey_the_grammar():
    cfg = defaults.task_configs().object_detection
    cfg.max_instances = 5
    boxes = tf.constant([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8]])
    seq = detection.encode(boxes, tf.constant([1, 7]), tf.constant([0, 1]), cfg, SPACE, False)
    answer = _answer(seq["target_seq"], 1)
    grammar = detection.answer_grammar(SPACE, class_ids=[1, 7])
    assert grammar.violation(answer) is None
    other_classes = detection.answer_grammar(SPACE, class_ids=[1, 2])
    assert "token 107 (a token of no kind)" in other_classes.violation(answer)
    # Without EOS allowed (decode_all_objects) the answer must fill every slot.
    assert "kind eos" in detection.answer_grammar(SPACE, allow_eos=False).violation(answer)
    assert grammar.violation(np.r_[answer[:3], 0]) is not None  # EOS inside an object


def test_polygon_answers_obey_the_grammar():
    cfg = defaults.task_configs().instance_segmentation
    cfg.max_points = 20
    square = [[0.1, 0.1], [0.1, 0.5], [0.5, 0.5], [0.5, 0.1]]
    triangle = [[0.6, 0.6], [0.9, 0.6], [0.9, 0.9]]
    polygon = tf.constant(square + [[np.nan, np.nan]] + triangle, tf.float32)
    seq = instance_segmentation.encode(
        tf.constant([0.1, 0.1, 0.9, 0.9]), tf.constant(2), polygon, tf.constant([0, 1]), cfg,
        SPACE, training=False,
    )  # fmt: skip
    answer = _answer(seq["target_seq"], 6)
    grammar = instance_segmentation.answer_grammar(SPACE)
    assert grammar.violation(answer) is None
    assert list(answer[:18]).count(vocab.SEPARATOR) == 2
    c = SPACE.coord_shift
    assert "state sep2" in grammar.violation([c, c, c, c, c, c, 40, c])  # half a separator
    assert "state y2" in grammar.violation([c, c, c, c, 0])  # two points, then EOS


def test_keypoint_answers_obey_the_grammar():
    cfg = defaults.task_configs().keypoint_detection
    points = np.random.default_rng(0).uniform(0.1, 0.9, [17, 3]).astype(np.float32)
    points[:, 2] = 2.0
    points[[3, 8], 2] = 0.0  # two not labelled: written as 41 41
    seq = keypoints.encode(
        tf.constant([0.1, 0.1, 0.9, 0.9]), tf.constant(1), tf.constant(points),
        tf.constant([0, 1]), cfg, SPACE, training=False,
    )  # fmt: skip
    answer = _answer(seq["target_seq"], 6)
    grammar = keypoints.answer_grammar(SPACE)
    assert grammar.violation(answer) is None
    assert (answer[:34] == vocab.INVISIBLE).sum() == 4
    c = SPACE.coord_shift
    assert grammar.violation([c, vocab.INVISIBLE]) is not None  # half a hidden point
    assert grammar.violation([c, c] * 17 + [c]) is not None  # an 18th point


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    data_dir = synthetic.generate(
        str(tmp_path_factory.mktemp("data")), seed=5, num_train=8, num_val=4, image_size=64
    )
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.vocab = defaults.vocab_config()
    config.vocab.update(coord_shift=200, bins=64, text_shift=264, text_vocab_size=128)
    config.data = defaults.data_config()
    config.data.update(source="coco_json", coco_dir=data_dir, image_size=64)
    config.tasks = defaults.task_configs()
    config.tasks.object_detection.max_instances = 6
    config.tasks.instance_segmentation.update(max_points=10, num_samples=2)
    config.tasks.captioning.max_len = 10
    for cfg in config.tasks.values():
        # Hot sampling: every branch of a grammar gets drawn somewhere.
        cfg.update(temperature=3.0, top_p=1.0)
    config.model = sizes.model_config(
        "tiny", enc_depth=1, enc_width=32, enc_mlp_dim=64, enc_heads=2,
        dec_depth=1, dec_width=32, dec_mlp_dim=64, dec_heads=2, dropout=0.0,
    )  # fmt: skip
    config.eval = defaults.eval_config()
    config.eval.batch_size = 4
    config.train = defaults.train_config()
    space = vocab.TokenSpace.from_config(config.vocab)
    data = inputs.load_split(config, "val", space, workdir=str(tmp_path_factory.mktemp("w")))
    model = train.build_model(config, space)
    images = np.zeros([1, 64, 64, 3], np.float32)
    params = jax.jit(model.init)(jax.random.key(0), images, np.zeros([1, 4], np.int32))["params"]
    return config, data, model, params


def _answers(config, data, model, params, constrained):
    """Every task's sampled answers on the validation images, with or without grammars."""
    config = ml_collections.ConfigDict(config.to_dict())
    for cfg in config.tasks.values():
        cfg.constrained = constrained
    predictor = Predictor(model, params, labels=data)
    out = {}
    for name, task in build_tasks(config).items():
        batch = next(evaluate.eval_batches(task, data, config))
        out[name] = (task, batch, predictor.sample(task, batch, task_key(1, task)))
    return out


def test_untrained_model_answers_always_parse_under_the_grammars(untrained):
    config, data, model, params = untrained
    for name, (task, batch, samples) in _answers(*untrained, constrained=True).items():
        grammar = task.answer_grammar(data)
        tokens = samples["tokens"]
        for row in tokens:
            assert grammar.violation(row) is None, (name, row)
        results = task.results(batch, samples, data)
        if name == "object_detection":
            # decode_all_objects is off: objects until the model chose EOS, all whole.
            slots = 5 * int(config.tasks.object_detection.max_instances)
            for row, length in zip(tokens, samples["length"], strict=True):
                whole = detection._complete_objects(row, task.space)
                assert whole == min(int(length), slots) // 5 and (
                    length >= slots or length % 5 == 0
                )
        if name == "instance_segmentation":
            for row in tokens:
                polygons = decode_polygons(row, np.array([64, 64, 0, 0], np.float32), task.space)
                assert polygons and all(len(p) >= 3 for p in polygons)
        if name == "keypoint_detection":
            assert results and all(len(r["keypoints"]) == 51 for r in results)
            written = np.array([r["keypoints"][2::3] for r in results])
            assert (written > 0).all()  # every point written or guessed: none missing
        if name == "captioning":
            assert all(r["caption"] for r in results)
            pieces = tokens[tokens > 0] - task.space.text_shift
            assert set(pieces.tolist()) <= set(data.tokenizer.text_piece_ids().tolist())


def test_without_the_grammars_the_untrained_model_breaks_the_formats(untrained):
    config, data, *_ = untrained
    broken = {}
    for name, (task, _, samples) in _answers(*untrained, constrained=False).items():
        grammar = task.answer_grammar(data)
        broken[name] = sum(grammar.violation(row) is not None for row in samples["tokens"])
    # The grammars are what makes the answers parse: unconstrained, most rows break.
    assert all(count > 0 for count in broken.values()), broken


def test_caption_grammar_allows_only_the_tokenizers_text_pieces(untrained):
    _, data, *_ = untrained
    grammar = captioning.answer_grammar(SPACE, data.tokenizer)
    allowed = np.flatnonzero(grammar.token_masks()[grammar.start])
    expected = SPACE.text_shift + data.tokenizer.text_piece_ids()
    np.testing.assert_array_equal(allowed, np.sort(expected))
    assert data.tokenizer.vocab_size - len(expected) == 3  # pad, eos and unknown pieces
