"""`index_directory(..., ray_address=...)`: a Ray Data job on a local 2-CPU cluster gives the local rows."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import require
from tests.search.helpers import region_lines, stored, write_regions
from virtue.search import RayOptions, index_directory

# Holds a local cluster until its stdin closes: the test's own process then connects by address, as
# `virtue index --ray HOST:PORT` does, and our code's connect / disconnect path runs.
CLUSTER = """
import sys, ray
ctx = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
print(ctx.address_info["gcs_address"], flush=True)
sys.stdin.read()
ray.shutdown()
"""


@pytest.fixture
def ray_address():
    """A 2-CPU cluster with a 200 MB object store and no dashboard, started for this test and stopped after."""
    require("ray.data", reason="the Ray path needs ray[data]: pip install 'ray[data]'")
    # Ray 2.60 turns token auth on for a cluster that ray.init starts, but a driver connecting by explicit
    # address only uses it with RAY_AUTH_MODE=token set before ray is imported; this loopback cluster of
    # one test runs without it.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        address = proc.stdout.readline().strip()
        assert address, f"the Ray cluster did not start (exit code {proc.poll()}); see the captured stderr"
        yield address
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # only the process this fixture started
            proc.wait()


def by_identity(db) -> tuple[list[dict], np.ndarray]:
    rows, vectors = stored(db)
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["path"], rows[i]["region_key"] or ""))
    return [rows[i] for i in order], vectors[order]


def test_ray_job_writes_the_local_rows(tiny_model, photos, tmp_path, ray_address):
    write_regions(photos, region_lines(photos))
    local = index_directory(tiny_model, photos, tmp_path / "local", batch_size=2)
    # Two actors (one model each), half a CPU each so Ray Data keeps a CPU for its own tasks.
    options = RayOptions(concurrency=2, num_cpus=0.5, model_dir=tmp_path / "shared-model")
    remote = index_directory(tiny_model, photos, tmp_path / "ray", batch_size=2, ray_address=ray_address,
                             ray_options=options, show_progress_bar=False)
    assert remote.to_dict() == local.to_dict() and remote.embedded == 9
    local_rows, local_vectors = by_identity(tmp_path / "local")
    ray_rows, ray_vectors = by_identity(tmp_path / "ray")
    assert ray_rows == local_rows
    np.testing.assert_allclose(ray_vectors, local_vectors, atol=1e-5)
    # Nothing changed: the plan is empty and no job is submitted.
    again = index_directory(tiny_model, photos, tmp_path / "ray", ray_address=ray_address, ray_options=options)
    assert (again.unchanged, again.regions_unchanged, again.embedded) == (6, 3, 0)
