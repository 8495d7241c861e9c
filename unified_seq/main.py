r"""Command line entry: flags → config → train / eval.

    python -m unified_seq.main --config configs/multitask_synthetic.py --workdir /tmp/us

Modes: `train_and_eval` (default), `train`, `eval` (the latest checkpoint in
the workdir), and `data` (build, time and draw every task's training input).
Any config field can be overridden, e.g. `--config.train.steps=200`.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train_and_eval", "train", "eval", "data")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the run: checkpoints, logs, results.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train_and_eval",
    MODES,
    "train_and_eval | train | eval (latest checkpoint) | data (inspect the inputs).",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/multitask_synthetic.py")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if not flags.FLAGS["verbosity"].present:
        # orbax and TF log every file they touch at INFO; progress lines are printed.
        logging.set_verbosity(logging.WARNING)
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    logging.info("Config:\n%s", config)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    # Imported here so `--help` and flag errors do not wait for JAX and TF.
    from unified_seq import data_check, evaluate, train

    # A wrong task setting fails here, before any data is read.
    train.validate(config)
    mode = _MODE.value
    if mode == "data":
        data_check.run(config, workdir)
        return

    def evaluate_during_training(step, params, model):
        report = evaluate.evaluate(config, workdir, params, model, step)
        print(f"eval at step {step}: {json.dumps(report)}", flush=True)

    if mode in ("train", "train_and_eval"):
        during = evaluate_during_training if mode == "train_and_eval" else None
        state, model = train.train(config, workdir, during)
        params, step = state.params, int(state.step)
    else:
        params, model, step = train.restore_params(config, workdir)
    if mode in ("eval", "train_and_eval"):
        report = evaluate.evaluate(config, workdir, params, model, step)
        print(json.dumps(report, indent=2), flush=True)


if __name__ == "__main__":
    app.run(main)
