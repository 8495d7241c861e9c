"""Test order for two workers: the longest files start first.

With `--dist loadfile` (pyproject.toml) each worker takes whole files in
collection order; a long file collected last would run alone at the end
while the other worker idles.
"""

import os

# Files that take minutes: several processes or whole runs each.
LONGEST_FIRST = (
    "test_multiprocess.py",
    "test_kill_resume.py",
    "test_faults.py",
    "test_launch.py",
    "test_predict.py",
    "test_memory_switches.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
