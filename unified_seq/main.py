r"""Command line entry: flags → config → train / eval.

    python -m unified_seq.main --config configs/multitask_synthetic.py --workdir /tmp/us

Modes: `train_and_eval` (default), `train`, `eval` (the latest checkpoint in
the workdir), `data` (build, time and draw every task's training input) and
`plan` (devices, batches, memory and FLOPs per device, the time of two steps).
Any config field can be overridden, e.g. `--config.train.steps=200`.

On many hosts every process runs this same command (unified_seq/distributed.py).
The workdir may be local or `gs://`; only process 0 writes its files.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train_and_eval", "train", "eval", "data", "plan")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the run: checkpoints, logs, results.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train_and_eval",
    MODES,
    "train_and_eval | train | eval (latest checkpoint) | data (inspect the inputs) | "
    "plan (memory and speed per device).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0 in a multi-process run (env UNIFIED_SEQ_COORDINATOR_ADDRESS); "
    "not needed on TPU pods, SLURM or Open MPI.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the run (env UNIFIED_SEQ_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in the run (env UNIFIED_SEQ_PROCESS_ID)."
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
    # Imported here so `--help` and flag errors do not wait for JAX and TF.
    from unified_seq import distributed

    # Before anything touches a device: every process must join first.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    import jax
    import tensorflow as tf

    from unified_seq import data_check, evaluate, train

    # tf.data runs on the host; TF must not claim the accelerators JAX uses.
    tf.config.set_visible_devices([], "GPU")
    tf.io.gfile.makedirs(workdir)
    logging.info("Config:\n%s", config)
    if jax.process_index() == 0:
        with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    # A wrong task setting fails here, before any data is read.
    train.validate(config)
    mode = _MODE.value
    if mode == "data":
        data_check.run(config, workdir)
        return
    if mode == "plan":
        from unified_seq import plan

        plan.run(config, workdir)
        return

    def evaluate_during_training(step, params, model):
        report = evaluate.evaluate(config, workdir, params, model, step)
        if jax.process_index() == 0:
            print(f"eval at step {step}: {json.dumps(report)}", flush=True)

    if mode in ("train", "train_and_eval"):
        during = evaluate_during_training if mode == "train_and_eval" else None
        state, model = train.train(config, workdir, during)
        params, step = state.params, int(state.step)
    else:
        params, model, step = train.restore_params(config, workdir)
    if mode in ("eval", "train_and_eval"):
        report = evaluate.evaluate(config, workdir, params, model, step)
        if jax.process_index() == 0:
            print(json.dumps(report, indent=2), flush=True)


if __name__ == "__main__":
    app.run(main)
