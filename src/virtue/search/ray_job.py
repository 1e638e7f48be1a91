"""Embedding past one machine: a Ray Data job whose actors each hold one model, loaded from a folder.

The driver plans the index (what to embed) and writes the table; only `encode` runs on the cluster. The rows
travel as JSON strings, so Ray Data never has to infer one schema for boxes, point lists and missing keys.
Workers import `virtue` themselves: it must be installed on every node (or shipped with a runtime_env).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from virtue.errors import VirtueError
from virtue.search.ray_options import RayOptions
from virtue.search.store import IndexMismatchError, require

logger = logging.getLogger(__name__)

AUTH_HINT = (
    "if the cluster uses token authentication (Ray 2.60 turns it on for clusters that ray.init or ray start "
    "create), set RAY_AUTH_MODE=token and provide the token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"
)


class RayConnectionError(VirtueError):
    """The Ray cluster at the given address could not be reached."""


class EmbedActor:
    """Ray Data UDF: one `VirtueModel` per actor, loaded once; each call embeds one batch of JSON specs."""

    def __init__(self, model_dir: str, fingerprint: str, dtype: str, device: str, image_resize: Any):
        import torch

        from virtue.hashing import model_fingerprint
        from virtue.model.embedder import VirtueModel

        self.model = VirtueModel.from_pretrained(
            model_dir, device=device, dtype=getattr(torch, dtype), allow_hub=False
        )
        # A stale or different model in a shared folder would silently mix vector spaces: check it.
        found = model_fingerprint(self.model)
        if found != fingerprint:
            raise IndexMismatchError(f"{model_dir}: holds model {found}, the driver's model is {fingerprint}")
        self.image_resize = tuple(image_resize) if image_resize else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        specs = [json.loads(s) for s in batch["spec"]]
        vectors = self.model.encode(
            specs, batch_size=len(specs), image_resize=self.image_resize, show_progress_bar=False
        )
        return {"idx": np.asarray(batch["idx"], np.int64), "vector": np.asarray(vectors, np.float32)}


def embed_with_ray(
    model,
    specs: list[dict[str, Any]],
    *,
    address: str,
    options: RayOptions,
    batch_size: int,
    fingerprint: str,
    image_resize: tuple[int, int] | None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (row indices, vectors) as the cluster finishes batches (not in input order)."""
    ray = require("ray", "--ray", "ray[data]")
    require("ray.data", "--ray", "ray[data]")
    with _model_dir(model, options.model_dir) as model_dir, _connected(ray, address):
        ds = ray.data.from_items([{"idx": i, "spec": json.dumps(s)} for i, s in enumerate(specs)])
        ds = ds.map_batches(
            EmbedActor,
            fn_constructor_kwargs={
                "model_dir": str(model_dir),
                "fingerprint": fingerprint,
                "dtype": str(model.dtype).removeprefix("torch."),
                "device": "cuda" if options.num_gpus > 0 else "cpu",
                "image_resize": list(image_resize) if image_resize else None,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=options.concurrency),
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            yield batch["idx"], batch["vector"]


@contextlib.contextmanager
def _model_dir(model, model_dir: str | Path | None) -> Iterator[Path]:
    """A folder holding the model in the library layout: the given one (saved into if empty) or a temporary."""
    if model_dir is not None:
        path = Path(model_dir)
        if (path / "config.json").is_file():
            logger.info("%s: using the saved model there (workers check its fingerprint)", path)
        else:
            model.save_pretrained(path)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="virtue-ray-model-") as tmp:
        model.save_pretrained(tmp)  # workers load it from here: this only works on a one-machine cluster
        yield Path(tmp)


@contextlib.contextmanager
def _connected(ray, address: str) -> Iterator[None]:
    """Connect to `address` unless this process is already connected; disconnect only if we connected."""
    if ray.is_initialized():
        logger.info("ray is already initialised in this process; using that cluster, not %s", address)
        yield
        return
    try:
        ray.init(address=address)
    except ConnectionError as exc:
        raise RayConnectionError(f"cannot connect to the Ray cluster at {address}: {exc}; {AUTH_HINT}") from exc
    try:
        yield
    finally:
        ray.shutdown()
