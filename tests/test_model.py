"""The encoder-decoder: shapes, causality, dropout, sizes, stems and the sin-cos codes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unified_seq.models import SIZES, build_model, model_config
from unified_seq.models.decoder import ordered_code_1d
from unified_seq.models.vit import ConvStem, posemb_sincos_2d

VOCAB = 300
TINY = dict(
    patch_size=8,
    enc_depth=1,
    enc_width=32,
    enc_mlp_dim=64,
    enc_heads=2,
    dec_depth=2,
    dec_width=32,
    dec_mlp_dim=64,
    dec_heads=4,
)


@pytest.fixture(scope="module")
def setup():
    model = build_model(model_config("tiny", **TINY), VOCAB, max_len=16)
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, VOCAB)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    return model, variables, images, tokens


def test_shapes_for_one_and_several_sequences_per_image(setup):
    model, variables, images, tokens = setup
    logits, extras = model.apply(variables, images, tokens)
    assert logits.shape == (2, 10, VOCAB) and logits.dtype == jnp.float32
    assert extras["encoded"].shape == (2, 16, 32)  # 32 / 8 = 4 → 4 × 4 image tokens

    several = jnp.stack([tokens, jnp.flip(tokens, 1), tokens], axis=1)  # [B, C=3, T]
    logits3, _ = model.apply(variables, images, several)
    assert logits3.shape == (2, 3, 10, VOCAB)
    # Each sequence is decoded against its own image.
    np.testing.assert_allclose(logits3[:, 0], logits, atol=1e-5)
    np.testing.assert_allclose(logits3[:, 2], logits, atol=1e-5)
    flipped, _ = model.apply(variables, images, jnp.flip(tokens, 1))
    np.testing.assert_allclose(logits3[:, 1], flipped, atol=1e-5)


def test_decoder_is_causal(setup):
    model, variables, images, tokens = setup
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % VOCAB)
    a, _ = model.apply(variables, images, tokens)
    b, _ = model.apply(variables, images, changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-3


def test_eval_is_deterministic_and_dropout_only_in_training(setup):
    model, variables, images, tokens = setup
    a, _ = model.apply(variables, images, tokens, train=False)
    b, _ = model.apply(variables, images, tokens, train=False)
    np.testing.assert_array_equal(a, b)

    def train(seed):
        rngs = {"dropout": jax.random.key(seed)}
        return model.apply(variables, images, tokens, train=True, rngs=rngs)[0]

    t1, t2, t1_again = train(0), train(1), train(0)
    assert np.abs(np.asarray(t1 - a)).max() > 1e-3
    assert np.abs(np.asarray(t1 - t2)).max() > 1e-3
    np.testing.assert_array_equal(t1, t1_again)
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, images, tokens, train=True)


def test_drop_path_drops_whole_branches_per_example():
    cfg = model_config("tiny", **TINY, dropout=0.0, drop_path=0.5)
    model = build_model(cfg, VOCAB, max_len=16)
    images = jnp.ones((8, 32, 32, 3)) * 0.5
    variables = jax.jit(model.init)(jax.random.key(0), images, jnp.zeros((8, 4), jnp.int32))
    eval_enc = model.apply(variables, images, method=model.encode)
    train_enc = model.apply(
        variables, images, train=True, method=model.encode, rngs={"dropout": jax.random.key(3)}
    )
    # Identical inputs: in eval all rows agree; in training the rows differ by
    # which branches each example dropped.
    np.testing.assert_allclose(eval_enc, eval_enc[:1].repeat(8, 0), atol=1e-5)
    assert np.abs(np.asarray(train_enc - train_enc[:1])).max() > 1e-3


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_vit_b_parameter_count():
    model = build_model(model_config("vit-b"), vocab_size=35000, max_len=512)
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 640, 640, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, 8), jnp.int32),
    )
    params = shapes["params"]
    # Official shapes (facts §5): encoder 85,648,128; bridge 2,495,488;
    # decoder 25,487,360 + embedding 35000 × 512 + output bias 35000. Position
    # codes are fixed sin-cos, so the image size adds no parameters. We match
    # the official total exactly.
    assert _count(params["encoder"]) == 85_648_128
    assert _count(params["bridge"]) == 2_495_488
    assert _count(params["decoder"]) == 25_487_360 + 17_920_000 + 35_000
    assert _count(params) == 131_585_976


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="vit-b"):
        model_config("vit-h")
    cfg = model_config("tiny")
    cfg.variant = "huge"
    with pytest.raises(ValueError, match="tiny"):
        build_model(cfg, VOCAB, 16)
    assert set(SIZES) == {"tiny", "small", "vit-b", "vit-l"}


def test_variant_switch_and_overrides():
    cfg = model_config("tiny", dec_depth=3)
    cfg.variant = "vit-l"  # as --config.model.variant=vit-l would
    model = build_model(cfg, VOCAB, 16)
    assert model.encoder_config["depth"] == 24 and model.decoder_config["depth"] == 3


def test_sincos_matches_the_formula():
    h, w, dim = 3, 5, 16
    code = posemb_sincos_2d(h, w, dim)
    assert code.shape == (h * w, dim)
    quarter = dim // 4

    def expected(i, j, c):
        half = dim // 2
        coord, c = (i / (h - 1), c) if c < half else (j / (w - 1), c - half)
        k = c % quarter
        angle = coord * 2 * np.pi / 10000 ** (2 * k / half)
        return np.sin(angle) if c < quarter else np.cos(angle)

    for i, j, c in [(0, 0, 0), (1, 2, 1), (2, 4, 3), (2, 1, 5), (1, 3, 9), (2, 4, 14), (0, 4, 12)]:
        np.testing.assert_allclose(code[i * w + j, c], expected(i, j, c), atol=1e-6)
    # Corners: coordinate 2π at the last row/column.
    np.testing.assert_allclose(code[(h - 1) * w, 0], np.sin(2 * np.pi), atol=1e-6)


def test_conv_stem_gives_the_patch_grid_and_sees_locally():
    model = build_model(model_config("tiny", stem="conv", **TINY), VOCAB, max_len=16)
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, VOCAB)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    stem = variables["params"]["encoder"]["conv_stem"]
    # patch 8 = three stride-2 convolutions, then the 1x1 projection.
    assert sorted(k for k in stem if k.startswith("conv")) == ["conv_0", "conv_1", "conv_2"]
    assert stem["proj"]["kernel"].shape == (1, 1, 32, 32)
    grid = model.apply(variables, images, method=lambda m, x: m.encoder(x, train=False))
    assert grid.shape == (2, 4, 4, 32)

    # A pixel change in the top-left corner reaches the stem's top-left token
    # but, through the small receptive field of 3x3 convolutions, not the far corner.
    changed = images.at[:, 0, 0].set(1.0 - images[:, 0, 0])
    conv_stem = ConvStem(8, 32)
    a = conv_stem.apply({"params": stem}, images)
    b = conv_stem.apply({"params": stem}, changed)
    delta = np.abs(np.asarray(a - b)).max(axis=(0, 3))
    assert delta[0, 0] > 1e-4 and delta[3, 3] == 0.0


def test_conv_stem_rejects_a_patch_size_that_is_not_a_power_of_two():
    model = build_model(model_config("tiny", stem="conv", **{**TINY, "patch_size": 6}), VOCAB, 16)
    with pytest.raises(ValueError, match="power-of-two"):
        model.init(jax.random.key(0), jnp.zeros((1, 24, 24, 3)), jnp.zeros((1, 4), jnp.int32))


def test_unknown_stem_is_refused():
    model = build_model(model_config("tiny", stem="pixels", **TINY), VOCAB, 16)
    with pytest.raises(ValueError, match="model.stem"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4), jnp.int32))


def test_ordered_code_keeps_nearby_bins_nearby():
    code = ordered_code_1d(128, 32)
    assert code.shape == (128, 32) and code.dtype == np.float32
    np.testing.assert_allclose(code.std(), 0.02, rtol=1e-5)
    # Distance from bin 0 grows with the bin distance over the first eighth
    # (the fastest frequency's half period), and a neighbour is nearer than
    # any bin 4 or more away.
    dist = np.linalg.norm(code - code[0], axis=1)
    assert np.all(np.diff(dist[:17]) > 0)
    assert dist[1] < dist[4:].min()
    with pytest.raises(ValueError, match="even width"):
        ordered_code_1d(8, 5)


def test_sincos_coord_init_sets_only_the_coordinate_rows():
    images = jnp.zeros((1, 32, 32, 3))
    tokens = jnp.zeros((1, 4), jnp.int32)

    def embedding(cfg, coord_range):
        model = build_model(cfg, VOCAB, 16, coord_range=coord_range)
        params = jax.jit(model.init)(jax.random.key(0), images, tokens)["params"]
        return np.asarray(params["decoder"]["embed"]["embedding"])

    normal = embedding(model_config("tiny", **TINY), (100, 64))
    ordered = embedding(model_config("tiny", coord_embed_init="sincos", **TINY), (100, 64))
    np.testing.assert_array_equal(ordered[100:164], ordered_code_1d(64, 32))
    # Same key, so every other row is the normal draw.
    np.testing.assert_array_equal(ordered[:100], normal[:100])
    np.testing.assert_array_equal(ordered[164:], normal[164:])
    assert not np.allclose(normal[100:164], ordered[100:164])


def test_sincos_coord_init_errors():
    cfg = model_config("tiny", coord_embed_init="sincos", **TINY)
    with pytest.raises(ValueError, match="coordinate range"):
        build_model(cfg, VOCAB, 16)
    model = build_model(cfg, VOCAB, 16, coord_range=(250, 100))  # 350 rows > 300
    with pytest.raises(ValueError, match="exceed vocab"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4), jnp.int32))
    cfg.coord_embed_init = "uniform"
    with pytest.raises(ValueError, match="coord_embed_init"):
        build_model(cfg, VOCAB, 16, coord_range=(100, 64))
