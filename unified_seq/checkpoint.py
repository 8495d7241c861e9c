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

Prediction, export and fine-tuning read only the parameters of a saved
state (`locate`, `params_shapes`, `restore_params`), never its optimizer
state.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging

STATE_ITEM = "default"  # the folder orbax's CheckpointManager gives its one item


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
        """Saves the state (asynchronously) and the input iterators (now)."""
        if iterators:
            tf.train.Checkpoint(**iterators).write(self._input_path(step))
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self._drop_stale_inputs()

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
        self.manager.wait_until_finished()

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
