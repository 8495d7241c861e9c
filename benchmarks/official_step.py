r"""The official TF2 Pix2Seq train step, timed on command (the other half of side_by_side.py).

    TF_PYTHON benchmarks/official_step.py --pix2seq DIR --sizes '{"image": 224, ...}'

Runs under a Python that has the official code's dependencies (tensorflow
2.15 + tensorflow-addons 0.23 on Python 3.11), not the project's, so it
imports nothing from unified_seq. DIR is a checkout of
github.com/google-research/pix2seq; its `ar_model.Model`, `get_loss("xent")`
and AdamW (`build_optimizer`) make one step under `tf.function`, on random
images and tokens with every token weight 1 (what its trainer does with
real batches: it projects and scores every position).

Protocol (stdout, one JSON object per line): after compiling, it prints
`{"ready": true, "parameters": N}`; each stdin line `go N` answers
`{"times": [seconds of each of N steps]}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def build_step(pix2seq: str, s: dict):
    """(a jitted step of the official model on fixed inputs, its parameter count)."""
    sys.path.insert(0, pix2seq)
    import ml_collections
    import numpy as np
    import tensorflow as tf
    from models import ar_model, model_utils

    cfg = ml_collections.ConfigDict
    model_cfg = cfg(
        {
            "image_size": (s["image"], s["image"]),
            "max_seq_len": s["seq"],
            "vocab_size": s["vocab"],
            "coord_vocab_shift": 1000,
            "text_vocab_shift": 3000,
            "use_cls_token": False,
            "shared_decoder_embedding": True,
            "decoder_output_bias": True,
            "patch_size": s["patch"],
            "drop_path": 0.0,
            "drop_units": 0.0,
            "drop_att": 0.0,
            "dec_proj_mode": "mlp",
            "pos_encoding": "sin_cos",
            "pos_encoding_dec": "learned",
            "resnet_variant": "c1",
            "num_encoder_layers": s["depth"],
            "dim_att": s["width"],
            "dim_mlp": s["mlp"],
            "num_heads": s["heads"],
            "num_decoder_layers": s["depth"],
            "dim_att_dec": s["width"],
            "dim_mlp_dec": s["mlp"],
            "num_heads_dec": s["heads"],
            "resnet_depth": 50,
            "resnet_width_multiplier": 1,
            "resnet_sk_ratio": 0.0,
        }
    )
    optim_cfg = cfg(
        {
            "optimizer": "adamw",
            "weight_decay": 0.05,
            "global_clipnorm": -1,
            "beta1": 0.9,
            "beta2": 0.95,
            "eps": 1e-8,
        }
    )
    model = ar_model.Model(cfg({"model": model_cfg, "optimization": optim_cfg}))
    optimizer = model_utils.build_optimizer(optim_cfg, 1e-4)
    r = np.random.default_rng(0)
    b, t, v = s["batch"], s["seq"], s["vocab"]
    image = tf.constant(r.random((b, s["image"], s["image"], 3), np.float32))
    tokens = tf.constant(r.integers(0, v, (b, t)), tf.int32)
    targets = tf.roll(tokens, -1, axis=1)
    weights = tf.ones((b, t), tf.float32)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = model(image, tokens, training=True)
            losses = model_utils.get_loss(logits, targets, "xent")
            loss = tf.reduce_sum(losses * weights) / (tf.reduce_sum(weights) + 1e-9)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    step().numpy()  # traces and builds the optimizer's slots
    parameters = int(sum(np.prod(x.shape) for x in model.trainable_variables))
    return lambda: step().numpy(), parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pix2seq", required=True, help="checkout of google-research/pix2seq")
    parser.add_argument("--sizes", required=True, help="JSON: image, patch, depth, ..., vocab")
    args = parser.parse_args()
    step, parameters = build_step(args.pix2seq, json.loads(args.sizes))
    print(json.dumps({"ready": True, "parameters": parameters}), flush=True)
    for line in sys.stdin:
        count = int(line.split()[1])
        times = []
        for _ in range(count):
            tic = time.perf_counter()
            step()
            times.append(time.perf_counter() - tic)
        print(json.dumps({"times": times}), flush=True)


if __name__ == "__main__":
    main()
