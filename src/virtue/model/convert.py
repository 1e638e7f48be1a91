"""Official released layout -> library layout, weights converted to safetensors with their dtypes kept.

Here, above `checkpoints`, because the conversion checks the official weights against the model they must load
into (keys and shapes, on the meta device: nothing is allocated) before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import torch

from virtue.checkpoints.loading import read_checkpoint
from virtue.checkpoints.native import check_new_destination, check_state_dict, save_native
from virtue.errors import CheckpointError
from virtue.model.embedder import VirtueModel


def convert_checkpoint(
    src: str | Path, dst: str | Path, *, sam_checkpoint: str | Path | None = None, allow_hub: bool = True
) -> Path:
    """Write `dst` (library layout, SAM2 weights included). Tensors keep their stored dtype, so the
    converted model gives the same embeddings. `dst` also gets the sentence-transformers files (through
    `save_native`): it loads with `SentenceTransformer(dst, trust_remote_code=True)` as well."""
    dst = Path(dst)
    check_new_destination(dst)
    ckpt = read_checkpoint(src, sam_checkpoint=sam_checkpoint, allow_hub=allow_hub)
    if ckpt.layout != "official":
        raise CheckpointError(f"{src}: already in the library layout; nothing to convert")
    with torch.device("meta"):  # keys and shapes checked without allocating the weights
        skeleton = VirtueModel(ckpt.config, ckpt.tokenizer)
    check_state_dict(skeleton.state_dict(), ckpt.state_dict, ckpt.source)
    save_native(dst, ckpt.config, ckpt.state_dict, ckpt.tokenizer)
    return dst
