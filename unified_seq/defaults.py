"""Default config blocks shared by the files in configs/.

Each function returns a fresh ConfigDict holding the official Pix2Seq v2
settings (DESIGN §2–§4); config files start from them and override what their
setting needs. Task blocks are keyed by task name in `config.tasks`.
"""

from __future__ import annotations

import ml_collections

# Batch-mixing loss weights found greedily in the paper (DESIGN §4).
TASK_WEIGHTS = {
    "object_detection": 0.1782,
    "instance_segmentation": 0.7128,
    "captioning": 0.099,
    "keypoint_detection": 0.01,
}


def vocab_config() -> ml_collections.ConfigDict:
    """Official token layout: 1000 bins at 1000, text at 3000, 32k pieces."""
    return ml_collections.ConfigDict(
        {"coord_shift": 1000, "bins": 1000, "text_shift": 3000, "text_vocab_size": 32000}
    )


def data_config() -> ml_collections.ConfigDict:
    """Where examples come from and how the input pipeline treats them."""
    return ml_collections.ConfigDict(
        {
            "source": "synthetic",  # synthetic | coco_json | tfds
            "coco_dir": "",  # root of the COCO 2017 layout (coco_json)
            "tfds_data_dir": "",  # tensorflow-datasets data_dir (tfds)
            "train_split": "train",
            "eval_split": "val",
            "image_size": 640,  # side of the square model input
            "pad_value": 0.3,
            "num_keypoints": 17,
            # "fail" raises DataError naming the file; "skip" drops and counts.
            "on_bad_image": "fail",
            # Images whose header declares more pixels are bad images, refused
            # before decoding (a few-byte file can declare gigabytes). 0 = no limit.
            "max_image_pixels": 50_000_000,
            # coco_json: decode every image once before use, so that every bad
            # image is named at once (fail) and JSON sizes are checked; off for
            # huge remote sets, bad images then fail in the pipeline. The skip
            # policy always runs the pass: it finds what to skip.
            "check_images": True,
            # Annotation files larger than this are refused unread. 0 = no limit.
            "max_annotation_bytes": 4 << 30,
            "tokenizer_path": "",  # SentencePiece model; trained when empty
            "shuffle_buffer": 1024,
            # Each process loads only its share of the training annotations
            # (less memory and start-up on huge sets); its order then depends on
            # the process count. Off: every process reads all annotations and the
            # global batches are the same for any number of processes.
            "shard_annotations": False,
            "num_parallel_calls": -1,  # tf.data.AUTOTUNE
            "prefetch": 2,
            "synthetic": {
                "dir": "",  # where to write the generated set; cache dir when empty
                "seed": 0,
                "num_train": 2000,
                "num_val": 200,
                "image_size": 128,
                # Images of a third split, `tune` (own random stream, ids after
                # val's): choose recipes with data.eval_split=tune, report on val.
                "num_tune": 0,
                # plain: the quick default world. varied: 160-400 px images of
                # any aspect, 0-10 overlapping objects of 8 px to half the image,
                # posed figures without joint dots, textured backgrounds, crowd
                # regions (synthetic.VariedWorld), so a recipe tuned on it has to
                # cope with what real scenes bring.
                "variety": "plain",
            },
        }
    )


def task_configs() -> ml_collections.ConfigDict:
    """Per-task codec, augmentation and sampling settings (official values)."""
    common = {
        "scale_jitter": (0.3, 2.0),
        "flip": True,
        "temperature": 1.0,
        "top_k": 0,
        "batch_size": 0,  # global batch in batch mixing; 0 = train.batch_size
        # Share of each device's sequence positions projected onto the
        # vocabulary in training: those with loss weight > 0 go first, and a
        # step with more falls back to all (the same loss; loss.py). Set it
        # just above the task's usual weighted share; 1 projects every
        # position, as the official code does.
        "projected_fraction": 1.0,
        # Sample answers under the task's grammar (only tokens it can read back).
        "constrained": True,
    }
    return ml_collections.ConfigDict(
        {
            "object_detection": {
                **common,
                "weight": TASK_WEIGHTS["object_detection"],
                "max_instances": 100,
                "eos_weight": 0.1,
                "noise_objects": True,
                # random (paper) | raster: sorted by ymin, then xmin.
                "object_order": "random",
                # rand_n_fake_cls: input class tokens become a random class or
                # the fake class, 50/50; "none" keeps them.
                "class_corruption": "rand_n_fake_cls",
                "top_p": 0.4,
                "drop_fake": True,
                # Sample all max_instances object slots (official: full length),
                # each position confined to its kind of token.
                "decode_all_objects": False,
                "min_score": 0.0,  # detections scored lower are not written
            },
            "instance_segmentation": {
                **common,
                "scale_jitter": (0.3, 1.0),
                "weight": TASK_WEIGHTS["instance_segmentation"],
                "max_points": 128,
                "eos_weight": 1.0,
                "crop_to_box": False,
                "crop_scale": 2.0,  # crop side = crop_scale x box side
                # Instances trained per image visit (official 10); without a
                # crop they share one image encoding. 0 = all (crop only).
                "instances_per_image": 10,
                # Prompts from detections (eval.prompt_boxes=detections): the
                # top N of an image by score (official 10; 0 = all).
                "detections_per_image": 10,
                "num_samples": 8,
                "mask_threshold": 0.5,
                "top_p": 0.8,
            },
            "keypoint_detection": {
                **common,
                "scale_jitter": (0.3, 1.0),
                "weight": TASK_WEIGHTS["keypoint_detection"],
                "person_class": 1,
                "invisible_weight": 0.1,
                "eos_weight": 0.0,
                "crop_to_box": True,
                "crop_scale": 2.0,
                # Every person of an image visit is its own example (official).
                "instances_per_image": 0,
                "detections_per_image": 10,
                # Official: random share of answer input tokens → INVISIBLE.
                "input_mask_rate": True,
                # A person's score: w x (mean probability of its answer tokens)
                # + (1 - w) x (its prompt's detection score; 1 for ground truth).
                "points_score_weight": 1.0,
                "top_p": 0.1,
            },
            "captioning": {
                **common,
                "weight": TASK_WEIGHTS["captioning"],
                "max_len": 128,
                "eos_weight": 0.1,
                "captions_per_image": 5,
                "input_drop_rate": 0.5,
                "color_jitter": 0.5,
                "top_p": 1.0,
            },
        }
    )


def optim_config() -> ml_collections.ConfigDict:
    """AdamW with warm-up and linear decay (official: lr 1e-4, wd 0.05, β2 0.95)."""
    return ml_collections.ConfigDict(
        {
            "learning_rate": 1e-4,
            "warmup_steps": 9241,  # 10 COCO epochs at batch 128
            "end_factor": 0.01,
            "weight_decay": 0.05,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "grad_clip_norm": 0.0,  # 0 = no clipping (official)
            "label_smoothing": 0.0,
        }
    )


def train_config() -> ml_collections.ConfigDict:
    """Steps, batch, mixing and checkpointing of a run."""
    return ml_collections.ConfigDict(
        {
            "steps": 92412,  # 100 COCO epochs at batch 128
            "batch_size": 128,  # per task, global
            # batch: one batch per task each step, loss Σ λ_t L_t (paper's choice);
            # data: one batch holding every task's examples in fixed proportions.
            "mixing": "batch",
            "log_every": 50,
            "eval_every": 0,  # evaluate during training every N steps (0 = only at the end)
            "checkpoint_every": 1000,
            "keep_checkpoints": 3,
            # Split every task's batch into this many micro-batches and add up
            # their gradients (one update, less activation memory); it must
            # divide every task's batch per device.
            "microbatches": 1,
            # `--mode plan`: steps to time after compiling (0 = compile only).
            "plan_steps": 2,
        }
    )


def eval_config() -> ml_collections.ConfigDict:
    """Evaluation after training (and in `--mode eval`)."""
    return ml_collections.ConfigDict(
        {
            "batch_size": 32,
            "max_examples": 0,  # images per task; 0 = all
            # Segmentation and keypoint prompts: ground-truth boxes or the
            # model's own detections.
            "prompt_boxes": "gt",
        }
    )


def mesh_config() -> str:
    """Data parallel over every device; raise `fsdp` to shard parameters.

    A string, so that `--config.mesh=data:-1,fsdp:8` works on the command line.
    """
    return "data:-1,fsdp:1"
