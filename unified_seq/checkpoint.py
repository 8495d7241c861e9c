"""Checkpoints: the train state through orbax, the input position through tf.data.

A run resumes exactly where it stopped: the orbax CheckpointManager keeps the
parameters, optimizer state and step; next to each step, every process saves
the state of its tf.data iterators (shuffle buffers and all), so the batches
after a resume are the ones an unbroken run would have drawn.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
import tensorflow as tf


class Checkpointer:
    """Saves every `every` steps, keeps the last `keep`, restores the latest.

    Args:
      directory: `WORKDIR/checkpoints`.
      every: save interval in steps.
      keep: number of checkpoints kept.
    """

    def __init__(self, directory: str, *, every: int, keep: int):
        self.directory = os.path.abspath(directory)
        self.every = int(every)
        self.manager = ocp.CheckpointManager(
            os.path.join(self.directory, "state"),
            options=ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _input_path(self, step: int) -> str:
        return os.path.join(self.directory, "input", str(step), f"process_{jax.process_index()}")

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
        if jax.process_index() != 0 or not os.path.isdir(root):
            return
        kept = {str(s) for s in self.manager.all_steps()}
        for name in os.listdir(root):
            if name.isdigit() and name not in kept and int(name) < max(map(int, kept or {"0"})):
                tf.io.gfile.rmtree(os.path.join(root, name))

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores the state at `step` into the shapes and shardings of `abstract_state`."""
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_inputs(self, step: int, iterators: dict[str, Any]) -> bool:
        """Restores iterator positions saved at `step`; False when none were saved."""
        path = self._input_path(step)
        if not tf.io.gfile.exists(path + ".index"):
            return False
        tf.train.Checkpoint(**iterators).read(path).assert_consumed()
        return True

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
