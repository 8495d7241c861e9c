"""Every config file loads, names the contract fields, and passes validation."""

import glob
import importlib.util
import os

import pytest

from unified_seq import train
from unified_seq.models import sizes

ROOT = os.path.dirname(os.path.dirname(__file__))
CONTRACT = ("data.source", "data.coco_dir", "train.steps", "train.batch_size",
            "model.variant", "eval.max_examples")  # fmt: skip


def _load(spec: str):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


SPECS = [
    "configs/multitask_synthetic.py",
    "configs/multitask_synthetic_varied.py",
    "configs/multitask_coco.py",
    "configs/multitask_coco.py:1024",
    *[f"configs/single_task.py:{t}" for t in
      ("object_detection", "instance_segmentation", "keypoint_detection", "captioning")],
]  # fmt: skip


def test_every_config_file_is_covered():
    files = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    assert files == {s.partition(":")[0] for s in SPECS}


@pytest.mark.parametrize("spec", SPECS)
def test_config_has_contract_fields_and_validates(spec):
    config = _load(spec)
    for name in CONTRACT:
        node = config
        for part in name.split("."):
            assert part in node, f"{spec} lacks {name}"
            node = node[part]
    train.validate(config)
    sizes.resolve(config.model)
    assert train.sequence_lengths(config)


def test_paper_config_matches_design():
    config = _load("configs/multitask_coco.py")
    assert config.model.variant == "vit-b" and config.data.image_size == 640
    assert config.model.stem == "patch"  # the official ViT patch projection
    assert config.model.coord_embed_init == "normal"  # the official embedding init
    weights = {t: config.tasks[t].weight for t in config.tasks}
    assert weights == {"object_detection": 0.1782, "instance_segmentation": 0.7128,
                       "captioning": 0.099, "keypoint_detection": 0.01}  # fmt: skip
    assert abs(sum(weights.values()) - 1.0) < 1e-9
    assert (config.vocab.coord_shift, config.vocab.bins, config.vocab.text_shift) == (
        1000,
        1000,
        3000,
    )
    assert _load("configs/multitask_coco.py:1024").data.image_size == 1024
    # Paper fidelity (official code): 10 segmentation instances per image
    # visit, every person its own keypoint example, the top 10 detections of
    # an image as prompts, detection decoded over all slots with fake-class
    # slots kept and scored by their best real class.
    tasks = config.tasks
    assert tasks.instance_segmentation.instances_per_image == 10
    assert tasks.keypoint_detection.instances_per_image == 0
    assert tasks.instance_segmentation.detections_per_image == 10
    assert tasks.keypoint_detection.detections_per_image == 10
    assert config.eval.prompt_boxes == "detections"
    det = tasks.object_detection
    assert det.decode_all_objects and not det.drop_fake


@pytest.mark.parametrize("task", ["instance_segmentation", "keypoint_detection", "captioning"])
def test_tfds_source_refuses_tasks_it_cannot_train(task):
    config = _load("configs/multitask_synthetic.py")
    config.data.source = "tfds"
    with pytest.raises(ValueError, match=f"config.tasks.{task} needs"):
        train.validate(config)
    config = _load(f"configs/single_task.py:{task}")
    config.data.source = "tfds"
    with pytest.raises(ValueError, match=f"config.tasks.{task} needs"):
        train.validate(config)
    config = _load("configs/single_task.py:object_detection")
    config.data.source = "tfds"
    train.validate(config)  # boxes are what tfds coco/2017 holds


def test_detection_prompts_need_a_task_that_gives_boxes():
    config = _load("configs/single_task.py:instance_segmentation")
    config.eval.prompt_boxes = "detections"
    with pytest.raises(ValueError, match="no configured task gives boxes"):
        train.validate(config)
    config.eval.prompt_boxes = "boxes"
    with pytest.raises(ValueError, match="prompt_boxes"):
        train.validate(config)


def test_unknown_task_and_data_mixing_of_several_rows_fail_naming_the_field():
    config = _load("configs/multitask_synthetic.py")
    config.tasks.captioning.captions_per_image = 1
    config.train.mixing = "data"
    config.tasks.object_detection.batch_size = 0
    config.tasks.instance_segmentation.update(crop_to_box=False, instances_per_image=3)
    with pytest.raises(ValueError, match="config.tasks.instance_segmentation gives 3"):
        train.validate(config)
    config = _load("configs/multitask_synthetic.py")
    config.tasks.keypoints = config.tasks.keypoint_detection
    with pytest.raises(ValueError, match="config.tasks.keypoints: unknown task"):
        train.validate(config)


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_a_projected_fraction_outside_zero_to_one_fails_naming_the_field(fraction):
    config = _load("configs/multitask_synthetic.py")
    config.tasks.captioning.projected_fraction = fraction
    with pytest.raises(ValueError, match=r"config.tasks.captioning.projected_fraction=.*\(0, 1\]"):
        train.validate(config)
