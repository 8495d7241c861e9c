"""Importing official Pix2Seq TF2 checkpoints (unified_seq/import_official.py).

`tests/data/official_tiny/` is a checkpoint written by the official trainer
for a tiny model of the multi-task architecture, with that model's own
outputs on a fixed batch (its README says how it was made). Its LayerNorm
and bias values are random, so a dropped, swapped or transposed variable
changes the logits. `tests/data/official_vitb640_keys.tsv` lists the
variables of an official ViT-B multi-task checkpoint.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from unified_seq import checkpoint, import_official, init_from, train, vocab
from unified_seq.errors import CheckpointError, ConfigError
from unified_seq.models import sizes
from unified_seq.predictor import Predictor

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "official_tiny"
VITB_KEYS = ROOT / "tests" / "data" / "official_vitb640_keys.tsv"
# The fixture's model (its config.json), as config overrides.
TINY = dict(
    variant="tiny",
    patch_size=16,
    enc_depth=2,
    enc_width=64,
    enc_mlp_dim=128,
    enc_heads=2,
    dec_depth=2,
    dec_width=64,
    dec_mlp_dim=128,
    dec_heads=2,
    dtype="float32",
    remat="none",
)
ATOL = 1e-4  # float32, TF against XLA
TEXT_VOCAB = 200  # vocab 3200 = text_shift 3000 + 200
CAPTIONS = [
    "a person rides a red bike down the street",
    "two dogs play with a ball on the grass",
    "a plate of food sits on a wooden table",
    "people walk past a bus in the rain",
] * 5


def _config(tokenizer_path: str = "", **model):
    sys.path.insert(0, str(ROOT / "configs"))
    import multitask_coco

    config = multitask_coco.get_config()
    config.model.update({**TINY, **model})
    config.vocab.text_vocab_size = TEXT_VOCAB
    config.data.image_size = 64
    config.data.tokenizer_path = tokenizer_path
    return config


def _official_config(variant: str):
    """configs/multitask_coco.py as shipped (remat, compute type), with another variant."""
    sys.path.insert(0, str(ROOT / "configs"))
    import multitask_coco

    config = multitask_coco.get_config()
    config.model.variant = variant
    assert config.vocab.text_shift + config.vocab.text_vocab_size == 35000  # official
    return config


def _overrides(config) -> list[str]:
    model = [f"--config.model.{k}={v}" for k, v in TINY.items()]
    return [
        *model,
        f"--config.vocab.text_vocab_size={TEXT_VOCAB}",
        "--config.data.image_size=64",
        f"--config.data.tokenizer_path={config.data.tokenizer_path}",
    ]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    """A small SentencePiece model in the T5/C4 layout (0 pad, 1 eos, 2 unk), trained here."""
    prefix = tmp_path_factory.mktemp("spm") / "small"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS),
        model_prefix=str(prefix),
        vocab_size=40,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return f"{prefix}.model"


@pytest.fixture(scope="module")
def official():
    data = np.load(FIXTURE / "inputs_and_logits.npz")
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def imported(spm_model, tmp_path_factory):
    """The fixture imported by the command line, as a user runs it."""
    out = str(tmp_path_factory.mktemp("imported") / "run")
    config = _config(spm_model)
    command = [
        sys.executable,
        "-m",
        "unified_seq.import_official",
        f"--checkpoint={FIXTURE}",
        f"--config={ROOT / 'configs' / 'multitask_coco.py'}",
        *_overrides(config),
        f"--out={out}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported 105 variables (478,080 parameters)" in result.stdout
    return out, config


def _forward(model, params, images, tokens):
    logits, extras = model.apply({"params": params}, images, tokens, train=False)
    grid = model.apply({"params": params}, images, method=lambda m, x: m.encoder(x, train=False))
    return np.asarray(logits), np.asarray(extras["encoded"]), np.asarray(grid)


def test_imported_logits_equal_the_official_models(imported, official):
    out, _ = imported
    predictor = Predictor.from_workdir(out)  # what `unified_seq.predict --workdir OUT` loads
    assert predictor.step == 1  # the official global_step
    logits, encoded, grid = _forward(
        predictor.model, predictor.variables["params"], official["image"], official["tokens"]
    )
    np.testing.assert_allclose(grid.reshape(2, 16, 64), official["vit_output"], atol=ATOL)
    np.testing.assert_allclose(encoded, official["encoded"], atol=ATOL)
    np.testing.assert_allclose(logits, official["logits"], atol=ATOL)
    # The official model's greedy next tokens, all of them.
    np.testing.assert_array_equal(logits.argmax(-1), official["logits"].argmax(-1))


def test_eval_and_init_from_read_the_import_and_training_there_is_refused(imported):
    out, config = imported
    params, _, step = train.restore_params(config, out)  # what --mode eval restores
    assert step == 1
    reader = import_official.read_checkpoint(str(FIXTURE / "ckpt-1"))[0]
    np.testing.assert_array_equal(
        np.asarray(params["bridge"]["proj"]["kernel"]),
        reader["model/proj/kernel/.ATTRIBUTES/VARIABLE_VALUE"],
    )
    # config.init_from: a new run at another sequence length keeps the 32 imported rows.
    config = config.copy_and_resolve_references()
    config.tasks.object_detection.max_instances = 20
    space = vocab.TokenSpace.from_config(config.vocab)
    model = train.build_model(config, space)
    length = max(train.sequence_lengths(config).values())
    fresh = jax.jit(model.init)(
        jax.random.key(1), jnp.zeros([1, 64, 64, 3]), jnp.zeros([1, length], jnp.int32)
    )["params"]
    loaded = init_from.load_initial_params(out, fresh, config)
    table = reader["model/decoder/ar_decoder.Sseq_pos_embedding/.ATTRIBUTES/VARIABLE_VALUE"]
    np.testing.assert_array_equal(np.asarray(loaded["decoder"]["pos_embed"])[:32], table)
    np.testing.assert_array_equal(
        np.asarray(loaded["decoder"]["layers_1"]["mlp"]["out"]["kernel"]),
        np.asarray(params["decoder"]["layers_1"]["mlp"]["out"]["kernel"]),
    )
    # Resuming in OUT itself would need an optimizer state it does not have.
    ckpt = checkpoint.Checkpointer(os.path.join(out, "checkpoints"), every=0, keep=1)
    with pytest.raises(ConfigError, match="parameters only.*--config.init_from="):
        ckpt.restore_latest(None)
    ckpt.close()


def test_run_folder_files(imported, spm_model):
    out, config = imported
    report = json.loads(pathlib.Path(out, "import.json").read_text())
    official_keys = [
        line.split("\t")[0] for line in (FIXTURE / "variables.tsv").read_text().splitlines()
    ]
    model_keys = {k for k in official_keys if k.startswith("model/")}
    assert len(model_keys) == 105
    assert {f"model/{k}/.ATTRIBUTES/VARIABLE_VALUE" for k in report["variables"]} == model_keys
    assert len(report["left_behind"]) == len(official_keys) - 105  # optimizer, counters
    assert "global_step/.ATTRIBUTES/VARIABLE_VALUE" in report["left_behind"]
    length = max(train.sequence_lengths(config).values())
    assert report["resized"] == {"decoder/pos_embed": [32, length]}
    assert report["fresh_text_rows"] == []
    # The tokenizer travels with the run; config.json then points at that copy.
    saved = json.loads(pathlib.Path(out, "config.json").read_text())
    assert saved["data"]["tokenizer_path"] == ""
    assert pathlib.Path(out, "tokenizer.model").read_bytes() == pathlib.Path(spm_model).read_bytes()
    categories = json.loads(pathlib.Path(out, "categories.json").read_text())
    assert len(categories["dataset_ids"]) == 80 and categories["dataset_ids"][-1] == 90
    assert categories["class_ids"] == categories["dataset_ids"]  # token = 100 + COCO id
    assert len(categories["keypoint_names"]) == 17


def _read_fixture():
    variables, _, _ = import_official.read_checkpoint(str(FIXTURE / "ckpt-1"))
    return variables


def _abstract(config):
    space = vocab.TokenSpace.from_config(config.vocab)
    model = train.build_model(config, space)
    length = max(train.sequence_lengths(config).values())
    size = int(config.data.image_size)
    return model, jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros([1, size, size, 3]), jnp.zeros([1, length], jnp.int32)
        )["params"]
    )


def _key(name: str) -> str:
    return f"model/{name}/.ATTRIBUTES/VARIABLE_VALUE"


def _swap(names: tuple[str, str]):
    def corrupt(variables):
        a, b = map(_key, names)
        variables[a], variables[b] = variables[b], variables[a]

    return corrupt


def _transpose(name: str):
    def corrupt(variables):
        variables[_key(name)] = variables[_key(name)].T

    return corrupt


@pytest.mark.parametrize(
    "corrupt",
    [
        _swap(
            (
                "decoder/decoder/dec_layers/0/self_mha/_query_dense/kernel",
                "decoder/decoder/dec_layers/0/self_mha/_key_dense/kernel",
            )
        ),
        _swap(("encoder/stem_ln/gamma", "encoder/stem_ln/beta")),
        _transpose("proj/kernel"),
    ],
    ids=["query-key-swapped", "gamma-beta-swapped", "square-kernel-transposed"],
)
def test_a_wrong_mapping_cannot_pass_the_logits_check(official, corrupt):
    # Shapes cannot tell these apart; the logits check must, by a wide margin.
    config = _config()
    model, abstract = _abstract(config)
    variables = _read_fixture()
    corrupt(variables)
    params, _ = import_official.convert(
        variables, abstract, config, lambda: jax.tree.map(lambda x: np.zeros(x.shape), abstract)
    )
    logits, _, _ = _forward(model, params, official["image"], official["tokens"])
    assert np.abs(logits - official["logits"]).max() > 10 * ATOL


def _shapes(variables):
    return {k: v.shape for k, v in variables.items()}


def _ours(config):
    _, abstract = _abstract(config)
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {"/".join(k.key for k in p): x.shape for p, x in flat}


def test_checkpoint_variables_without_a_parameter_are_named():
    variables = _shapes(_read_fixture())
    variables[_key("encoder/cls_token")] = (1, 1, 64)
    with pytest.raises(CheckpointError, match=r"encoder/cls_token \(a class token"):
        import_official.plan(variables, _ours(_config()), _config())


def test_parameters_the_checkpoint_lacks_are_named():
    variables = _shapes(_read_fixture())
    del variables[_key("proj_ln/gamma")]
    with pytest.raises(ConfigError, match="bridge/proj_ln/scale"):
        import_official.plan(variables, _ours(_config()), _config())


def test_another_size_names_the_fields_to_set():
    config = _config(dec_depth=3, enc_mlp_dim=256)
    with pytest.raises(ConfigError) as error:
        import_official.plan(_shapes(_read_fixture()), _ours(config), config)
    message = str(error.value)
    assert "decoder/layers_2/" in message
    assert "--config.model.dec_depth=2" in message and "--config.model.enc_mlp_dim=128" in message


def test_another_variant_is_named():
    keys = _vitb_shapes()
    config = _official_config("vit-l")
    with pytest.raises(
        ConfigError, match=r"the checkpoint is vit-b .*--config.model.variant=vit-b"
    ):
        import_official.plan(keys, _ours(config), config)


def test_a_conv_stem_config_is_told_to_use_the_patch_stem():
    config = _config(stem="conv")
    with pytest.raises(ConfigError, match="stem must be 'patch'"):
        import_official.plan(_shapes(_read_fixture()), _ours(config), config)


def test_another_vocabulary_names_the_size_to_set():
    config = _config()
    config.vocab.text_vocab_size = 300
    with pytest.raises(ConfigError, match="3200 tokens.*--config.vocab.text_vocab_size=200"):
        import_official.plan(_shapes(_read_fixture()), _ours(config), config)


def test_a_detection_checkpoint_gains_fresh_text_rows():
    # The Objects365 checkpoints have 3000 tokens: prompts, classes and coordinates.
    variables = _read_fixture()
    for name in ("decoder/ar_decoder.Stoken_embedding", "decoder/ar_decoder.Soutp_bias"):
        variables[_key(name)] = variables[_key(name)][:3000]
    config = _config()
    _, abstract = _abstract(config)
    fresh = jax.tree.map(lambda x: np.full(x.shape, 7.0, np.float32), abstract)
    params, matched = import_official.convert(variables, abstract, config, fresh)
    assert sorted(matched["grown"]) == ["decoder/embed/embedding", "decoder/output_bias"]
    embedding = params["decoder"]["embed"]["embedding"]
    assert embedding.shape == (3200, 64)
    np.testing.assert_array_equal(
        embedding[:3000], variables[_key("decoder/ar_decoder.Stoken_embedding")]
    )
    assert np.all(embedding[3000:] == 7.0) and np.all(
        params["decoder"]["output_bias"][3000:] == 7.0
    )


def _vitb_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in VITB_KEYS.read_text().splitlines():
        key, shape = line.split("\t")
        if key.startswith("model/"):
            shapes[key] = tuple(json.loads(shape))
    return shapes


def test_every_official_vit_b_variable_maps_and_fills_the_model():
    official = _vitb_shapes()
    config = _official_config("vit-b")
    ours = _ours(config)
    matched = import_official.plan(official, ours, config, "vit-b 640")
    assert len(matched["names"]) == len(official) == len(ours)
    assert sorted(matched["names"].values()) == sorted(official)
    assert matched["grown"] == []
    for path, key in matched["names"].items():
        if path != "decoder/pos_embed":
            assert tuple(ours[path]) == official[key], path
    assert sum(int(np.prod(s)) for s in official.values()) == 131_585_976
    assert import_official.checkpoint_sizes(official) == {
        k: v for k, v in sizes.SIZES["vit-b"].items() if k not in ("dropout", "drop_path")
    }


def test_official_tokenizer_gives_the_official_text_ids(spm_model):
    import tensorflow as tf

    from unified_seq.data import inputs
    from unified_seq.tasks import captioning

    config = _config(spm_model)
    space = vocab.TokenSpace.from_config(config.vocab)
    tokenizer = inputs.load_tokenizer(config, space)
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    text = "a person rides a red bus"
    ids = sp.encode(text)
    seq = captioning.encode(
        tf.ragged.constant([ids], tf.int32),
        tf.constant([0, 0]),
        config.tasks.captioning,
        space,
        training=False,
    )
    answer = seq["target_seq"].numpy()[0][: len(ids)]
    np.testing.assert_array_equal(answer, 3000 + np.array(ids))
    assert captioning.decode(answer, tokenizer, space) == text


def test_command_line_errors_are_one_line(tmp_path):
    command = [
        sys.executable,
        "-m",
        "unified_seq.import_official",
        f"--checkpoint={tmp_path / 'nothing'}",
        f"--config={ROOT / 'configs' / 'multitask_coco.py'}",
        f"--out={tmp_path / 'out'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no TF checkpoint at" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    usage = [sys.executable, "-m", "unified_seq.import_official", "--help"]
    shown = subprocess.run(usage, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert shown.returncode == 0 and "--checkpoint" in shown.stdout
