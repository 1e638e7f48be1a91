"""Where the MMEB-eval files of a task are, and where their images are.

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

from pathlib import Path

from virtue.errors import ConfigError

IMAGE_FOLDER = "eval_images"
IMAGES_ZIP = "images.zip"
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
    extracted = root / IMAGE_FOLDER
    if extracted.is_dir():
        return extracted
    if (root / IMAGES_ZIP).is_file():
        raise ConfigError(
            f"MMEB root {root}: the images are still in {IMAGES_ZIP}; extract them with "
            f"`unzip {root / IMAGES_ZIP} -d {extracted}` or pass --image-root"
        )
    return root
