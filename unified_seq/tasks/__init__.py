"""The tasks: one file and one `Task` subclass each (task.py), and the table below.

`config.tasks` names the tasks of a run by the keys of `TASKS`; adding a task
is writing its file and adding its entry here.
"""

from __future__ import annotations

from typing import Any

from unified_seq.tasks.captioning import Captioning
from unified_seq.tasks.detection import ObjectDetection
from unified_seq.tasks.instance_segmentation import InstanceSegmentation
from unified_seq.tasks.keypoints import KeypointDetection
from unified_seq.tasks.task import RunSpec, Task

TASKS: dict[str, type[Task]] = {
    "object_detection": ObjectDetection,
    "instance_segmentation": InstanceSegmentation,
    "keypoint_detection": KeypointDetection,
    "captioning": Captioning,
}

# Prompt tokens are one of these (DESIGN §2: 10-29 are reserved for tasks).
PROMPT_RANGE = range(10, 30)


def build_tasks(config: Any) -> dict[str, Task]:
    """The task objects of `config.tasks`, in config order.

    Raises:
      ValueError: an unknown task name, a task's invalid setting, or two
        tasks with one prompt token.
    """
    run = RunSpec.from_config(config)
    tasks = {}
    for name in config.tasks:
        if name not in TASKS:
            raise ValueError(f"config.tasks.{name}: unknown task; tasks are {sorted(TASKS)}")
        tasks[name] = TASKS[name](name, config.tasks[name], run)
    owners: dict[int, str] = {}
    for name, task in tasks.items():
        token = task.prompt_token
        if token not in PROMPT_RANGE:
            raise ValueError(f"task {name}: prompt token {token} is outside {PROMPT_RANGE}")
        if token in owners:
            raise ValueError(f"tasks {owners[token]} and {name} share the prompt token {token}")
        owners[token] = name
    return tasks
