r"""Pix2Seq v2 multi-task on COCO 2017: the paper's settings (DESIGN §4–§6).

    python -m unified_seq.main --config configs/multitask_coco.py \
        --config.data.coco_dir=/data/coco --workdir gs://bucket/run

`--config configs/multitask_coco.py:1024` gives the 1024×1024 variant.
ViT-B, batch 128 per task, AdamW lr 1e-4 (wd 0.05, β2 0.95), 10 warm-up
epochs then linear decay to 1%, 100 epochs, task weights det 0.1782,
seg 0.7128, captioning 0.099, keypoints 0.01, official token layout
(1000 bins, 32k caption pieces; set data.tokenizer_path to the official
c4_en_32k_spm.model to line up with its checkpoints).
Paper (COCO val, from an Objects365 checkpoint; this config trains from
scratch): 640: det AP 44.2, BLEU-4 34.3; 1024: det 46.5, segm 38.2, kp 64.8.
"""

import ml_collections

from unified_seq import defaults
from unified_seq.models import sizes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    image_size = int(arg) if arg else 640
    config = ml_collections.ConfigDict()
    config.seed = 0
    # A run's workdir or checkpoint to take the first parameters from (fine-tuning).
    config.init_from = ""
    config.vocab = defaults.vocab_config()
    config.data = defaults.data_config()
    config.data.source = "coco_json"
    config.data.image_size = image_size
    config.data.shuffle_buffer = 10 * 128
    config.tasks = defaults.task_configs()
    # The official decoder: every object slot, fake-class slots kept and
    # scored by their best real class.
    config.tasks.object_detection.decode_all_objects = True
    config.tasks.object_detection.drop_fake = False
    # Project only the weighted positions onto the vocabulary (the same loss,
    # loss.py). Weighted shares at these shapes: detection ~26% on COCO (100
    # class tokens and 4 coordinates per real object, 7.3 objects per image
    # on average), segmentation ~12% and captioning ~8% (padding after EOS),
    # keypoints 85% (left at 1). A device whose rows hold more falls back to
    # every position for that step.
    for name, fraction in (
        ("object_detection", 0.45),
        ("instance_segmentation", 0.35),
        ("captioning", 0.25),
    ):
        config.tasks[name].projected_fraction = fraction
    if image_size >= 1024:
        # Cropping to the prompted object helped at 640 but not at 1024 (paper).
        config.tasks.instance_segmentation.crop_to_box = False
    else:
        config.tasks.instance_segmentation.crop_to_box = True
    # bfloat16 compute on accelerators (float32 on CPU), float32 parameters and
    # optimizer state; every encoder block and decoder layer recomputed in the
    # backward pass, which keeps only block inputs (docs/memory_plan.md).
    config.model = sizes.model_config("vit-b", dtype="auto", remat="full")
    config.optim = defaults.optim_config()
    config.train = defaults.train_config()
    config.eval = defaults.eval_config()
    config.eval.batch_size = 8
    config.eval.prompt_boxes = "detections"
    config.mesh = defaults.mesh_config()
    # Shard every parameter and optimizer array over the fsdp axis when it is >1.
    config.sharding_rules = ".*=fsdp"
    return config
