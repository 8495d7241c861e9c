"""Run by test_sharding.py in a fresh process with 8 fake CPU devices.

Prints JSON: the largest difference between the parameters after one step on
one device and after the same step on a (data 4, fsdp 2) mesh, and the specs.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from unified_seq import sharding, train  # noqa: E402
from unified_seq.models import sizes  # noqa: E402

SIZE, VOCAB = 32, 64
WEIGHTS = {"object_detection": 0.4, "captioning": 0.6}


def batches():
    r = np.random.default_rng(0)

    def seq(shape):
        return {
            "input_seq": r.integers(1, VOCAB, shape).astype(np.int32),
            "target_seq": r.integers(0, VOCAB, shape).astype(np.int32),
            "token_weights": (r.random(shape) > 0.3).astype(np.float32),
        }

    return {
        "object_detection": {"image": r.random((8, SIZE, SIZE, 3), np.float32), **seq((8, 10))},
        "captioning": {"image": r.random((8, SIZE, SIZE, 3), np.float32), **seq((8, 2, 6))},
    }


def run(mesh_axes, rules):
    cfg = sizes.model_config(
        "tiny", enc_depth=1, enc_width=32, enc_mlp_dim=64, enc_heads=2,
        dec_depth=1, dec_width=32, dec_mlp_dim=64, dec_heads=2, dropout=0.1,
    )  # fmt: skip
    model = sizes.build_model(cfg, VOCAB, 12)
    config = ml_collections.ConfigDict(
        {"seed": 0, "data": {"image_size": SIZE}, "sharding_rules": rules}
    )
    devices = jax.devices() if mesh_axes != [("data", 1), ("fsdp", 1)] else jax.devices()[:1]
    mesh = sharding.make_mesh(mesh_axes, devices)
    # Plain SGD: Adam's g/|g| would magnify float noise on near-zero gradients.
    optimizer = optax.sgd(1e-1)
    state, shardings = train.create_state(model, optimizer, config, mesh, 12)
    step = jax.jit(
        train.make_train_step(model, optimizer, optax.constant_schedule(1e-1), WEIGHTS, seed=0),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
    )
    state, metrics = step(state, sharding.to_global(batches(), mesh))
    specs = {str(s.spec) for s in jax.tree_util.tree_leaves(shardings)}
    return jax.device_get(state.params), float(metrics["loss"]), specs


single, loss1, _ = run([("data", 1), ("fsdp", 1)], [(".*", "replicate")])
sharded, loss8, specs = run([("data", 4), ("fsdp", 2)], [(".*", "fsdp")])
diff = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(
        jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded), strict=True
    )
)
print(json.dumps({"max_param_diff": diff, "loss_diff": abs(loss1 - loss8), "specs": sorted(specs)}))
