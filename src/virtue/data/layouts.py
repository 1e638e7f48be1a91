"""The published datasets (SCaR-Eval, SCaR-Train, MMEB-train, MMEB-eval): their hub repositories, and how their
files lie on disk once downloaded, as the readers (`virtue.train.data`, `virtue.eval.datasets`) and `virtue data`
find them.

Imports nothing heavy (no pyarrow, no torch): `virtue data --help` takes its choices (`KINDS`) from here.

SCaR
----

Five subsets (`SCAR_SUBSETS`). SCaR-Eval holds `SCaR_eval_<X>.parquet` (the official eval renames them
`SCAR_<X>_val_filtered.parquet`; both are found by `find_scar_files`); SCaR-Train holds `SCAR_<X>.parquet`, its
photos under `images/<x>_train/` beside them.

MMEB-train
----------

`TIGER-Lab/MMEB-train` as cloned: one folder per subset holding `original-0000k-of-0000n.parquet`,
`diverse_instruction-...` and `train-...` shards; only the `original` split (`MMEB_SPLIT`) is trained on
(`original_shards`). Its images are `images_zip/<Set>.zip` (`ARCHIVES_FOLDER`), unpacked into `images/`
(`IMAGES_FOLDER`) by the dataset's `unzip_file.py`. `MMEB_TRAIN_SUBSETS`: the 20 subsets of the official recipe.

MMEB-eval
---------

Two layouts are read under `--data-root`:

* **hub layout**: what `huggingface_hub.snapshot_download("TIGER-Lab/MMEB-eval", repo_type="dataset")` writes
  (also `ziyjiang/MMEB_Test_Instruct`): one folder per task holding its parquet shards,
  `<Task>/test-00000-of-00001.parquet`, and `images.zip` at the top. The dataset's parquet-converter branch
  (`refs/convert/parquet`) spells the shards `<Task>/test/0000.parquet`; both are found. Shards are read in
  name order.
* **flat layout**: one `<Task>.parquet` per task.

Images: the rows' `qry_img_path` / `tgt_img_path` are relative to the folder `images.zip` is extracted into;
every MMEB-eval recipe runs `unzip images.zip -d eval_images/` and passes `--image_dir eval_images/`. So the
default image root is `<data-root>/eval_images` when that folder exists; otherwise, with `images.zip` still
zipped, evaluation stops and says how to extract it; otherwise (flat layout) the data root itself.
`--image-root` overrides all of this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from virtue.errors import ConfigError

__all__ = [
    "ARCHIVES_FOLDER", "DATASETS", "IMAGES_FOLDER", "KINDS", "MMEB_EVAL_IMAGES", "MMEB_EVAL_ZIP", "MMEB_SPLIT",
    "MMEB_TRAIN_SUBSETS", "SCAR_SUBSETS", "HubDataset", "find_scar_files", "mmeb_image_root", "mmeb_task_files",
    "original_shards",
]  # fmt: skip


@dataclass(frozen=True)
class HubDataset:
    """One published dataset: its hub repository and the column(s) of its rows that name images."""

    kind: str
    repo_id: str
    title: str
    image_columns: tuple[str, ...]


KINDS = ("scar-eval", "scar-train", "mmeb-train", "mmeb-eval")
DATASETS: dict[str, HubDataset] = {
    "scar-eval": HubDataset("scar-eval", "Sony/SCaR-Eval", "SCaR evaluation", ("qry_image_path",)),
    "scar-train": HubDataset("scar-train", "Sony/SCaR-Train", "SCaR training", ("qry_image_path",)),
    "mmeb-train": HubDataset("mmeb-train", "TIGER-Lab/MMEB-train", "MMEB training",
                             ("qry_image_path", "pos_image_path", "neg_image_path")),
    "mmeb-eval": HubDataset("mmeb-eval", "TIGER-Lab/MMEB-eval", "MMEB evaluation", ("qry_img_path", "tgt_img_path")),
}

# SCaR photos and MMEB-train's unpacked archives; the training reader looks for images there (`virtue.train.data`).
IMAGES_FOLDER = "images"
ARCHIVES_FOLDER = "images_zip"  # MMEB-train's image archives on the hub


# ---------------------------------------------------------------------------------------------------------------
# SCaR

SCAR_SUBSETS = ("ADE20K", "COCO_Stuff", "RefCOCO_plus", "RefCOCOg", "VisualGenome")


def find_scar_files(root: Path) -> dict[str, Path]:
    """The SCaR-Eval files in `root`, keyed by the released stem (`SCaR_eval_RefCOCOg`), in `SCAR_SUBSETS` order.

    Accepts the released names `SCaR_eval_<X>.parquet` and the official eval's renamed `SCAR_<X>_val_filtered.parquet`
    (virtue-spec §5.3). Both names for one subset is an error: they could hold different versions.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"SCaR root: folder not found: {root}")
    found: dict[str, Path] = {}
    for subset in SCAR_SUBSETS:
        names = (f"SCaR_eval_{subset}.parquet", f"SCAR_{subset}_val_filtered.parquet")
        paths = [root / n for n in names if (root / n).is_file()]
        if len(paths) > 1:
            raise ConfigError(f"SCaR root {root}: both {names[0]} and {names[1]} exist; keep one")
        if paths:
            found[f"SCaR_eval_{subset}"] = paths[0]
    if not found:
        raise ConfigError(
            f"SCaR root {root}: no SCaR_eval_<X>.parquet or SCAR_<X>_val_filtered.parquet, X in {SCAR_SUBSETS}"
        )
    return found


# ---------------------------------------------------------------------------------------------------------------
# MMEB-train

# The 20 subsets of the official MMEB-train recipe (virtue-spec §5.1, `train_mmeb.yaml`).
MMEB_TRAIN_SUBSETS = (
    "ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA",
    "ChartQA", "Visual7W", "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
    "NIGHTS", "WebQA", "MSCOCO",
)  # fmt: skip
MMEB_SPLIT = "original"  # the split the official recipe trains on
_SHARD = re.compile(rf"{MMEB_SPLIT}-(\d+)-of-(\d+)\.parquet")


def original_shards(folder: Path) -> tuple[Path, ...]:
    """The `original-0000k-of-0000n.parquet` shards of a subset folder, in shard order, all n present."""
    files = sorted(folder.glob(f"{MMEB_SPLIT}-*.parquet"))
    shards: dict[int, Path] = {}
    totals = set()
    for file in files:
        match = _SHARD.fullmatch(file.name)
        if match is None:
            raise ConfigError(f"{file}: unexpected shard name; expected {MMEB_SPLIT}-<k>-of-<n>.parquet")
        shards[int(match[1])] = file
        totals.add(int(match[2]))
    if not shards:
        return ()
    total = max(totals)
    if len(totals) != 1 or sorted(shards) != list(range(total)):
        # A half-downloaded subset would otherwise train on part of its rows without a word.
        raise ConfigError(f"{folder}: incomplete or inconsistent {MMEB_SPLIT} shards {[f.name for f in files]}; "
                          f"expected {MMEB_SPLIT}-00000-of-{total:05d}.parquet ... all {total}")
    return tuple(shards[k] for k in range(total))


# ---------------------------------------------------------------------------------------------------------------
# MMEB-eval

MMEB_EVAL_IMAGES = "eval_images"  # the folder every MMEB-eval recipe extracts images.zip into
MMEB_EVAL_ZIP = "images.zip"
_HUB_PATTERNS = ("test-*.parquet", "test/*.parquet")


def mmeb_task_files(root: Path, stem: str) -> list[Path]:
    """The parquet files of task `stem` under `root` (flat or hub layout); [] when absent.

    Raises:
        ConfigError: the task is there in both layouts (they could hold different versions).
    """
    root = Path(root)
    flat = root / f"{stem}.parquet"
    folder = root / stem
    shards: list[Path] = []
    if folder.is_dir():
        for pattern in _HUB_PATTERNS:
            shards = sorted(folder.glob(pattern))
            if shards:
                break
    if shards and flat.is_file():
        raise ConfigError(f"MMEB root {root}: task {stem} is both {flat.name} and {folder.name}/{shards[0].name}; "
                          "keep one")
    return shards or ([flat] if flat.is_file() else [])


def mmeb_image_root(root: Path) -> Path:
    """The default image root of an MMEB data root (module docstring)."""
    root = Path(root)
    extracted = root / MMEB_EVAL_IMAGES
    if extracted.is_dir():
        return extracted
    if (root / MMEB_EVAL_ZIP).is_file():
        raise ConfigError(
            f"MMEB root {root}: the images are still in {MMEB_EVAL_ZIP}; extract them with "
            f"`unzip {root / MMEB_EVAL_ZIP} -d {extracted}` or pass --image-root"
        )
    return root
