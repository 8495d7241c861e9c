"""Run by test_checkpoint.py in a fresh process with 8 fake CPU devices.

Saves a train state on one mesh and restores it onto another (8 → 1 device,
1 → 8, fsdp 2 → 4). Prints JSON per case: whether every array came back
equal, and the specs of the restored parameters.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from unified_seq import checkpoint, sharding, train  # noqa: E402
from unified_seq.models import sizes  # noqa: E402

CASES = {
    "8_to_1": (("data:8,fsdp:1", 8), ("data:1,fsdp:1", 1)),
    "1_to_8": (("data:1,fsdp:1", 1), ("data:8,fsdp:1", 8)),
    "fsdp2_to_fsdp4": (("data:4,fsdp:2", 8), ("data:2,fsdp:4", 8)),
}


def state_on(mesh_spec: str, devices: int, seed: int):
    cfg = sizes.model_config(
        "tiny", enc_depth=1, enc_width=32, enc_mlp_dim=64, enc_heads=2,
        dec_depth=1, dec_width=32, dec_mlp_dim=64, dec_heads=2,
    )  # fmt: skip
    model = sizes.build_model(cfg, 64, 12)
    config = ml_collections.ConfigDict(
        {"seed": seed, "data": {"image_size": 32}, "sharding_rules": ".*=fsdp", "mesh": mesh_spec}
    )
    mesh = sharding.mesh_from_config(config, jax.devices()[:devices])
    state, _ = train.create_state(model, optax.adamw(1e-3), config, mesh, 12)
    return state


def main(root: str) -> None:
    report = {}
    for name, ((src, n_src), (dst, n_dst)) in CASES.items():
        saved = state_on(src, n_src, seed=1)
        ckpt = checkpoint.Checkpointer(os.path.join(root, name), every=1, keep=1)
        ckpt.save(7, saved)
        ckpt.wait()
        target = state_on(dst, n_dst, seed=2)  # other values, the shardings wanted
        restored = checkpoint.Checkpointer(os.path.join(root, name), every=1, keep=1).restore(
            7, target
        )
        pairs = zip(
            jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(restored), strict=True
        )
        report[name] = {
            "equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs),
            "differs_from_target": not all(
                np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(
                    jax.tree_util.tree_leaves(target.params),
                    jax.tree_util.tree_leaves(restored.params),
                    strict=True,
                )
            ),
            "devices": sorted(
                {len(x.sharding.device_set) for x in jax.tree_util.tree_leaves(restored.params)}
            ),
            "specs": sorted(
                {str(x.sharding.spec) for x in jax.tree_util.tree_leaves(restored.params)}
            ),
            "target_specs": sorted(
                {str(x.sharding.spec) for x in jax.tree_util.tree_leaves(target.params)}
            ),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
