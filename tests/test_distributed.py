"""Joining a multi-process run: flags, environment and cluster detection.

The run itself (two processes as one job) is tests/test_multiprocess.py.
"""

import pytest

from unified_seq import distributed


def test_flags_fall_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("UNIFIED_SEQ_COORDINATOR_ADDRESS", "10.0.0.2:1234")
    monkeypatch.setenv("UNIFIED_SEQ_NUM_PROCESSES", "4")
    monkeypatch.setenv("UNIFIED_SEQ_PROCESS_ID", "3")
    assert distributed.settings(None, None, None) == ("10.0.0.2:1234", 4, 3)
    # A flag wins over its variable.
    assert distributed.settings("h:1", 2, 0) == ("h:1", 2, 0)


def test_clusters_are_recognised_by_their_environment():
    assert not distributed.cluster_detected({})
    assert not distributed.cluster_detected({"SLURM_NTASKS": "1"})
    assert distributed.cluster_detected({"SLURM_NTASKS": "16"})
    assert distributed.cluster_detected({"OMPI_COMM_WORLD_SIZE": "2"})
    assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "w-0,w-1"})
    assert not distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "localhost"})


def test_incomplete_settings_fail_before_any_device_is_touched(monkeypatch):
    for name in ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID"):
        monkeypatch.delenv("UNIFIED_SEQ_" + name, raising=False)
    with pytest.raises(ValueError, match="needs all of --coordinator_address"):
        distributed.initialize("127.0.0.1:1234", None, 0)
    with pytest.raises(ValueError, match="--process_id=2 must be in"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    # One process of one: nothing to join.
    distributed.initialize("127.0.0.1:1234", 1, 0)
