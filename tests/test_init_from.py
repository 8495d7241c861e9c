"""Fine-tuning from another run's parameters (`config.init_from`)."""

import contextlib
import io
import logging
import os
import re

import jax
import numpy as np
import optax
import pytest
from test_configs import SPECS, _load
from test_train_run import _config, data_dir  # noqa: F401

from unified_seq import init_from, sharding, train, vocab

SOURCE_STEPS = 60


def _train_printing(config, workdir: str) -> tuple[train.TrainState, dict[int, dict]]:
    """Runs train.train; returns its state and the losses of every step it printed.

    Losses as train.py reports them: {"loss": Σ λ_t L_t, task: L_t}, each
    computed on the parameters before that step's update.
    """
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        state, _ = train.train(config, workdir)
    losses = {}
    for step, total, per_task in re.findall(
        r"step (\d+)/\d+ \| loss ([\d.]+) \(([^)]*)\)", out.getvalue()
    ):
        words = per_task.split()
        losses[int(step)] = {
            "loss": float(total),
            **dict(zip(words[::2], map(float, words[1::2]), strict=True)),
        }
    return state, losses


@pytest.fixture(scope="module")
def source(data_dir, tmp_path_factory):  # noqa: F811
    """A short run at 64 px, its config.json written as main.py writes it."""
    workdir = str(tmp_path_factory.mktemp("source"))
    config = _config(data_dir)
    config.train.update(steps=SOURCE_STEPS, log_every=1, checkpoint_every=0)
    config.optim.update(learning_rate=3e-3, warmup_steps=5)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    state, losses = _train_printing(config, workdir)
    assert sorted(losses) == list(range(1, SOURCE_STEPS + 1))
    return {"workdir": workdir, "params": state.params, "losses": losses}


def _fine_tune_config(data_dir: str, source_workdir: str):  # noqa: F811
    """Another image size and a longer captioning sequence (so a longer pos_embed)."""
    config = _config(data_dir)
    config.data.image_size = 96
    config.tasks.captioning.max_len = 40
    config.init_from = source_workdir
    return config


def _fresh_params(config):
    space = vocab.TokenSpace.from_config(config.vocab)
    model = train.build_model(config, space)
    size = config.data.image_size
    images = np.zeros([1, size, size, 3], np.float32)
    tokens = np.zeros([1, 4], np.int32)
    return jax.jit(model.init)(jax.random.key(1), images, tokens)["params"]


def _named(tree) -> dict:
    return {
        init_from.param_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_resize_rows_keeps_shared_rows_and_takes_fresh_ones():
    table = np.arange(6, dtype=np.int32).reshape(3, 2)
    grown = init_from.resize_rows(table, -np.ones([5, 2], np.float32))
    np.testing.assert_array_equal(grown, [[0, 1], [2, 3], [4, 5], [-1, -1], [-1, -1]])
    assert grown.dtype == np.float32
    long = np.arange(10, dtype=np.float32).reshape(5, 2)
    cut = init_from.resize_rows(long, jax.numpy.zeros([2, 2]))
    np.testing.assert_array_equal(cut, [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"rows of shape \(2,\) into rows of shape \(3,\)"):
        init_from.resize_rows(long, jax.numpy.zeros([5, 3]))


def test_every_config_file_has_an_empty_init_from():
    for spec in SPECS:
        assert _load(spec).init_from == "", spec


def test_loaded_params_are_the_sources_placed_like_this_runs(source, data_dir):  # noqa: F811
    config = _fine_tune_config(data_dir, source["workdir"])
    space = vocab.TokenSpace.from_config(config.vocab)
    model = train.build_model(config, space)
    optimizer = optax.adamw(1e-3)
    mesh = sharding.mesh_from_config(config)
    seq_len = max(train.sequence_lengths(config).values())
    state, shardings = train.create_state(model, optimizer, config, mesh, seq_len)
    fresh = _named(state.params)
    loaded = init_from.load_initial_params(source["workdir"], state.params, config)

    saved = _named(source["params"])
    got = _named(loaded)
    assert sorted(got) == sorted(saved)
    for name, value in got.items():
        if name == "decoder/pos_embed":
            continue
        np.testing.assert_array_equal(value, saved[name], err_msg=name)
    old, new = saved["decoder/pos_embed"].shape[0], got["decoder/pos_embed"].shape[0]
    assert (old, new) == (31, 40)  # detection's 31 tokens, then captioning's 40
    np.testing.assert_array_equal(got["decoder/pos_embed"][:old], saved["decoder/pos_embed"])
    np.testing.assert_array_equal(got["decoder/pos_embed"][old:], fresh["decoder/pos_embed"][old:])
    placed = jax.tree_util.tree_map(lambda x: x.sharding, loaded)
    assert placed == shardings.params


def _adam_states(opt_state) -> list:
    def is_adam(x):
        return isinstance(x, optax.ScaleByAdamState)

    return [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(s)]


def test_fine_tuning_starts_from_the_sources_loss_at_step_zero(source, data_dir, tmp_path):  # noqa: F811
    config = _fine_tune_config(data_dir, source["workdir"])
    config.train.update(steps=1, log_every=1, checkpoint_every=0)
    state, losses = _train_printing(config, str(tmp_path))

    fresh, first = source["losses"][1], losses[1]
    last = [source["losses"][s] for s in range(SOURCE_STEPS - 4, SOURCE_STEPS + 1)]
    for task in ("object_detection", "captioning"):
        end = max(row[task] for row in last)
        # Measured: fresh ~5.9-6.0, the source's last ~3.6, fine-tuned ~2.7-3.6.
        assert fresh[task] - end > 1.5, (task, fresh[task], end)  # the source did learn
        assert first[task] < end + 0.25 * (fresh[task] - end), (task, first[task], end)

    # Step and optimizer start afresh: one update from count 0 and zero moments
    # leaves mu = (1 - b1) g and nu = (1 - b2) g², so mu² / nu = (1 - b1)² / (1 - b2);
    # the source's moments would break the ratio.
    assert int(state.step) == 1
    assert os.listdir(tmp_path / "checkpoints" / "state") == ["1"]
    (adam,) = _adam_states(state.opt_state)
    assert int(adam.count) == 1
    b1, b2 = float(config.optim.b1), float(config.optim.b2)
    mu = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(adam.mu)])
    nu = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(adam.nu)])
    # Not all: attention key biases get ~0 gradient (softmax ignores a shift);
    # the floor keeps float32 denormals (imprecise) out.
    seen = nu > 1e-30
    assert seen.mean() > 0.9, seen.mean()
    ratio = mu[seen].astype(np.float64) ** 2 / nu[seen]
    np.testing.assert_allclose(ratio, (1 - b1) ** 2 / (1 - b2), rtol=1e-3)


def test_another_vocabulary_fails_naming_both_sizes(source, data_dir):  # noqa: F811
    config = _config(data_dir)
    config.vocab.text_vocab_size = 96  # 264 + 96 = 360 tokens; the source has 392
    with pytest.raises(ValueError) as error:
        init_from.load_initial_params(source["workdir"], _fresh_params(config), config)
    message = str(error.value)
    assert "decoder/embed/embedding" in message and "392" in message and "360" in message
    assert "text_vocab_size=96" in message and "--config.vocab.text_vocab_size=128" in message
    assert "config.json" in message

    # The same size laid out otherwise would swap tokens silently: refused too.
    config = _config(data_dir)
    config.vocab.bins = 32
    with pytest.raises(ValueError, match="token layout differs.*--config.vocab.bins=64"):
        init_from.load_initial_params(source["workdir"], _fresh_params(config), config)


def test_another_architecture_fails_naming_the_parameter(source, data_dir):  # noqa: F811
    config = _config(data_dir)
    config.model.dec_mlp_dim = 96
    with pytest.raises(ValueError, match="architectures differ") as error:
        init_from.load_initial_params(source["workdir"], _fresh_params(config), config)
    assert "decoder/layers_0/mlp/hidden/kernel: saved (64, 128), this model (64, 96)" in str(
        error.value
    )
    config = _config(data_dir)
    config.model.dec_depth = 1
    with pytest.raises(ValueError, match=r"holds parameters this model does not have.*layers_1"):
        init_from.load_initial_params(source["workdir"], _fresh_params(config), config)
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        init_from.load_initial_params(str(data_dir), _fresh_params(config), config)


def test_resume_wins_over_init_from(source, data_dir, tmp_path, caplog):  # noqa: F811
    config = _config(data_dir)
    config.train.update(steps=2, checkpoint_every=0)
    own, _ = train.train(config, str(tmp_path))
    config.init_from = source["workdir"]
    with caplog.at_level(logging.INFO, logger="absl"):
        resumed, _ = train.train(config, str(tmp_path))
    assert "init_from=" + source["workdir"] + " ignored" in caplog.text
    assert int(resumed.step) == 2
    saved, ours = _named(source["params"]), _named(resumed.params)
    for name, value in _named(own.params).items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert not np.array_equal(ours["decoder/output_bias"], saved["decoder/output_bias"])
