"""Data-parallel training with fusedrnn.jax across two CPU devices (shard_map over the batch). The
device count is fixed by XLA_FLAGS before jax initialises, so the steps run in a child process
(jax_sharded_worker.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")


def test_batch_sharded_training_steps_match_one_device():
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jax_sharded_worker.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, worker], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("OK")
