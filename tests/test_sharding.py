"""Mesh, partition rules, and a sharded step equal to the single-device step."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from unified_seq import sharding


def test_mesh_fills_the_free_axis():
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)])
    assert mesh.shape == {"data": len(jax.devices()), "fsdp": 1}
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh([("data", 3), ("fsdp", 5)])


def test_rules_pick_the_first_matching_regex():
    tree = {"encoder": {"kernel": np.zeros([4, 8])}, "bias": np.zeros([3])}
    # With an fsdp axis of 2 the two strategies give different specs, so
    # the order of the rules decides.
    axes = {"data": 1, "fsdp": 2}
    specs = sharding.partition_specs(tree, axes, [("encoder/.*", "fsdp"), (".*", "replicate")])
    assert specs["encoder"]["kernel"] == P(None, "fsdp")  # the largest divisible dimension
    assert specs["bias"] == P()  # 3 does not divide by 2; replicated either way
    specs = sharding.partition_specs(tree, axes, [(".*", "replicate"), ("encoder/.*", "fsdp")])
    assert specs["encoder"]["kernel"] == P()
    specs = sharding.partition_specs(tree, axes, [("bias", "replicate")])
    assert specs["encoder"]["kernel"] == P()  # no rule matches: replicated
    mesh = sharding.make_mesh([("data", 1), ("fsdp", 1)])
    shardings = sharding.tree_shardings(tree, mesh, [("encoder/.*", "fsdp")])
    assert shardings["encoder"]["kernel"].spec == P()  # an fsdp axis of 1 shards nothing
    with pytest.raises(ValueError, match="strategy"):
        sharding.tree_shardings(tree, mesh, [(".*", "shard-everything")])


def test_sharded_step_equals_single_device_step():
    script = os.path.join(os.path.dirname(__file__), "sharded_step_check.py")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    out = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, env=env, timeout=600, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["max_param_diff"] < 1e-5 and result["loss_diff"] < 1e-5, result
    # Parameters really were split over the fsdp axis.
    assert any("fsdp" in s for s in result["specs"]), result


def test_mesh_and_rules_are_strings_on_the_command_line():
    assert sharding.parse_mesh("data:-1,fsdp:8") == [("data", -1), ("fsdp", 8)]
    assert sharding.parse_mesh([("data", -1), ("fsdp", 1)]) == [("data", -1), ("fsdp", 1)]
    rules = sharding.parse_rules(".*embed.*=replicate; .*=fsdp")
    assert rules == [(".*embed.*", "replicate"), (".*", "fsdp")]
    # The last `=` splits: a lookahead in the regex survives.
    assert sharding.parse_rules("enc(?=oder).*=fsdp") == [("enc(?=oder).*", "fsdp")]
    for bad in ["data=-1", "data:x", ""]:
        with pytest.raises(ValueError, match="config.mesh"):
            sharding.parse_mesh(bad)
    with pytest.raises(ValueError, match="strategy 'split'"):
        sharding.parse_rules(".*=split")
    with pytest.raises(ValueError, match="regex=strategy"):
        sharding.parse_rules("fsdp")


def test_batches_must_split_over_the_devices(monkeypatch):
    from unified_seq import defaults, train

    config = ml_collections.ConfigDict(
        {"tasks": defaults.task_configs(), "train": defaults.train_config()}
    )
    config.train.batch_size = 4
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    with pytest.raises(ValueError, match=r"train.batch_size=4 .* split over 8 devices.*=8"):
        train.check_batch_sizes(config)
    config.train.batch_size = 16
    config.tasks.captioning.batch_size = 12
    with pytest.raises(ValueError, match=r"tasks.captioning.batch_size=12 .*=16"):
        train.check_batch_sizes(config)
    config.tasks.captioning.batch_size = 24
    train.check_batch_sizes(config)
