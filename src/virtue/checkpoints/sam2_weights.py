"""Finding SAM 2.1 weights for `transformers.Sam2Model`: where to look, in which order, and a record
of the files read.

The search order is an explicit path, then the files an official checkpoint directory names (Meta
`.pt` + yaml), then a transformers-format `sam2/` folder, then the Hugging Face Hub. Reading and
checking what is found is `sam2_keys`' job (the format readers live there, next to the key tables
they need), and the yaml -> config translation is `sam2_config`'s; this module imports both and
neither imports it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from virtue.checkpoints.sam2_config import B_PLUS_META_CONFIG, sam2_config_from_meta
from virtue.checkpoints.sam2_keys import StateDict, load_sam2_meta, load_sam2_transformers, meta_state_dict
from virtue.errors import MissingSamWeightsError
from virtue.hashing import file_sha256

__all__ = [
    "SamSource",
    "file_record",
    "resolve_sam2_weights",
]

logger = logging.getLogger(__name__)


class SamSource(str):
    """Where a model's SAM2 weights came from: the description (it is a `str`) and, for reporting, every file
    read with its size and sha256 (`files`, `as_dict()`). Kept out of the model fingerprint, which hashes the
    weights themselves."""

    files: tuple[dict[str, Any], ...]

    def __new__(cls, description: str, files: tuple[dict[str, Any], ...] = ()) -> SamSource:
        obj = super().__new__(cls, description)
        obj.files = tuple(files)
        return obj

    def as_dict(self) -> dict[str, Any]:
        return {"description": str(self), "files": [dict(f) for f in self.files]}


def file_record(path: Path) -> dict[str, Any]:
    """A file read, for reports: its name, path, size and sha256."""
    return {"file": path.name, "path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


# (config, state dict, where they came from)
Found = tuple[dict[str, Any], StateDict, SamSource]
_B_PLUS_YAML_NAME = "sam2.1_hiera_b+.yaml"
_HUB_PLACE = "Hugging Face Hub"
# The Hiera size a Meta config names (sam2.1_hiera_{t,s,b+,l}.yaml): the hub fallback holds B+ only.
_SIZE_IN_NAME = re.compile(r"hiera_(t|s|b\+|l)\b", re.IGNORECASE)
_HUB_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]


class _NotHere(Exception):
    """A place that holds no SAM2 weights; the message says why (internal to the search)."""


def resolve_sam2_weights(
    *,
    explicit: str | Path | None,
    checkpoint_dir: Path | None,
    official_sam_cfg: Mapping[str, Any] | None,
    hub_id: str = "facebook/sam2.1-hiera-base-plus",
    allow_hub: bool = True,
) -> Found:
    """(Sam2Config kwargs, Sam2Model state dict, description of where they came from).

    Order: `explicit` (a Meta `.pt` or a transformers-format directory); then `checkpoint_dir` (the
    files named by `official_sam_cfg`, i.e. an official config.json's `virtue_sam`, then a `sam2/`
    subfolder in transformers format); then `hub_id` if `allow_hub`. An explicit path that holds no
    weights is an error at once: silently using other weights instead would hide the mistake. Files
    that exist but do not load raise their own error. Otherwise MissingSamWeightsError lists every
    place tried, in order, with the reason.
    """
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    sam_cfg = dict(official_sam_cfg or {})
    if explicit is not None:
        try:
            config, weights, found = _load_explicit(Path(explicit), checkpoint_dir, sam_cfg)
        except _NotHere as exc:
            raise MissingSamWeightsError(_missing_message([f"explicit path {explicit}: {exc}"])) from None
        return config, weights, SamSource(f"explicit: {found}", found.files)
    tried: list[str] = []
    for place, load in _fallback_places(checkpoint_dir, sam_cfg, hub_id, allow_hub):
        if place.startswith(_HUB_PLACE):
            _check_hub_size(sam_cfg, hub_id, tried)
        try:
            found = load()
        except _NotHere as exc:
            tried.append(f"{place}: {exc}")
            continue
        if place.startswith(_HUB_PLACE) and tried:
            logger.warning("SAM2 weights not found where the checkpoint names them (%s); using %s",
                           "; ".join(tried), found[2])
        return found
    raise MissingSamWeightsError(_missing_message(tried))


def _check_hub_size(sam_cfg: Mapping[str, Any], hub_id: str, tried: list[str]) -> None:
    """The hub fallback holds SAM2.1 Hiera-B+: refuse it when the checkpoint's config names another size,
    rather than run a model on SAM2 weights it was not trained with."""
    named = sam_cfg.get("config_path")
    match = _SIZE_IN_NAME.search(Path(str(named)).name) if named else None
    if match and match.group(1).lower() != "b+":
        tried.append(f"{_HUB_PLACE} {hub_id}: refused, it holds Hiera-B+ but virtue_sam.config_path names Hiera-"
                     f"{match.group(1)} ({named}); give the right weights with sam_checkpoint=")
        raise MissingSamWeightsError(_missing_message(tried))


def _missing_message(tried: list[str]) -> str:
    lines = "\n".join(f"  {i}. {entry}" for i, entry in enumerate(tried, 1))
    return f"no SAM2 weights found; places tried, in order:\n{lines}"


def _load_explicit(path: Path, checkpoint_dir: Path | None, sam_cfg: Mapping[str, Any]) -> Found:
    if path.is_dir():
        return _load_transformers_dir(path)
    if path.is_file():
        search_dirs = [path.parent, *([checkpoint_dir] if checkpoint_dir else [])]
        return _load_meta_with_yaml(path, search_dirs, sam_cfg.get("config_path"))
    raise _NotHere("no such file or directory")


def _load_transformers_dir(directory: Path) -> Found:
    if not (directory / "config.json").is_file():
        raise _NotHere("directory without config.json (not transformers' Sam2 layout)")
    config, weights = load_sam2_transformers(directory)
    files = sorted(directory.glob("*.safetensors"))
    return config, weights, SamSource(f"transformers-format SAM2 folder {directory}", tuple(map(file_record, files)))


def _candidates(relative: str | None, dirs: list[Path]) -> list[Path]:
    # Official configs hold paths relative to the authors' working directory
    # (./sam2_checkpoints/...): try them as given and by file name alone in each directory.
    if not relative:
        return []
    found: list[Path] = []
    for directory in dirs:
        for option in (directory / relative, directory / Path(relative).name):
            if option not in found:
                found.append(option)
    return found


def _load_meta_with_yaml(pt_path: Path, dirs: list[Path], config_path: str | None) -> Found:
    yaml_options = [*_candidates(config_path, dirs), pt_path.with_suffix(".yaml")]
    yaml_path = next((p for p in yaml_options if p.is_file()), None)
    if yaml_path is not None:
        source = SamSource(f"Meta checkpoint {pt_path} with config {yaml_path}", (file_record(pt_path),))
        return (*load_sam2_meta(pt_path, yaml_path), source)
    if config_path and Path(config_path).name != _B_PLUS_YAML_NAME:
        tried = ", ".join(str(p) for p in yaml_options)
        raise _NotHere(f"found {pt_path} but not its yaml '{config_path}' (looked at {tried})")
    # Without a yaml, the b+ architecture is the one VIRTUE was trained with.
    note = " (no yaml found: built-in Hiera-B+ config)"
    config = sam2_config_from_meta(B_PLUS_META_CONFIG, source="built-in Hiera-B+ config")
    source = SamSource(f"Meta checkpoint {pt_path}{note}", (file_record(pt_path),))
    return config, meta_state_dict(pt_path, config, note=note), source


def _fallback_places(
    checkpoint_dir: Path | None, sam_cfg: Mapping[str, Any], hub_id: str, allow_hub: bool
) -> list[tuple[str, Callable[[], Found]]]:
    places: list[tuple[str, Callable[[], Found]]] = []
    if checkpoint_dir is None:
        places.append(("checkpoint directory", _not_here("none given")))
    else:
        ckpt_dir = checkpoint_dir  # bound for the closures below
        places.append(
            (
                f"Meta checkpoint named by virtue_sam ({sam_cfg.get('checkpoint')!r}) in {ckpt_dir}",
                lambda: _load_official_meta(ckpt_dir, sam_cfg),
            )
        )
        sub = ckpt_dir / "sam2"
        places.append((f"transformers-format folder {sub}", lambda: _load_transformers_dir_if_present(sub)))
    hub_place = f"{_HUB_PLACE} {hub_id}"
    places.append(
        (
            hub_place,
            (lambda: _load_from_hub(hub_id)) if allow_hub else _not_here("disabled (allow_hub=False)"),
        )
    )
    return places


def _not_here(reason: str) -> Callable[[], Found]:
    def load() -> Found:
        raise _NotHere(reason)

    return load


def _load_official_meta(checkpoint_dir: Path, sam_cfg: Mapping[str, Any]) -> Found:
    checkpoint = sam_cfg.get("checkpoint")
    if not checkpoint:
        raise _NotHere("no virtue_sam.checkpoint entry")
    options = _candidates(str(checkpoint), [checkpoint_dir])
    pt_path = next((p for p in options if p.is_file()), None)
    if pt_path is None:
        raise _NotHere("not found at " + ", ".join(str(p) for p in options))
    return _load_meta_with_yaml(pt_path, [checkpoint_dir], sam_cfg.get("config_path"))


def _load_transformers_dir_if_present(directory: Path) -> Found:
    if not directory.is_dir():
        raise _NotHere("does not exist")
    return _load_transformers_dir(directory)


def _load_from_hub(hub_id: str) -> Found:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise _NotHere(f"huggingface_hub is not importable: {exc}") from exc
    try:
        local = Path(snapshot_download(hub_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        # The hub client raises many unrelated types (offline mode, HTTP, auth, disk); all mean
        # "not available here", and the reason goes into the final message.
        raise _NotHere(f"download failed: {type(exc).__name__}: {exc}") from exc
    config, weights, found = _load_transformers_dir(local)
    return config, weights, SamSource(f"Hugging Face Hub {hub_id} (snapshot {local})", found.files)
