"""Test order for two workers, and one compilation cache for the whole session.

With `--dist loadfile --no-loadscope-reorder` (pyproject.toml) each worker
takes whole files in collection order; a long file collected last would run
alone at the end while the other worker idles: the longest files start first.

Most tests' time is XLA compiling, and many compile the same programs again:
a resumed run, an unbroken run beside a broken one, each `train.train` call's
fresh jit. JAX's persistent cache, in a folder made for this session and
shared through the environment with both workers and every subprocess the
tests start, turns the repeats into loads (a third of test_faults.py's time).
"""

import atexit
import os
import shutil
import sys
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="unified_seq-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# Every program, however small or quick to compile.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if "jax" in sys.modules:  # imported before this file (a plugin): it read its flags already
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Files that take minutes: several processes or whole runs each.
LONGEST_FIRST = (
    "test_multiprocess.py",
    "test_memory_switches.py",
    "test_launch.py",
    "test_kill_resume.py",
    "test_checkpoint.py",
    "test_predict.py",
    "test_faults.py",
    "test_init_from.py",
    "test_toy_task.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
