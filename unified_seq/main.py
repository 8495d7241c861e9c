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

import contextlib
import json
import re
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train_and_eval", "train", "eval", "data", "plan")
# After SIGTERM: saved, stopped; schedulers treat it as "terminated" and restart.
PREEMPTED_EXIT_CODE = 143

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
    try:
        run(config, _WORKDIR.value, _MODE.value)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume from the last checkpoint", 130)
    except Exception as e:  # noqa: BLE001 one line for the user's errors, else a traceback
        from unified_seq import errors
        from unified_seq.data.errors import DataError

        if isinstance(e, errors.Preempted):
            print(e, flush=True)
            sys.exit(PREEMPTED_EXIT_CODE)
        user_errors = (
            errors.ConfigError,
            errors.WorkdirError,
            errors.CheckpointError,
            errors.NonFiniteError,
            DataError,
            FileNotFoundError,
        )
        if not isinstance(e, user_errors):
            raise
        _fail(str(e), 2 if isinstance(e, errors.ConfigError) else 1)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(config: Any, workdir: str, mode: str) -> None:
    """One command: checks, joins the other processes, then trains and/or evaluates."""
    training = mode in ("train", "train_and_eval")
    print(f"unified_seq: --mode {mode}, --workdir {workdir}", flush=True)
    # Imported here so `--help` and flag errors do not wait for JAX and TF.
    from unified_seq import distributed

    # Before anything touches a device: every process must join first.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    import jax
    import tensorflow as tf

    from unified_seq import checkpoint, data_check, evaluate, train
    from unified_seq import workdir as workdir_lib

    # Field errors (unknown variant, batch or steps 0, ...) before any device
    # or data work.
    train.check_fields(config, training)
    # tf.data runs on the host; TF must not claim the accelerators JAX uses.
    tf.config.set_visible_devices([], "GPU")
    devices = jax.devices()
    print(
        f"devices: {len(devices)} × {devices[0].device_kind} ({jax.default_backend()}), "
        f"process {jax.process_index() + 1} of {jax.process_count()}",
        flush=True,
    )
    logging.info("Config:\n%s", config)
    if mode == "eval":
        # Eval only reads: nothing is created in a workdir without a checkpoint.
        checkpoint.locate(workdir)  # FileNotFoundError before anything is created
        train.validate(config, training=False)
        params, model, step = train.restore_params(config, workdir)
        out = workdir if _writable(workdir_lib, workdir) else None
        report = evaluate.evaluate(config, out, params, model, step, read_from=workdir)
        if jax.process_index() == 0:
            print(json.dumps(report, indent=2), flush=True)
        return

    workdir_lib.check_writable(workdir)
    # A wrong task setting fails here, before any data is read.
    train.validate(config, training)
    if mode == "data":
        data_check.run(config, workdir)
        return
    if mode == "plan":
        from unified_seq import plan

        plan.run(config, workdir)
        return

    lock = workdir_lib.RunLock(workdir) if jax.process_index() == 0 else None
    with lock or contextlib.nullcontext():
        resuming = _has_checkpoint(checkpoint, workdir)
        if jax.process_index() == 0:
            changes = workdir_lib.save_config(workdir, config, resuming)
            if changes:
                shown = "; ".join(changes[:10]) + (" ..." if len(changes) > 10 else "")
                print(f"config differs from the stored config.json (kept): {shown}", flush=True)

        def evaluate_during_training(step, params, model):
            report = evaluate.evaluate(config, workdir, params, model, step)
            if jax.process_index() == 0:
                print(f"eval at step {step}: {json.dumps(report)}", flush=True)

        during = evaluate_during_training if mode == "train_and_eval" else None
        state, model = train.train(config, workdir, during)
        params, step = state.params, int(state.step)
        if mode == "train_and_eval":
            report = evaluate.evaluate(config, workdir, params, model, step)
            if jax.process_index() == 0:
                print(json.dumps(report, indent=2), flush=True)


def _has_checkpoint(checkpoint: Any, workdir: str) -> bool:
    try:
        checkpoint.locate(workdir)
    except FileNotFoundError:
        return False
    return True


def _writable(workdir_lib: Any, workdir: str) -> bool:
    try:
        workdir_lib.check_writable(workdir)
    except workdir_lib.WorkdirError as e:
        logging.warning("%s: results are printed, not written", e)
        return False
    return True


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with `--help` exiting 0 and a bad override in one line."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(__doc__)
        print(flags.FLAGS.module_help(sys.modules[__name__]))
        print("Any config field: --config.<block>.<field>=VALUE (see the config file).")
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e} (see --help)", 2)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections raises these for an unknown or mistyped --config.a.b.
        detail = str(e.args[0]) if e.args else type(e).__name__
        guess = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', detail)
        if guess:
            detail = f"unknown field {guess.group(2)!r}; did you mean {guess.group(1)!r}?"
        detail = " ".join(detail.replace("\\n", " ").split())
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        _fail(f"bad config override ({', '.join(overrides)}): {detail}", 2)
    return []


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
