"""`VirtueModel`: (image, visual prompt, text) -> one L2-normalised vector."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from virtue.checkpoints.base import BASE_HUB_PATTERNS, read_base
from virtue.checkpoints.loading import SAM_SOURCE_FILE, detect_layout, load_tokenizer, read_checkpoint, resolve_dir
from virtue.checkpoints.native import check_state_dict, save_native
from virtue.config import CompatConfig, VirtueConfig
from virtue.errors import CheckpointError, InputError, PromptError
from virtue.inputs import EmbedInput, parse_input
from virtue.model.backbone import build_qwen, last_hidden, pack_rows
from virtue.model.connector import Connector, seeded_connector_state
from virtue.model.feature_cache import FeatureCache, ImageFeatures
from virtue.model.loaders import loader_for
from virtue.model.precision import built_in, cudnn_tf32_off
from virtue.model.sam_branch import SamBranch
from virtue.processing.batch import LoadedImage, VirtueProcessor

logger = logging.getLogger(__name__)


class VirtueModel(nn.Module):
    """Qwen2-VL + frozen SAM2.1 region branch + connector (virtue-spec §0-2).

    Build from a config (random weights) or with `from_pretrained`; embed with `encode`.
    """

    def __init__(self, config: VirtueConfig, tokenizer, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.qwen = build_qwen(config.backbone, attn_implementation)
        self.sam: SamBranch | None = None
        self.connector: Connector | None = None
        if config.sam.enabled:
            self.sam = SamBranch(config.sam.sam2, attn_implementation)
            self.connector = Connector(config.sam.dim, config.hidden_size, config.sam.reducer_kernel)
        self.processor = VirtueProcessor(config, tokenizer)
        # Where the SAM2 weights came from (files, sizes, sha256), for reports; None when unknown.
        self.sam_source: dict | None = None
        # Mixed precision as the official training runs it (virtue-spec §3): low-precision frozen weights,
        # float32 trainables and SAM2, every forward under autocast to this dtype. None: no autocast.
        self.autocast_dtype: torch.dtype | None = None

    # ----------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        sam_checkpoint: str | Path | None = None,
        compat: CompatConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        allow_hub: bool = True,
        merge_adapters: bool = True,
        float32_modules: Sequence[str] = (),
    ) -> VirtueModel:
        """Load the official released layout (e.g. "Sony/VIRTUE-2B-SCaR"), the library layout, or a training
        checkpoint (`outputs/run/checkpoint-500`, written by `virtue train`).

        Args:
            name_or_path: a local directory or a hub repo id.
            sam_checkpoint: SAM2.1 weights (Meta `.pt` or a transformers Sam2 folder) for official
                checkpoints, which do not ship them; else found in the directory, then on the hub.
            compat: override the stored compatibility setting (official layout: `CompatConfig.official()`).
            dtype: weights dtype; float32 reproduces the official fp32 embeddings, bfloat16 for GPU speed.
            merge_adapters: training checkpoints only: fold DoRA/LoRA adapters into the weights (fast, in
                `dtype`); False keeps them apart, in float32 under the run's autocast: exactly the model as
                it was at that step.
            float32_modules: top-level modules ("sam", "connector") kept in float32 whatever `dtype` is
                (mixed-precision training).
        Raises:
            CheckpointError (and subclasses) naming the file and what is wrong.
        """
        local = Path(name_or_path).expanduser()
        if local.is_dir() and detect_layout(local) is None:
            loader = loader_for(local)  # a layout another package owns (a training checkpoint: `virtue.train`)
            if loader is not None:
                return loader.load(local, device=device, dtype=dtype, merge_adapters=merge_adapters,
                                   allow_hub=allow_hub, compat=compat, float32_modules=float32_modules)
        ckpt = read_checkpoint(name_or_path, sam_checkpoint=sam_checkpoint, allow_hub=allow_hub)
        config = ckpt.config if compat is None else ckpt.config.replace(compat=compat)
        model = cls._assemble(config, ckpt.tokenizer, ckpt.state_dict, ckpt.source, dtype=dtype, device=device,
                              attn_implementation=attn_implementation, float32_modules=float32_modules)
        model.sam_source = ckpt.sam_source
        return model

    @classmethod
    def from_base(
        cls,
        qwen2vl: str | Path,
        *,
        sam_checkpoint: str | Path | None = None,
        seed: int = 0,
        compat: CompatConfig | None = None,
        points_per_side: int = 3,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        float32_modules: Sequence[str] = (),
        attn_implementation: str = "sdpa",
        allow_hub: bool = True,
    ) -> VirtueModel:
        """An untrained VIRTUE from its parts, the official training starting point (virtue-spec §3, §4.3).

        Args:
            qwen2vl: a Qwen2-VL model folder or hub id, e.g. "Qwen/Qwen2-VL-2B-Instruct" (2B or 7B; the
                transformers 4.x and 5.x key names both load).
            sam_checkpoint: SAM2.1 weights (Meta `sam2.1_hiera_base_plus.pt` or a transformers Sam2 folder);
                else the folder, then the hub's facebook/sam2.1-hiera-base-plus (as for official checkpoints).
            seed: seeds the connector's default PyTorch initialisation (the official code's), and nothing else.
            compat: the quirks to train with; clean by default (the released weights' quirks are not needed
                by a model trained from scratch).
            float32_modules: top-level modules ("sam", "connector") kept in float32 whatever `dtype` is.
        """
        path = resolve_dir(qwen2vl, allow_hub, allow_patterns=BASE_HUB_PATTERNS)
        config, state, sam_source = read_base(
            path, sam_checkpoint=sam_checkpoint, allow_hub=allow_hub, compat=compat, points_per_side=points_per_side
        )
        state.update(seeded_connector_state(config.sam.dim, config.hidden_size, config.sam.reducer_kernel, seed))
        source = f"{path} (base; SAM2 from {sam_source}; connector seeded {seed})"
        model = cls._assemble(config, load_tokenizer(path), state, source, dtype=dtype, device=device,
                              attn_implementation=attn_implementation, float32_modules=float32_modules)
        model.sam_source = sam_source.as_dict()
        return model

    @classmethod
    def _assemble(
        cls,
        config: VirtueConfig,
        tokenizer,
        state_dict: dict[str, torch.Tensor],
        source: str,
        *,
        dtype: torch.dtype,
        device: str | torch.device | None,
        attn_implementation: str = "sdpa",
        float32_modules: Sequence[str] = (),
    ) -> VirtueModel:
        with built_in(dtype):  # directly in the target dtype (no float32 copy of a 7B model), this thread only
            model = cls(config, tokenizer, attn_implementation)
        for name in float32_modules:  # before loading, so float32 weights are not rounded on the way in
            module = getattr(model, name, None)
            if module is not None:
                module.float()
        model.load_weights(state_dict, source=source)
        del state_dict
        model.to(device=device)
        model.cast_weights(dtype, float32_modules)
        return model.eval()

    def cast_weights(self, dtype: torch.dtype, float32_modules: Sequence[str] = ()) -> None:
        """Every top-level module to `dtype` except `float32_modules`. With float32 modules (mixed precision,
        training) only the weights are cast: buffers (RoPE frequencies) stay float32, as transformers'
        from_pretrained(torch_dtype=...) leaves them in the official training."""
        for name, module in self.named_children():
            if name in float32_modules:
                continue
            if float32_modules:
                for p in module.parameters():
                    p.data = p.data.to(dtype)
            else:
                module.to(dtype=dtype)

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Strict load with shapes checked; names every missing, unexpected or mis-shaped key."""
        check_state_dict(self.state_dict(), state_dict, source)
        self.load_state_dict(state_dict, strict=True)

    def save_pretrained(
        self, path: str | Path, *, dtype: torch.dtype | None = None, sentence_transformers_files: bool = True
    ) -> None:
        """Write the library layout: config.json, model.safetensors, tokenizer files, and where SAM2 came from.

        dtype: cast every floating-point weight to it (default: keep each weight's dtype).
        sentence_transformers_files: also write the files that make the folder a sentence-transformers model
            (`virtue.checkpoints.st_files`); False when `SentenceTransformer.save` writes its own.
        """
        if any(".lora_" in name for name, _ in self.named_parameters()):
            raise CheckpointError(
                "this model still holds training adapters; fold them in first with "
                "virtue.train.adapters.merge_adapters(model)"
            )
        state = self.state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_native(path, self.config, state, self.processor.tokenizer,
                    sentence_transformers=sentence_transformers_files)
        if self.sam_source is not None:
            (Path(path) / SAM_SOURCE_FILE).write_text(json.dumps(self.sam_source, indent=2) + "\n")

    def compile_towers(self, *, sam: bool = True, vision: bool = True, **compile_kwargs: Any) -> VirtueModel:
        """Opt-in `torch.compile` of the per-image towers: SAM2's image encoder (fixed S x S input: one graph) and
        the Qwen ViT (token counts vary with the image: compiled with dynamic shapes). In place, so weights,
        names and checkpoints are unchanged; the first batches pay the compilation. See benchmarks/throughput.py
        (`--compile`) for what it buys on a given machine."""
        if sam and self.sam is not None:
            self.sam.model.vision_encoder.compile(**compile_kwargs)
        if vision:
            self.qwen.visual.compile(**{"dynamic": True, **compile_kwargs})
        return self

    # ----------------------------------------------------------------- forward
    @property
    def device(self) -> torch.device:
        return next(self.qwen.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.qwen.parameters()).dtype

    def forward(
        self,
        items: Sequence[EmbedInput],
        *,
        indices: Sequence[int] | None = None,
        cache: FeatureCache | None = None,
        image_resize: tuple[int, int] | None = None,
        normalize: bool = True,
        max_length: int | None = None,
        truncate: bool = False,
        row_ids: Sequence[list[int]] | None = None,
    ) -> torch.Tensor:
        """Embed one batch of parsed inputs -> [B, hidden], differentiable where weights train.

        Image rows and text rows are run as separate sub-batches (their sequences differ in structure) and
        returned in input order. `encode` is the batched, no-grad entry point for users. `row_ids`: each row's
        token ids when already known (`check_inputs`), so they are not tokenised again.
        """
        lengths = {"max_length": max_length, "truncate": truncate}
        indices = list(range(len(items))) if indices is None else list(indices)
        groups = {
            kind: [n for n, item in enumerate(items) if item.has_image == kind] for kind in (True, False)
        }
        parts = []
        with self._precision_scope():
            for has_image, rows in groups.items():
                if not rows:
                    continue
                sub_items, sub_indices = [items[n] for n in rows], [indices[n] for n in rows]
                known = None if row_ids is None else [row_ids[n] for n in rows]
                if has_image:
                    pooled = self._embed_image_rows(sub_items, sub_indices, cache, image_resize, lengths, known)
                else:
                    pooled = self._embed_text_rows(sub_items, sub_indices, lengths, known)
                parts.append((rows, pooled))
        order = [n for rows, _ in parts for n in rows]
        pooled = torch.cat([p for _, p in parts])
        if order != sorted(order):
            pooled = pooled[torch.argsort(torch.tensor(order, device=pooled.device))]
        if pooled.dtype in (torch.float16, torch.bfloat16):
            pooled = pooled.float()  # normalise and compare in float32, as the official eval does
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def _precision_scope(self):
        """Autocast when the model is in mixed precision (`autocast_dtype`). Otherwise float32 on CUDA means
        float32: cuDNN's default TF32 convolutions move the official embeddings by ~3e-4 (measured on an
        H100; 1.5e-6 without). The flag is process-wide: it is off while any such call runs (shared by
        overlapping calls) and restored after the last, see `virtue.model.precision`."""
        if self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        if self.device.type != "cuda" or self.dtype != torch.float32:
            return contextlib.nullcontext()
        return cudnn_tf32_off()

    def _embed_text_rows(
        self, items: Sequence[EmbedInput], indices: Sequence[int], lengths: dict, known: list | None
    ) -> torch.Tensor:
        proc = self.processor
        embed = self.qwen.language_model.embed_tokens
        rows = []
        for n, (item, i) in enumerate(zip(items, indices, strict=True)):
            ids = proc.row_ids(item, f"input {i}", **lengths) if known is None else known[n]
            rows.append(embed(torch.tensor(ids, device=self.device)))
        return last_hidden(self.qwen, *pack_rows(rows, None))

    def _embed_image_rows(
        self,
        items: Sequence[EmbedInput],
        indices: Sequence[int],
        cache: FeatureCache | None,
        image_resize: tuple[int, int] | None,
        lengths: dict,
        known: list | None,
    ) -> torch.Tensor:
        proc = self.processor
        if self.sam is None:
            for item, i in zip(items, indices, strict=True):
                if item.prompt is not None:
                    raise PromptError(f"input {i}: this model has no SAM branch, so it cannot read a visual prompt")
        loaded = [proc.load(item, f"input {i}", image_resize) for item, i in zip(items, indices, strict=True)]
        if cache is None:
            # Without a cache every row computes its own image features (the reference for benchmarks).
            keys = [(row, *img.key) for row, img in enumerate(loaded)]
            cache = FeatureCache(len(loaded))
        else:
            keys = [img.key for img in loaded]
        features = self._image_features(loaded, keys, cache)
        embed = self.qwen.language_model.embed_tokens
        rows = []
        for n, (item, i, feats) in enumerate(zip(items, indices, features, strict=True)):
            if known is None:
                ids = proc.row_ids(item, f"input {i}", feats.num_tokens, **lengths)
            else:
                ids = known[n]
                if ids.count(proc.image_token_id) != feats.num_tokens:  # planned from the header: must agree
                    raise RuntimeError(f"input {i}: {ids.count(proc.image_token_id)} image tokens planned, "
                                       f"{feats.num_tokens} computed")
            ids_t = torch.tensor(ids, device=self.device)
            row = embed(ids_t)
            row = row.masked_scatter((ids_t == proc.image_token_id)[:, None], feats.vision.to(row.dtype))
            rows.append(row)
        prefix = None
        if self.sam is not None:
            prompts = [
                proc.sam_prompt(item, feats.size_wh, self.sam.mask_input_size)
                for item, feats in zip(items, features, strict=True)
            ]
            fused = self.sam.fuse(torch.stack([f.sam for f in features]), prompts)  # [B, C, 64, 64]
            prefix = self.connector(fused.to(self.connector.reducer.weight.dtype))  # [B, T, D]
            prefix = prefix.to(rows[0].dtype)
        return last_hidden(self.qwen, *pack_rows(rows, prefix))

    def _image_features(
        self, loaded: list[LoadedImage], keys: list[tuple], cache: FeatureCache
    ) -> list[ImageFeatures]:
        """Features for every row; images missing from the cache are computed together, once each."""
        todo: dict[tuple, LoadedImage] = {}
        for key, img in zip(keys, loaded, strict=True):
            if key not in todo and cache.get(key) is None:
                todo[key] = img
        if todo:
            prepared = [self.processor.prepare_image(img) for img in todo.values()]
            with torch.set_grad_enabled(torch.is_grad_enabled() and self._vision_trains()):
                vision = self._vision_tower(prepared)
                sam = None
                if self.sam is not None:
                    pixels = torch.stack([self.processor.sam_input(p, self.device) for p in prepared])
                    sam = self.sam.encode_images(pixels.to(self._sam_dtype()))
            for n, (key, img) in enumerate(todo.items()):
                cache.put(key, ImageFeatures(vision[n], None if sam is None else sam[n], img.size_wh))
        return [self._cached(cache, key) for key in keys]

    def _vision_trains(self) -> bool:
        """Frozen by default (virtue-spec §3); from-scratch training may unfreeze the ViT or SAM2."""
        towers = [self.qwen.visual] + ([self.sam] if self.sam is not None else [])
        return any(p.requires_grad for tower in towers for p in tower.parameters())

    @staticmethod
    def _cached(cache: FeatureCache, key: tuple) -> ImageFeatures:
        item = cache.get(key)
        if item is None:  # capacity smaller than one batch's distinct images
            raise RuntimeError("feature cache capacity is below the number of distinct images in a batch")
        return item

    def _sam_dtype(self) -> torch.dtype:
        return next(self.sam.parameters()).dtype

    def _vision_tower(self, prepared) -> list[torch.Tensor]:
        visual = self.qwen.visual
        pixels = torch.cat([p.qwen.patches(self.device, visual.dtype) for p in prepared])
        grid = torch.tensor([p.qwen.grid_thw for p in prepared], device=self.device)
        merged = visual(pixels, grid_thw=grid).pooler_output  # [sum tokens, D]
        return list(torch.split(merged, [p.qwen.num_tokens for p in prepared]))

    # ----------------------------------------------------------------- user API
    @torch.inference_mode()
    def encode(
        self,
        inputs: Any,
        *,
        batch_size: int = 8,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        normalize_embeddings: bool = True,
        image_resize: tuple[int, int] | None = None,
        reuse_image_features: bool = True,
        num_workers: int = 1,
        prefetch: int = 2,
        max_length: int | None = None,
        truncate: bool = False,
    ) -> np.ndarray | torch.Tensor:
        """Embed strings, images (PIL, path, numpy) or dicts like
        `{"image": ..., "text": ..., "box": [x1, y1, x2, y2]}` / `"points": [[x, y], ...], "labels": [1, 0]`
        / `"mask": HxW array or PNG path`. Coordinates are pixels of the original image.

        Args:
            inputs: one input or a list of them; the result has one row per input, in order.
            batch_size: rows per forward pass. Rows are grouped by modality (and by image, so prompts on
                one image share its SAM2 and ViT features; images ordered by size so batches pad little); the
                result does not depend on it.
            image_resize: (W, H) to squash every image to first, like the official evaluation (1344, 1344).
            reuse_image_features: compute SAM2/ViT features once per distinct image (off: once per row).
            num_workers: threads that read and preprocess images ahead of the model (0: in this thread, in turn).
            prefetch: batches prepared ahead (bounded memory).
            max_length: tokens per row at most (default: the model's positions, less the segmentation tokens'
                for an image row). A longer row is an InputError naming it, unless `truncate`.
            truncate: cut the text of a row past the limit from its end (the image's tokens are kept whole).
        Raises:
            InputError (ImageError, PromptError): every input is checked (image readable from its header and
            under `model.processor.max_image_pixels`, prompt inside it, length) before any compute; one error
            names every bad input.
        Returns:
            float32 [N, hidden] numpy array (or tensor), L2-normalised unless `normalize_embeddings=False`;
            [hidden] for a single non-list input.
        """
        from virtue.processing.prefetch import Prefetcher

        single = not isinstance(inputs, (list, tuple))
        items = [parse_input(x, i) for i, x in enumerate([inputs] if single else inputs)]
        if not items:
            raise InputError("encode: got an empty list of inputs")
        if batch_size < 1:
            raise InputError(f"batch_size: must be >= 1, got {batch_size}")
        if num_workers < 0 or prefetch < 1:
            raise InputError(f"num_workers must be >= 0 and prefetch >= 1, got {num_workers}, {prefetch}")
        items = self.processor.check_inputs(items, image_resize=image_resize, max_length=max_length,
                                            truncate=truncate)
        batches = list(self.processor.plan_batches(items, batch_size))
        cache = FeatureCache(capacity=max(4 * batch_size, 16)) if reuse_image_features else None
        out = torch.empty(len(items), self.config.hidden_size)
        show = len(batches) > 1 if show_progress_bar is None else show_progress_bar
        prepared = Prefetcher(self.processor, items, batches, resize_to=image_resize, workers=num_workers,
                              depth=prefetch, pin_memory=self.device.type == "cuda",
                              share_images=reuse_image_features, shared_capacity=max(2 * batch_size, 16))
        with prepared, tqdm(total=len(batches), desc="Encoding", unit="batch", disable=not show) as bar:
            for batch, rows in prepared:
                emb = self(rows, indices=batch, cache=cache, image_resize=image_resize,
                           normalize=normalize_embeddings, row_ids=[list(items[i].token_ids) for i in batch])
                out[batch] = emb.float().cpu()
                bar.update(1)
        if single:
            out = out[0]
        return out.numpy() if convert_to_numpy else out

    @staticmethod
    def similarity(a, b) -> np.ndarray | torch.Tensor:
        """Dot products of two sets of (normalised) embeddings: [N, D] x [M, D] -> [N, M] cosine scores."""
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            a, b = torch.as_tensor(a), torch.as_tensor(b)
            return torch.atleast_2d(a).float() @ torch.atleast_2d(b).float().T
        return np.atleast_2d(np.asarray(a, np.float32)) @ np.atleast_2d(np.asarray(b, np.float32)).T
