"""Config files and `--set field=value` overrides, shared by the benchmarks."""

from __future__ import annotations

import ast
import importlib.util
from typing import Any


def load_config(spec: str) -> Any:
    """`path/to/config.py[:arg]` → its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def override(config: Any, assignment: str) -> None:
    """Applies `a.b.c=value` (a Python literal, else a string) to `config`."""
    path, _, text = assignment.partition("=")
    *parents, leaf = path.split(".")
    node = config
    for name in parents:
        node = node[name]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    node[leaf] = value
