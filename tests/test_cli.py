"""The main command's first seconds: help, config mistakes in one line, nothing left behind."""

import os
import subprocess
import sys

import pytest

from unified_seq import train
from unified_seq.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "multitask_synthetic.py")


def _main(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "unified_seq.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _default_config():
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import multitask_synthetic

    return multitask_synthetic.get_config()


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    # C++ libraries print their own start-up notices on stderr; ours start with "error:".
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_help_exits_zero_and_lists_the_flags():
    result = _main("--help")
    assert result.returncode == 0, result.stderr
    assert "--workdir" in result.stdout and "--mode" in result.stdout
    assert "--config.<block>.<field>" in result.stdout


def test_a_misspelt_field_is_one_line_with_a_suggestion(tmp_path):
    workdir = tmp_path / "run"
    result = _main("--config", CONFIG, "--workdir", str(workdir), "--config.train.setps=3")
    assert result.returncode == 2
    assert _error_lines(result) == [
        "error: bad config override (--config.train.setps): unknown field 'setps'; "
        "did you mean 'steps'?"
    ]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_a_bad_variant_fails_before_data_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    result = _main("--config", CONFIG, "--workdir", str(workdir), "--config.model.variant=huge")
    assert result.returncode == 2
    assert (
        result.stdout.splitlines()[0] == f"unified_seq: --mode train_and_eval, --workdir {workdir}"
    )
    assert "loading the" not in result.stdout
    (line,) = _error_lines(result)
    assert "model.variant 'huge' is unknown" in line
    assert not workdir.exists()


def test_eval_of_an_empty_workdir_says_so_and_creates_nothing(tmp_path):
    workdir = tmp_path / "nothing"
    result = _main("--config", CONFIG, "--workdir", str(workdir), "--mode", "eval")
    assert result.returncode == 1
    (line,) = _error_lines(result)
    assert f"no checkpoint under {workdir}" in line
    assert not workdir.exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("train.batch_size", 0, "config.train.batch_size=0: must be >= 1"),
        ("train.steps", 0, "config.train.steps=0: a training run needs at least 1 step"),
        ("train.keep_checkpoints", 0, "keep_checkpoints=0 >= 1"),
        ("model.variant", "vit-x", "model.variant 'vit-x' is unknown"),
        ("model.remat", "some", "model.remat 'some' is unknown"),
        ("train.mixing", "both", "config.train.mixing='both'"),
    ],
)
def test_field_errors_name_the_field(field, value, message):
    config = _default_config()
    block, name = field.split(".")
    config[block][name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.check_fields(config)


def test_steps_zero_is_fine_for_evaluation():
    config = _default_config()
    config.train.steps = 0
    train.check_fields(config, training=False)
