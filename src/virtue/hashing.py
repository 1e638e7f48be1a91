"""Content hashes, in one place: of files, of tensors, and of a whole model (its config and every weight).

Caches and indexes are keyed by these (evaluation cache, search index, demo gallery, mteb revision), and a
training checkpoint proves with them that its frozen weights were rebuilt bit-for-bit. One definition, so that
two places never disagree about whether a model or a file changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks (a multi-GB weight file is never held whole)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tensors(h: Any, named_tensors: Iterable[tuple[str, Any]]) -> None:
    """Feed (name, tensor) pairs into the hash `h`, in the order given: each one's name, shape, dtype and bytes."""
    import torch

    for name, tensor in named_tensors:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # The array itself, not `.tobytes()`: hashing a copy would double a multi-GB model's memory for a moment.
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")


def model_fingerprint(model: Any) -> str:
    """32 hex digits of sha256 over the model's config (`model.config.to_dict()`) and every parameter and buffer
    (names, shapes, dtypes and bytes): a changed weight or setting gives another fingerprint."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    hash_tensors(h, sorted(model.state_dict().items()))
    return h.hexdigest()[:32]
