"""Checkpoints: the train state through orbax, the input position through tf.data.

A run resumes exactly where it stopped: the orbax CheckpointManager keeps the
parameters, optimizer state and step (every process writes its own shards);
next to each step, every process saves the position of its tf.data iterators
(`input/<step>/process_<i>_of_<n>`), so the batches after a resume are the
ones an unbroken run would have drawn.

The state restores onto any mesh or device count: orbax reads each array into
the shardings of the run that restores. The input position belongs to one
process count; a run with another count restarts the input order (warned).
Paths may be local or `gs://`; they are never made absolute or local.

Faults. A state is saved only when it is finite (train.py checks first),
and a save that fails stops the run with one message naming the step and
the last complete checkpoint (`CheckpointError`). `restore_latest` checks a
checkpoint's parameter shapes against the run's (a config that changes them
is a `ConfigError` naming the fields), then falls back, with a warning, from
a latest step that cannot be read or holds non-finite values to the one
before; the unreadable step is moved aside to `checkpoints/unreadable/`.
orbax commits a step only once all of it is written, so a run killed during
a save resumes from the step before.

Prediction, export and fine-tuning read only the parameters of a saved
state (`locate`, `params_shapes`, `restore_params`), never its optimizer
state.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging

from unified_seq.errors import CheckpointError, ConfigError, NonFiniteError

STATE_ITEM = "default"  # the folder orbax's CheckpointManager gives its one item


class _ItemMetadataNotice(std_logging.Filter):
    """Drops orbax's warning that a step's own metadata file is absent when one
    item's metadata is read (`params_shapes`): the item's is there, and the
    warning would be the only line a user sees before every prediction."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return "Metadata file does not exist" not in record.getMessage()


logging.get_absl_logger().addFilter(_ItemMetadataNotice())


class Checkpointer:
    """Saves every `every` steps, keeps the last `keep`, restores the latest.

    Args:
      directory: `WORKDIR/checkpoints`.
      every: save interval in steps.
      keep: number of checkpoints kept.
    """

    def __init__(self, directory: str, *, every: int, keep: int):
        self.directory = directory
        self.every = int(every)
        self._pending: int | None = None  # the step of the save in flight
        self.manager = ocp.CheckpointManager(
            os.path.join(self.directory, "state"),
            options=ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _input_path(self, step: int) -> str:
        name = f"process_{jax.process_index()}_of_{jax.process_count()}"
        return os.path.join(self.directory, "input", str(step), name)

    def should_save(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: Any, iterators: dict[str, Any] | None = None) -> None:
        """Saves the state (asynchronously) and the input iterators (now).

        Raises:
          CheckpointError: this save, or the one before (asynchronous), failed.
        """
        self.check()
        try:
            if iterators:
                tf.train.Checkpoint(**iterators).write(self._input_path(step))
            self.manager.save(step, args=ocp.args.StandardSave(state))
        except (OSError, tf.errors.OpError, ValueError, RuntimeError) as e:
            raise self._save_error(step, e) from e
        self._pending = step
        self._drop_stale_inputs()

    def _save_error(self, step: int, error: BaseException) -> CheckpointError:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        committed = [s for s in self.manager.all_steps() if s != step]
        last = f"step {max(committed)}" if committed else "none yet"
        return CheckpointError(
            f"saving the checkpoint of step {step} in {self.directory} failed "
            f"({type(error).__name__}: {first[:300]}); the last complete checkpoint is {last}. "
            "Free disk space or fix the path's permissions, then run the same command to "
            "resume from it"
        )

    def check(self) -> None:
        """Raises CheckpointError if an asynchronous save has failed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # orbax re-raises whatever the writer thread hit
            raise self._save_error(self._pending or -1, e) from e

    def _drop_stale_inputs(self) -> None:
        root = os.path.join(self.directory, "input")
        if jax.process_index() != 0 or not tf.io.gfile.isdir(root):
            return
        kept = {str(s) for s in self.manager.all_steps()}
        for name in tf.io.gfile.listdir(root):
            name = name.rstrip("/")  # gs:// listings end folders with a slash
            if name.isdigit() and name not in kept and int(name) < max(map(int, kept or {"0"})):
                tf.io.gfile.rmtree(os.path.join(root, name))

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores the state at `step` into the shapes and shardings of `abstract_state`."""
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_latest(
        self, abstract_state: Any, describe_changes: Any = None
    ) -> tuple[Any, int | None]:
        """The newest checkpoint that reads whole and finite, and its step (None: none saved).

        Args:
          abstract_state: a state (or ShapeDtypeStruct tree) with `params`, in
            the shapes and shardings to restore into.
          describe_changes: callable giving the config fields changed since the
            checkpoints were written (for the error when shapes differ).

        Raises:
          ConfigError: the saved parameters have other shapes than this run's.
          CheckpointError: checkpoints exist but none can be restored.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None, None
        if saved_keys(self._item(steps[0])) == ["params"]:
            workdir = os.path.dirname(self.directory)
            raise ConfigError(
                f"{workdir} holds parameters only (step {steps[0]}, e.g. written by "
                "unified_seq.import_official): there is no optimizer state to resume. To train "
                f"from them, use a new --workdir with --config.init_from={workdir}"
            )
        check_shapes(self._item(steps[0]), abstract_state.params, steps[0], describe_changes)
        failures = []
        for step in steps:
            try:
                state = self.restore(step, abstract_state)
            except Exception as e:  # orbax/TensorStore raise many kinds on a broken file
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                failures.append(f"step {step}: {first[:200]}")
                logging.warning("Checkpoint step %d cannot be read (%s)", step, first[:200])
                self._set_aside(step)
                continue
            bad = non_finite_leaves(state.params)
            if bad:
                failures.append(f"step {step}: non-finite values in {bad[0]}")
                logging.warning("Checkpoint step %d holds non-finite values (%s)", step, bad[0])
                continue
            if failures:
                logging.warning(
                    "Resuming from step %d instead of the latest (%s)", step, "; ".join(failures)
                )
            return state, step
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be restored ({'; '.join(failures)}); "
            "start a new run in another --workdir, or delete the checkpoints folder"
        )

    def _item(self, step: int) -> str:
        return os.path.join(self.directory, "state", str(step), STATE_ITEM)

    def _set_aside(self, step: int) -> None:
        """Moves an unreadable step out of orbax's way (a rerun of that step must save it)."""
        if jax.process_index() == 0:
            source = os.path.join(self.directory, "state", str(step))
            target = os.path.join(self.directory, "unreadable", f"{step}_{int(time.time())}")
            try:
                if "://" in source:  # object stores cannot rename folders
                    tf.io.gfile.rmtree(source)
                else:
                    tf.io.gfile.makedirs(os.path.dirname(target))
                    tf.io.gfile.rename(source, target)
                logging.warning("Moved unreadable checkpoint step %d to %s", step, target)
            except (OSError, tf.errors.OpError) as e:
                logging.warning("Could not move unreadable checkpoint step %d: %s", step, e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()

    def restore_inputs(self, step: int, iterators: dict[str, Any]) -> bool:
        """Restores iterator positions saved at `step`.

        Returns False, with a warning, when none were saved for this process
        count (the input order then restarts from the beginning).
        """
        path = self._input_path(step)
        if tf.io.gfile.exists(path + ".index"):
            tf.train.Checkpoint(**iterators).read(path).assert_consumed()
            return True
        saved = tf.io.gfile.glob(os.path.join(self.directory, "input", str(step), "*.index"))
        counts = {m.group(1) for f in saved if (m := re.search(r"_of_(\d+)\.index$", f))}
        if counts:
            reason = (
                f"it was saved by {'/'.join(sorted(counts))} processes and this run has "
                f"{jax.process_count()}"
            )
        else:
            reason = "none was saved"
        logging.warning(
            "Input position at step %d not restored (%s): the input order restarts; the model "
            "state is restored as saved",
            step,
            reason,
        )
        return False

    def wait(self) -> None:
        """Waits for the save in flight; CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(self._pending or -1, e) from e
        self.check()

    def close(self) -> None:
        self.manager.close()


def _steps(folder: str) -> list[int]:
    if not tf.io.gfile.isdir(folder):
        return []
    names = (n.rstrip("/") for n in tf.io.gfile.listdir(folder))
    return sorted(
        int(n)
        for n in names
        if n.isdigit() and tf.io.gfile.exists(os.path.join(folder, n, STATE_ITEM))
    )


def locate(path: str, step: int | None = None) -> tuple[str, int]:
    """The saved state at `path`: its orbax item folder and its step.

    Args:
      path: a run's workdir, its `checkpoints/` or `checkpoints/state/`
        folder, or one step's folder (`.../state/4600`); local or gs://.
      step: which step; None: the step folder given, else the latest.

    Raises:
      FileNotFoundError: nothing saved there, or not that step (the message
        lists the steps that are).
    """
    path = path.rstrip("/")
    tail = os.path.basename(path)
    if tail.isdigit() and tf.io.gfile.exists(os.path.join(path, STATE_ITEM)):
        if step is not None and step != int(tail):
            raise FileNotFoundError(f"{path} is step {tail}, not the step {step} asked for")
        return os.path.join(path, STATE_ITEM), int(tail)
    for folder in (os.path.join(path, "checkpoints", "state"), os.path.join(path, "state"), path):
        steps = _steps(folder)
        if not steps:
            continue
        chosen = steps[-1] if step is None else int(step)
        if chosen not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {folder}; saved: {steps}")
        return os.path.join(folder, str(chosen), STATE_ITEM), chosen
    raise FileNotFoundError(
        f"no checkpoint under {path}: expected a run's workdir (with checkpoints/state/<step>/), "
        "its checkpoints folder, or one step's folder"
    )


def saved_keys(item: str) -> list[str]:
    """Top-level keys of the state saved in `item` (["params"]: imported); [] if unreadable."""
    try:
        return sorted(ocp.PyTreeCheckpointer().metadata(item).item_metadata.tree)
    except Exception:  # noqa: BLE001 unreadable metadata: restore_latest falls back
        return []


def params_shapes(item: str) -> Any:
    """Shapes and dtypes (jax.ShapeDtypeStruct) of the parameters saved in `item`."""
    tree = ocp.PyTreeCheckpointer().metadata(item).item_metadata.tree
    if "params" not in tree:
        raise ValueError(
            f"{item} holds no `params` (keys: {sorted(tree)}): not a unified_seq state"
        )
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree["params"])


def restore_params(item: str, abstract_params: Any) -> Any:
    """Reads only the parameters of a saved state (no optimizer state, no step).

    Args:
      item: an item folder from `locate`.
      abstract_params: jax.ShapeDtypeStruct tree with the shardings to
        restore into (their shapes must be the saved ones).
    """
    target = {"params": abstract_params}
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), target
    )
    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    return ocp.PyTreeCheckpointer().restore(item, args=args)["params"]


def non_finite_leaves(tree: Any, limit: int = 3) -> list[str]:
    """Paths of (up to `limit`) arrays of `tree` holding NaN or inf."""
    finite = jax.jit(lambda t: jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), t))(tree)
    flags = jax.device_get(finite)
    bad = [
        jax.tree_util.keystr(path)
        for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0]
        if not bool(ok)
    ]
    return bad[:limit]


def check_finite_params(params: Any, step: int, where: str) -> None:
    """NonFiniteError naming the step if any parameter is NaN or inf (evaluation, prediction)."""
    bad = non_finite_leaves(params)
    if bad:
        raise NonFiniteError(
            f"the checkpoint of step {step} in {where} holds non-finite parameters (e.g. "
            f"{bad[0]}): the run diverged before it was saved; use an earlier step"
        )


def check_shapes(item: str, params: Any, step: int, describe_changes: Any = None) -> None:
    """ConfigError when the parameters saved in `item` have other shapes than `params`."""
    try:
        saved = params_shapes(item)
    except Exception:  # noqa: BLE001 unreadable metadata: restore_latest falls back
        return
    flat_saved = {jax.tree_util.keystr(p): v.shape for p, v in _flatten(saved)}
    flat_now = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in _flatten(params)}
    differ = [
        f"{k}: saved {flat_saved.get(k, 'absent')}, now {flat_now.get(k, 'absent')}"
        for k in sorted(flat_saved.keys() | flat_now.keys())
        if flat_saved.get(k) != flat_now.get(k)
    ]
    if not differ:
        return
    changes = list(describe_changes() if describe_changes else [])
    fields = "; ".join(changes[:8]) if changes else "no stored config.json to compare with"
    raise ConfigError(
        f"the checkpoint of step {step} in {os.path.dirname(os.path.dirname(item))} was saved "
        f"with other parameter shapes ({len(differ)} arrays differ, e.g. {differ[0]}). Config "
        f"fields changed since it was written: {fields}. Resume with the stored config.json, "
        "or train in a new --workdir (config.init_from can start from it)"
    )


def _flatten(tree: Any) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]
