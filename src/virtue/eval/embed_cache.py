"""On-disk embedding cache for evaluation.

A vector is stored under a key that covers everything it depends on: the model fingerprint (its config and
a hash of every weight), the input's content (text, the image file's bytes or pixels, the prompt) and the
preprocessing settings (e.g. the 1344x1344 pre-resize). A changed model or a changed data file therefore
misses instead of being served stale (the official eval reuses pickles by dataset name, spec §10.18).
SQLite keeps every committed batch, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np

from virtue.hashing import file_sha256
from virtue.images import load_image
from virtue.inputs import EmbedInput
from virtue.processing.images import image_digest


class InputKeys:
    """Content keys of inputs; a file's digest is computed once per path and modification time."""

    def __init__(self, settings: dict):
        self.settings = json.dumps(settings, sort_keys=True, default=str)
        self._files: dict[tuple[str, int, int], str] = {}

    def key(self, item: EmbedInput) -> str:
        h = hashlib.sha256(self.settings.encode())
        h.update(b"text:" + (item.text if item.text is not None else "\0none").encode())
        if item.image is not None:
            h.update(b"image:" + self._image(item.image).encode())
        if item.prompt is not None:
            points, box, mask = item.prompt.fingerprint()
            h.update(f"prompt:{points}:{box}".encode())
            mask = item.prompt.mask
            if mask is not None:  # binary masks packed; logits (float) as they are
                array = mask.array
                h.update(np.packbits(array).tobytes() if array.dtype == bool else b"logits:" + array.tobytes())
        return h.hexdigest()

    def _image(self, image) -> str:
        if isinstance(image, (str, Path)):
            path = Path(image)
            stat = path.stat()
            sig = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            if sig not in self._files:
                self._files[sig] = file_sha256(path)
            return self._files[sig]
        return image_digest(load_image(image))


class EmbeddingCache:
    """key -> float32 vector, in one SQLite file per model fingerprint.

    readonly: open an existing file for lookups only. Several evaluation processes share one file this way: rank 0
    creates it and is its only writer (`eval.runner`), the others read; SQLite's locking serialises the two, and
    the timeout lets a reader wait for a commit in progress.
    """

    def __init__(self, cache_dir: str | Path, fingerprint: str, *, readonly: bool = False, timeout_s: float = 120.0):
        path = Path(cache_dir) / f"embeddings-{fingerprint}.sqlite"
        self.path = path
        if readonly:
            self.db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout_s)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=timeout_s)
        self.db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        self.db.commit()

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            rows = self.db.execute(
                f"SELECT key, vec FROM emb WHERE key IN ({','.join('?' * len(part))})", part
            ).fetchall()
            found.update({k: np.frombuffer(v, dtype=np.float32) for k, v in rows})
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO emb (key, vec) VALUES (?, ?)",
            [(k, np.asarray(v, np.float32).tobytes()) for k, v in items.items()],
        )
        self.db.commit()  # each batch is durable: an interrupted run keeps what it finished

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM emb").fetchone()[0]

    def close(self) -> None:
        self.db.close()
