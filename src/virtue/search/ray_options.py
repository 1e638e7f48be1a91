"""`RayOptions`: how `index_directory(..., ray_address=...)` runs its Ray Data job (`virtue.search.ray_job`).

Its own module so that the index may import the job (lazily, only when Ray is used) and the job imports nothing
of the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RayOptions:
    """How `index_directory(..., ray_address=...)` runs its Ray Data job.

    `model_dir` must be readable by every worker (shared storage on a multi-node cluster): the model is saved
    there with `save_pretrained` unless it already holds a saved model. Without it, a temporary folder on the
    driver is used, which only works when the workers share the driver's filesystem (one machine).
    """

    concurrency: int = 2  # actors, each holding one model
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor; > 0 puts the model on CUDA
    model_dir: str | Path | None = None
