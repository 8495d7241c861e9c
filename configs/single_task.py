r"""One task alone, on any data source: `configs/single_task.py:TASK`.

    python -m unified_seq.main --config configs/single_task.py:object_detection \
        --workdir /tmp/det

TASK is object_detection, instance_segmentation, keypoint_detection or
captioning. Starts from the embedded synthetic setting
(configs/multitask_synthetic.py) with only that task, weight 1; switch to
COCO with `--config.data.source=coco_json --config.data.coco_dir=ROOT`.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import multitask_synthetic  # noqa: E402


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = multitask_synthetic.get_config()
    if arg not in config.tasks:
        raise ValueError(
            f"configs/single_task.py:TASK needs TASK in {list(config.tasks)}, got {arg!r}"
        )
    task = config.tasks[arg]
    task.weight = 1.0
    config.tasks = ml_collections.ConfigDict({arg: task})
    return config
