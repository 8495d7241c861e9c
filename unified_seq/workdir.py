"""The run's folder: one live run at a time, writable, its config kept as first written.

- `RunLock`: `WORKDIR/run.lock` names the host and process that trains in the
  folder. A second run is refused while the first lives: on the same host
  while its process exists, from another host while its heartbeat (rewritten
  every `HEARTBEAT_S`) is fresh. A lock left by a killed run is taken over
  with a warning, so `kill -9` and a rerun need nothing by hand.
- `check_writable`: a read-only or unreachable workdir fails before any work.
- `save_config`: `config.json` describes the run that made the checkpoints;
  a resumed run never overwrites it and reports how its own config differs.

Paths may be local or `gs://`; only process 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any

import tensorflow as tf
from absl import logging

from unified_seq.errors import WorkdirError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
# A lock from another host is stale after this long without a heartbeat.
STALE_S = 4 * HEARTBEAT_S


def check_writable(workdir: str) -> None:
    """Creates `workdir` and writes a probe file in it; WorkdirError if either fails."""
    probe = os.path.join(workdir, f".write_probe_{socket.gethostname()}_{os.getpid()}")
    try:
        tf.io.gfile.makedirs(workdir)
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("ok")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WorkdirError(
            f"cannot write to --workdir={workdir} ({first}); a run writes its checkpoints "
            "there: choose a writable folder (--mode eval only reads a finished run)"
        ) from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Holds `WORKDIR/run.lock` while a run trains; see the module docstring.

    Use as a context manager, or `acquire()` / `release()`.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        record = {
            "host": self.host,
            "pid": self.pid,
            "started": self.started,
            "heartbeat": time.time(),
        }
        with tf.io.gfile.GFile(self.path, "w") as f:
            f.write(json.dumps(record))

    def _holder(self) -> dict | None:
        """The record of the run holding the lock, or None when it is free or stale."""
        if not tf.io.gfile.exists(self.path):
            return None
        try:
            with tf.io.gfile.GFile(self.path) as f:
                record = json.loads(f.read())
        except (ValueError, tf.errors.OpError):
            return None  # half-written by a killed run
        if record.get("host") == self.host and record.get("pid") == self.pid:
            return None
        if record.get("host") == self.host:
            alive = _pid_alive(int(record.get("pid", -1)))
        else:
            alive = time.time() - float(record.get("heartbeat", 0)) < STALE_S
        if not alive:
            logging.warning(
                "Taking over %s, left by a run that is no longer alive (pid %s on %s)",
                self.path,
                record.get("pid"),
                record.get("host"),
            )
            return None
        return record

    def acquire(self) -> RunLock:
        holder = self._holder()
        if holder is not None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            raise WorkdirError(
                f"{os.path.dirname(self.path)} is in use by another run (pid {holder.get('pid')} "
                f"on {holder.get('host')}, since {since}); wait for it or stop it, or use "
                f"another --workdir (delete {self.path} only if that run is gone)"
            )
        self._write()
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except (OSError, tf.errors.OpError) as e:  # a lost heartbeat is not fatal
                logging.warning("Could not refresh %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            with contextlib.suppress(OSError, tf.errors.OpError):
                tf.io.gfile.remove(self.path)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(stored: dict, current: dict) -> list[str]:
    """`field: stored → current` for every leaf that differs (added or removed included)."""
    old, new = _flat(stored), _flat(current)
    missing = object()

    def shown(value: Any) -> str:
        return "(absent)" if value is missing else repr(value)

    return [
        f"{key}: {shown(old.get(key, missing))} → {shown(new.get(key, missing))}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, missing) != new.get(key, missing)
    ]


def read_config(workdir: str) -> dict | None:
    """The stored `config.json` as a dict, or None."""
    path = os.path.join(workdir, "config.json")
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.loads(f.read())


def save_config(workdir: str, config: Any, resuming: bool) -> list[str]:
    """Writes `config.json` unless a checkpointed run already has one.

    Returns the fields in which `config` differs from the stored one
    (empty when it was written now).
    """
    text = config.to_json_best_effort(indent=2)
    stored = read_config(workdir) if resuming else None
    if stored is None:
        with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
            f.write(text)
        return []
    return config_changes(stored, json.loads(text))
