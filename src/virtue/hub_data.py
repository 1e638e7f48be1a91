"""The published datasets in the layout the readers read: `fetch` (`virtue data get`) and `check` (`virtue data check`).

`fetch(kind, dest)` downloads one dataset with `huggingface_hub.snapshot_download(repo_id, repo_type="dataset",
local_dir=dest, allow_patterns=...)`: the hub repository's own layout, only the files the readers use. Running it
again resumes: files already downloaded and unchanged are kept, archives already unpacked are not written again.

* `scar-eval`: `Sony/SCaR-Eval` -> `SCaR_eval_<X>.parquet`; read by `virtue eval --benchmark scar --data-root DEST`.
* `scar-train`: `Sony/SCaR-Train` -> `SCAR_<X>.parquet`; read by the training source `{kind: scar, path: DEST}`.
* `mmeb-train`: `TIGER-Lab/MMEB-train` -> `<Subset>/original-*.parquet` and `images_zip/<Set>.zip`, unpacked into
  `images/`; read by `{kind: mmeb, path: DEST}`.
* `mmeb-eval`: `TIGER-Lab/MMEB-eval` -> `<Task>/test-*.parquet` and `images.zip`, unpacked into `eval_images/`; read
  by `virtue eval --benchmark mmeb --data-root DEST`.

X is one of ADE20K, COCO_Stuff, RefCOCO_plus, RefCOCOg, VisualGenome. `subsets` limits the download: SCaR subsets
(`RefCOCOg`, `SCAR_RefCOCOg`, or an evaluation task name such as `RefCOCO+`), MMEB-train subset folders (default: the
20 of the official recipe, `MMEB_TRAIN_SUBSETS`), MMEB-eval tasks or groups as `virtue eval --tasks` takes them
(default: all 36).

Layouts, as the hub lists them:

* `Sony/SCaR-Eval`: the five `SCaR_eval_<X>.parquet` at the top (commit 217c56d, "upload the dataset"). No images.
* `Sony/SCaR-Train`: `SCAR_<X>.parquet`, the names of the official code (github.com/sony/virtue README, "Folder
  Structure": `SCaR-train/SCAR_<X>.parquet` with `SCaR-train/images/<x>_train/`; `configs/datasets/train_scar.yaml`),
  five parquet files on the hub (its parquet conversion lists five). No images (virtue-spec §5.2). Should the hub
  spell the files otherwise, `fetch` stops and says that nothing matched.
* `TIGER-Lab/MMEB-train`: one folder per subset with `original-`, `diverse_instruction-` and `train-00000-of-00001
  .parquet`; only `original` is read for training (§5.1), so only it is downloaded. Images: `images_zip/<Set>.zip`,
  which the dataset's `unzip_file.py` unpacks with `unzip images_zip/<Set>.zip -d images/`; the rows name
  `images/<Set>/...` relative to the clone. The archives to fetch are read off the downloaded rows (`<Set>` of each
  `images/<Set>/...` path; the subset's own name when no row has that form).
* `TIGER-Lab/MMEB-eval`: `<Task>/test-00000-of-00001.parquet` per task and one `images.zip`, which every MMEB-eval
  recipe unpacks with `unzip images.zip -d eval_images/` (`virtue.eval.mmeb_layout`).

Archives are unpacked as `unzip -d` would (`unpack=False` prints the command instead); a member already there
with its size is skipped, so an interrupted unpack resumes. The archives stay where the hub put them: deleting
them would make the next `fetch` download them again.

SCaR's photos are not on the hub. `fetch` reads the downloaded rows and prints, per subset, the folders their
`qry_image_path` values name (with counts and an example), the photo set the file names belong to (COCO train2014,
COCO 2017, Visual Genome, ADE20K), where to download it, and where the folders must go: under `DEST/images/` (the
training reader looks there when `DEST/images/` exists, which `fetch` creates; `virtue eval --image-root
DEST/images` for the evaluation files, unless the rows already start with `images/`).

`check(kind, dest)` resolves every image path of every row as the reader does (`virtue.train.data.load_source` for
the training sets, which it runs without opening an image; for the evaluation sets the task files `virtue eval`
finds, `image_root / path` under the image root it would use) and reports, per subset, the rows, the images named,
and each image that is missing or whose header cannot be read (`decode=True`: that cannot be decoded fully), with
the first row and column naming it and how many other rows name it. Row ids are the readers' (`SCaR_eval_RefCOCOg
.parquet:12`, `ImageNet_1K/original-00000-of-00001.parquet:3`). For the training sets it also lists the rows the
reader drops for other reasons (empty texts, bad boxes); negatives' images are checked when `hard_negatives` asks
for negatives, as training reads them only then.
"""

from __future__ import annotations

import logging
import re
import shutil
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm.auto import tqdm

from virtue.errors import ConfigError, DataError

__all__ = ["DATASETS", "KINDS", "CheckReport", "FetchResult", "HubDataset", "Problem", "SubsetCheck", "check",
           "fetch", "resolve_subsets", "unpack"]

logger = logging.getLogger(__name__)

Say = Callable[[str], None]

KINDS = ("scar-eval", "scar-train", "mmeb-train", "mmeb-eval")
IMAGES_FOLDER = "images"  # SCaR photos and MMEB-train's unpacked archives go here, under DEST
ARCHIVES_FOLDER = "images_zip"  # MMEB-train's image archives on the hub
SHOWN_FOLDERS = 8  # photo folders printed per SCaR subset


@dataclass(frozen=True)
class HubDataset:
    """One published dataset: its hub repository and the column(s) of its rows that name images."""

    kind: str
    repo_id: str
    title: str
    image_columns: tuple[str, ...]


DATASETS: dict[str, HubDataset] = {
    "scar-eval": HubDataset("scar-eval", "Sony/SCaR-Eval", "SCaR evaluation", ("qry_image_path",)),
    "scar-train": HubDataset("scar-train", "Sony/SCaR-Train", "SCaR training", ("qry_image_path",)),
    "mmeb-train": HubDataset("mmeb-train", "TIGER-Lab/MMEB-train", "MMEB training",
                             ("qry_image_path", "pos_image_path", "neg_image_path")),
    "mmeb-eval": HubDataset("mmeb-eval", "TIGER-Lab/MMEB-eval", "MMEB evaluation", ("qry_img_path", "tgt_img_path")),
}

# Where SCaR's photos come from (virtue-spec §5.2: "fetched from RefCOCO+, RefCOCOg, COCO-Stuff, VisualGenome and
# ADE20K"); the file names in the rows say which set of each (`_PHOTO_NAMES`).
_COCO = "http://images.cocodataset.org/zips/"
SCAR_PHOTO_SOURCES: dict[str, str] = {
    "RefCOCO_plus": f"RefCOCO+ marks regions on COCO 2014 training photos: train2014 ({_COCO}train2014.zip)",
    "RefCOCOg": f"RefCOCOg marks regions on COCO 2014 training photos: train2014 ({_COCO}train2014.zip)",
    "COCO_Stuff": f"COCO-Stuff labels the COCO 2017 photos: train2017 / val2017 ({_COCO}train2017.zip, "
                  f"{_COCO}val2017.zip)",
    "VisualGenome": "Visual Genome photos: VG_100K and VG_100K_2 (https://cs.stanford.edu/people/rak248/VG_100K_2/"
                    "images.zip and images2.zip)",
    "ADE20K": "ADE20K photos: the scene-parsing release holds them in images/training and images/validation "
              "(http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip)",
}
_PHOTO_NAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"COCO_train2014_\d+\.jpg"), "COCO train2014"),
    (re.compile(r"COCO_val2014_\d+\.jpg"), "COCO val2014"),
    (re.compile(r"\d{12}\.jpg"), "COCO 2017 (train2017 / val2017: the 2014 photos, renamed)"),
    (re.compile(r"ADE_train_\d+\.jpg"), "ADE20K training"),
    (re.compile(r"ADE_val_\d+\.jpg"), "ADE20K validation"),
    (re.compile(r"\d{1,8}\.jpg"), "Visual Genome (VG_100K / VG_100K_2)"),
)


# ---------------------------------------------------------------------------------------------------------------
# Subsets


def _scar_suffixes() -> tuple[str, ...]:
    from virtue.eval.datasets import SCAR_SUBSETS

    return SCAR_SUBSETS


def resolve_subsets(kind: str, names: Sequence[str] | None) -> tuple[str, ...] | None:
    """The subsets `names` as the hub names them, in order, without repeats.

    SCaR: file suffixes (`RefCOCOg`, `RefCOCO_plus`), from a suffix, a file stem (`SCAR_RefCOCOg`, `SCaR_eval_RefCOCOg`)
    or an evaluation task name or group (`RefCOCO+`, `SCaR`). MMEB-train: subset folder names, as given. MMEB-eval:
    task names (the folders), from task names or groups as `virtue eval --tasks` takes them. None stays None (every
    subset; `fetch` then takes `default_subsets`).
    """
    _check_kind(kind)
    if names is None:
        return None
    if isinstance(names, str) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"subsets: expected a non-empty list of names, got {names!r}")
    if kind == "mmeb-train":
        return tuple(dict.fromkeys(n.strip() for n in names))
    from virtue.eval.tasks import get_tasks

    if kind == "mmeb-eval":
        return tuple(dict.fromkeys(t.file_stem for t in get_tasks(list(names), benchmark="mmeb")))
    suffixes = _scar_suffixes()
    chosen: list[str] = []
    for name in names:
        key = name.strip()
        for prefix in ("SCaR_eval_", "SCAR_"):
            key = key.removeprefix(prefix)
        key = key.removesuffix("_val_filtered")
        if key in suffixes:
            chosen.append(key)
            continue
        try:
            tasks = get_tasks([name], benchmark="scar")
        except ConfigError:
            raise ConfigError(f"subsets: unknown SCaR subset {name!r}; expected one of {list(suffixes)} (or a task "
                              "name such as RefCOCO+)") from None
        chosen.extend(t.file_stem.removeprefix("SCaR_eval_") for t in tasks)
    return tuple(dict.fromkeys(chosen))


def default_subsets(kind: str) -> tuple[str, ...]:
    """What `fetch` downloads when no subset is named: every SCaR subset, MMEB-train's 20 recipe subsets, the 36
    MMEB-eval tasks."""
    _check_kind(kind)
    if kind in ("scar-eval", "scar-train"):
        return _scar_suffixes()
    if kind == "mmeb-train":
        from virtue.train.data import MMEB_TRAIN_SUBSETS

        return MMEB_TRAIN_SUBSETS
    from virtue.eval.tasks import get_tasks

    return tuple(t.file_stem for t in get_tasks(None, benchmark="mmeb"))


def _check_kind(kind: str) -> None:
    if kind not in DATASETS:
        raise ConfigError(f"dataset: expected one of {list(KINDS)}, got {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# Download


@dataclass
class PhotoFolder:
    """A folder that a SCaR subset's rows name photos in (relative to the image root), and where it must go."""

    folder: str
    photos: int
    example: str
    place: Path
    photo_set: str | None = None


@dataclass
class FetchResult:
    kind: str
    dest: Path
    repo_id: str
    subsets: tuple[str, ...]
    patterns: list[str] = field(default_factory=list)
    missing_subsets: list[str] = field(default_factory=list)
    archives: list[Path] = field(default_factory=list)
    missing_archives: list[str] = field(default_factory=list)
    unpacked: dict[str, int] = field(default_factory=dict)  # archive -> files written
    photo_folders: dict[str, list[PhotoFolder]] = field(default_factory=dict)  # SCaR subset file -> folders
    image_root: Path | None = None  # what `virtue eval --image-root` / `data check --image-root` needs, if anything


def fetch(
    kind: str,
    dest: str | Path,
    *,
    subsets: Sequence[str] | None = None,
    images: bool = True,
    unpack_archives: bool = True,
    revision: str | None = None,
    repo_id: str | None = None,
    progress: bool = True,
    say: Say = print,
) -> FetchResult:
    """Download dataset `kind` into `dest` in the hub's layout (module docstring) and say what to do next.

    subsets: limit the download (`resolve_subsets`); without it, `default_subsets`. A named subset the hub does
        not hold is an error; one of the defaults, a warning.
    images: also download the image archives the hub holds (MMEB); False skips them and says which to fetch.
    unpack_archives: unpack them where the readers look; False prints the `unzip` commands instead.
    repo_id: another repository with the same layout (a mirror, a fork).
    """
    _check_kind(kind)
    spec = DATASETS[kind]
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"{kind}: {dest} exists and is not a folder")
    named = resolve_subsets(kind, subsets)
    chosen = named if named is not None else default_subsets(kind)
    result = FetchResult(kind, dest, repo_id or spec.repo_id, chosen)
    dest.mkdir(parents=True, exist_ok=True)
    result.patterns = _parquet_patterns(kind, chosen)
    if kind == "mmeb-eval" and images:
        result.patterns.append(_mmeb_eval_zip())
    _snapshot(result.repo_id, dest, result.patterns, revision, say)
    found = _present_subsets(kind, dest, chosen)
    result.missing_subsets = [s for s in chosen if s not in found]
    if not found:
        asked = result.patterns if len(result.patterns) <= 6 else [*result.patterns[:3], "..."]
        raise DataError(f"{result.repo_id}: no file matched {asked} in the repository; its layout may have changed "
                        "(see `virtue.hub_data`)")
    if result.missing_subsets:
        message = f"{result.repo_id} holds no files for {result.missing_subsets}"
        if named is not None:
            raise DataError(f"{message}; it holds {sorted(found)} of those asked for")
        say(f"warning: {message}; fetched the other {len(found)}")
    if kind in ("scar-eval", "scar-train"):
        _scar_photos(result, found, say)
    elif kind == "mmeb-train":
        _mmeb_train_images(result, found, images, unpack_archives, revision, progress, say)
    else:
        _mmeb_eval_images(result, images, unpack_archives, progress, say)
    _say_next(result, say)
    return result


def _parquet_patterns(kind: str, subsets: Sequence[str]) -> list[str]:
    if kind == "scar-eval":
        return [f"SCaR_eval_{s}.parquet" for s in subsets]
    if kind == "scar-train":
        return [f"SCAR_{s}.parquet" for s in subsets]
    if kind == "mmeb-train":
        from virtue.train.data import MMEB_SPLIT

        return [f"{s}/{MMEB_SPLIT}-*.parquet" for s in subsets]
    return [f"{s}/test-*.parquet" for s in subsets]


def _mmeb_eval_zip() -> str:
    from virtue.eval.mmeb_layout import IMAGES_ZIP

    return IMAGES_ZIP


def _snapshot(repo_id: str, dest: Path, patterns: Sequence[str], revision: str | None, say: Say) -> None:
    import huggingface_hub  # looked up at call time, so that tests can replace `snapshot_download`

    shown = " ".join(patterns) if len(patterns) <= 6 else f"{' '.join(patterns[:3])} ... ({len(patterns)} patterns)"
    say(f"{repo_id} -> {dest}: {shown}")
    try:
        huggingface_hub.snapshot_download(repo_id, repo_type="dataset", revision=revision, local_dir=dest,
                                          allow_patterns=list(patterns))
    except Exception as exc:  # network, authentication, disk: whatever it is, running again resumes
        raise DataError(f"downloading {repo_id} into {dest} failed ({type(exc).__name__}: {exc}); the files already "
                        "downloaded are kept: run the same command again to resume") from exc


def _present_subsets(kind: str, dest: Path, subsets: Sequence[str]) -> dict[str, list[Path]]:
    """The subsets whose files are in `dest`, with their parquet files, as the readers find them."""
    found: dict[str, list[Path]] = {}
    for subset in subsets:
        if kind == "scar-eval":
            files = [dest / f"SCaR_eval_{subset}.parquet"]
        elif kind == "scar-train":
            files = [dest / f"SCAR_{subset}.parquet"]
        elif kind == "mmeb-train":
            from virtue.train.data import _original_shards

            files = list(_original_shards(dest / subset))
        else:
            from virtue.eval.mmeb_layout import mmeb_task_files

            files = mmeb_task_files(dest, subset)
        files = [f for f in files if f.is_file()]
        if files:
            found[subset] = files
    return found


def _scar_photos(result: FetchResult, found: dict[str, list[Path]], say: Say) -> None:
    """Say where each subset's photos come from and where their folders must go (module docstring)."""
    dest = result.dest
    (dest / IMAGES_FOLDER).mkdir(exist_ok=True)  # the training reader resolves rows under it once it exists
    values = {subset: _unique_paths(files, "qry_image_path") for subset, files in found.items()}
    prefixed = sum(_under_images(v) for paths in values.values() for v in paths)
    total = sum(len(paths) for paths in values.values())
    if result.kind == "scar-eval":
        # `virtue eval` joins --image-root (default: --data-root) and the row's path.
        root = dest if total and prefixed == total else dest / IMAGES_FOLDER
        result.image_root = None if root == dest else root
    say(f"{result.repo_id} holds no photos: put them under {dest / IMAGES_FOLDER}, in the folders below")
    for subset, paths in values.items():
        name = found[subset][0].name
        folders = _photo_folders(paths, lambda v, r=result: _scar_place(r, v))
        result.photo_folders[name] = folders
        say(f"{name}: {len(paths):,} photos. {SCAR_PHOTO_SOURCES.get(subset, 'source unknown')}")
        for f in folders[:SHOWN_FOLDERS]:
            kind = f"; file names of {f.photo_set}" if f.photo_set else ""
            say(f"  {f.folder}/  {f.photos:,} photos, e.g. {f.example}{kind}  ->  {f.place}/")
        if len(folders) > SHOWN_FOLDERS:
            say(f"  ... and {len(folders) - SHOWN_FOLDERS} more folders")


def _under_images(value: str) -> bool:
    return PurePosixPath(value).parts[:1] == (IMAGES_FOLDER,)


def _scar_place(result: FetchResult, value: str) -> Path:
    """Where the photo a SCaR row names must be: the training reader's rule (`virtue.train.data`, "Where images are
    found": under `DEST/images/` unless the path starts with `images/`), or `virtue eval`'s (`image_root / path`)."""
    if result.kind == "scar-eval":
        return (result.image_root or result.dest) / value
    return result.dest / value if _under_images(value) else result.dest / IMAGES_FOLDER / value


def _photo_folders(paths: Sequence[str], place: Callable[[str], Path]) -> list[PhotoFolder]:
    by_folder: dict[str, list[str]] = {}
    for value in paths:
        by_folder.setdefault(str(PurePosixPath(value).parent), []).append(value)
    folders = []
    for folder, values in sorted(by_folder.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        folders.append(PhotoFolder(folder, len(values), values[0], place(values[0]).parent, _photo_set(values)))
    return folders


def _photo_set(values: Sequence[str]) -> str | None:
    """The photo set whose file names most of `values` have (90 % or more), if any."""
    names = Counter()
    for value in values:
        base = PurePosixPath(value).name
        for pattern, label in _PHOTO_NAMES:
            if pattern.fullmatch(base):
                names[label] += 1
                break
    if not names:
        return None
    label, count = names.most_common(1)[0]
    return label if count >= 0.9 * len(values) else None


def _mmeb_train_images(
    result: FetchResult, found: dict[str, list[Path]], images: bool, unpack_archives: bool, revision: str | None,
    progress: bool, say: Say,
) -> None:
    dest = result.dest
    sets = _mmeb_train_sets(found)
    patterns = [f"{ARCHIVES_FOLDER}/{s}.zip" for s in sets]
    if not images:
        say(f"images not downloaded (--no-images); the rows name images in {', '.join(sets)}: fetch "
            f"{' '.join(patterns)} from {result.repo_id} and unpack them into {dest / IMAGES_FOLDER}/")
        return
    _snapshot(result.repo_id, dest, patterns, revision, say)
    result.archives = [dest / p for p in patterns if (dest / p).is_file()]
    result.missing_archives = [p for p in patterns if not (dest / p).is_file()]
    if result.missing_archives:
        say(f"warning: {result.repo_id} holds no {', '.join(result.missing_archives)}; the rows naming those images "
            "will be missing (virtue data check lists them)")
    _unpack_all(result, dest / IMAGES_FOLDER, unpack_archives, progress, say)


def _mmeb_train_sets(found: dict[str, list[Path]]) -> list[str]:
    """The image archives the rows need: `<Set>` of every `images/<Set>/...` path, or the subset's name when none of
    its rows has that form."""
    sets: dict[str, None] = {}
    columns = DATASETS["mmeb-train"].image_columns
    for subset, files in found.items():
        named = {PurePosixPath(v).parts[1] for f in files for v in _unique_paths([f], *columns)
                 if _under_images(v) and len(PurePosixPath(v).parts) > 2}
        for name in sorted(named) or [subset]:
            sets[name] = None
    return list(sets)


def _mmeb_eval_images(result: FetchResult, images: bool, unpack_archives: bool, progress: bool, say: Say) -> None:
    from virtue.eval.mmeb_layout import IMAGE_FOLDER, IMAGES_ZIP

    dest = result.dest
    if not images:
        say(f"images not downloaded (--no-images): fetch {IMAGES_ZIP} from {result.repo_id} and unpack it into "
            f"{dest / IMAGE_FOLDER}/")
        return
    archive = dest / IMAGES_ZIP
    if not archive.is_file():
        result.missing_archives = [IMAGES_ZIP]
        say(f"warning: {result.repo_id} holds no {IMAGES_ZIP}; pass --image-root to the folder holding its images")
        return
    result.archives = [archive]
    _unpack_all(result, dest / IMAGE_FOLDER, unpack_archives, progress, say)


def _unpack_all(result: FetchResult, into: Path, unpack_archives: bool, progress: bool, say: Say) -> None:
    for archive in result.archives:
        if not unpack_archives:
            say(f"unpack with: unzip -n {archive} -d {into}/")
            continue
        written = unpack(archive, into, progress=progress)
        result.unpacked[str(archive)] = written
        say(f"{archive.name} -> {into}/: {written:,} files written" + ("" if written else " (all already there)"))


def unpack(archive: str | Path, into: str | Path, *, progress: bool = True) -> int:
    """Extract a zip archive into `into` as `unzip ARCHIVE -d INTO` does; returns the number of files written.

    A member already there with its size is skipped, so an interrupted unpack resumes where it stopped. A member
    that would land outside `into` (`../`, absolute paths) is an error.
    """
    archive, into = Path(archive), Path(into)
    into.mkdir(parents=True, exist_ok=True)
    root = into.resolve()
    written = 0
    try:
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            for member in tqdm(members, desc=f"unpack {archive.name}", unit="file", disable=not progress):
                target = (root / member.filename).resolve()
                if not target.is_relative_to(root):
                    raise DataError(f"{archive}: member {member.filename!r} would be written outside {into}")
                if target.is_file() and target.stat().st_size == member.file_size:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(member) as source, target.open("wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                written += 1
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{archive}: cannot unpack ({exc}); delete the archive and fetch it again") from exc
    return written


def _say_next(result: FetchResult, say: Say) -> None:
    dest = result.dest
    root = f" --image-root {result.image_root}" if result.image_root else ""
    say("next:")
    say(f"  virtue data check {result.kind} {dest}{root}")
    if result.kind == "scar-eval":
        say(f"  virtue eval --model M --benchmark scar --data-root {dest}{root}")
    elif result.kind == "mmeb-eval":
        say(f"  virtue eval --model M --benchmark mmeb --data-root {dest}")
    else:
        source = "scar" if result.kind == "scar-train" else "mmeb"
        say(f"  training config: data.sources: [{{kind: {source}, path: {dest}}}]")


# ---------------------------------------------------------------------------------------------------------------
# Rows' image paths


def _row_values(
    files: Sequence[Path],
    columns: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    required: Sequence[str] = (),
    limit: int | None = None,
) -> Iterator[tuple[str, list[tuple[str, Any]]]]:
    """Per row of the parquet files, read as `virtue.eval.datasets` reads them (row ids `<label>:<row>`, label
    default the file name; `limit` rows over all files; `required` columns, a `DataError` when one is missing), its
    id and the (column, value) pairs of `columns` present in the file; a list column gives one pair per item, named
    `column[k]`."""
    from virtue.eval.datasets import _open_parquet, _rows, _Source

    labels = [f.name for f in files] if labels is None else labels
    sources = []
    for file, label in zip(files, labels, strict=True):
        parquet, present = _open_parquet(file, required, [c for c in columns if c not in required])
        sources.append(_Source(parquet, present, label))
    for row_id, row in _rows(sources, limit):
        pairs: list[tuple[str, Any]] = []
        for column in columns:
            if column not in row:
                continue
            value = row[column]
            if isinstance(value, list):
                pairs.extend((f"{column}[{k}]", item) for k, item in enumerate(value))
            else:
                pairs.append((column, value))
        yield row_id, pairs


def _unique_paths(files: Iterable[Path], *columns: str) -> list[str]:
    """The distinct non-empty string paths of `columns`, in row order."""
    seen: dict[str, None] = {}
    for _, pairs in _row_values(list(files), columns):
        for _, value in pairs:
            if isinstance(value, str) and value.strip():
                seen.setdefault(value, None)
    return list(seen)


# ---------------------------------------------------------------------------------------------------------------
# Check


@dataclass(frozen=True)
class Problem:
    """An image that a row names and that cannot be used.

    kind: "missing" (no such file), "unreadable" (its header, or with `decode` its pixels, cannot be read) or
        "bad path" (the row's value is not an image path).
    row_id / column: the first row naming it; `other_rows`: how many more references name it.
    """

    kind: str
    subset: str
    row_id: str
    column: str
    path: str
    reason: str
    other_rows: int = 0

    def __str__(self) -> str:
        more = f" (and {self.other_rows} more reference{'s' if self.other_rows > 1 else ''})" if self.other_rows else ""
        return f"{self.kind}: {self.subset} row {self.row_id}, column {self.column!r}: {self.reason}{more}"


@dataclass
class SubsetCheck:
    """One subset's rows and images, and what is wrong with them."""

    name: str
    rows: int = 0
    references: int = 0
    images: int = 0
    problems: list[Problem] = field(default_factory=list)
    missing_folders: dict[str, int] = field(default_factory=dict)  # folder not found -> images named in it
    dropped_rows: list[Any] = field(default_factory=list)  # `BadRow`s a training reader drops for other reasons

    def count(self, kind: str) -> int:
        return sum(p.kind == kind for p in self.problems)


@dataclass
class CheckReport:
    kind: str
    dest: Path
    image_root: Path | None
    decode: bool
    subsets: list[SubsetCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(s.problems for s in self.subsets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.kind, "dest": str(self.dest),
            "image_root": None if self.image_root is None else str(self.image_root), "decode": self.decode,
            "ok": self.ok,
            "subsets": [{
                "name": s.name, "rows": s.rows, "image_references": s.references, "images": s.images,
                "missing": s.count("missing"), "unreadable": s.count("unreadable"), "bad_paths": s.count("bad path"),
                "missing_folders": s.missing_folders,
                "problems": [p.__dict__ for p in s.problems],
                "dropped_rows": [b.__dict__ for b in s.dropped_rows],
            } for s in self.subsets],
        }  # fmt: skip


# A reference: (row id, column, resolved image path, or None with the reason the value is not a path).
_Ref = tuple[str, str, Path | None, str]


def check(
    kind: str,
    dest: str | Path,
    *,
    image_root: str | Path | None = None,
    subsets: Sequence[str] | None = None,
    decode: bool = False,
    hard_negatives: int = 0,
    limit: int | None = None,
    workers: int = 8,
    progress: bool = True,
) -> CheckReport:
    """Every image the rows of dataset `kind` under `dest` name, checked as the readers would find it (module
    docstring).

    image_root: as the reader's (`--image-root`, `image_root:`); default the reader's default.
    subsets: the subsets to check (`resolve_subsets`); default every one found under `dest`.
    decode: decode every image fully instead of reading its header (slower; finds truncated files).
    hard_negatives: training sets: also check the first N negatives' images, as training with N negatives reads.
    limit: the first N rows of each subset (training sets: N good rows, as the reader's `limit`).
    workers: threads reading images.
    """
    _check_kind(kind)
    dest = Path(dest)
    if not dest.is_dir():
        raise ConfigError(f"{kind}: folder not found: {dest}")
    if workers < 1:
        raise ConfigError(f"workers: expected an integer >= 1, got {workers}")
    named = resolve_subsets(kind, subsets)
    root = Path(image_root) if image_root is not None else None
    report = CheckReport(kind, dest, root, decode)
    if kind in ("scar-train", "mmeb-train"):
        parts = _train_references(kind, dest, root, named, hard_negatives, limit)
    else:
        parts = _eval_references(kind, dest, root, named, limit)
    for subset, refs in parts:
        _check_subset(subset, refs, decode, workers, progress)
        report.subsets.append(subset)
    return report


def _train_references(
    kind: str, dest: Path, image_root: Path | None, subsets: tuple[str, ...] | None, hard_negatives: int,
    limit: int | None,
) -> Iterator[tuple[SubsetCheck, Iterator[_Ref]]]:
    """The training reader's own rows and resolved paths: `load_source(..., check_images=False)` opens no image and
    leaves each row's image checks on the example (`DeferredCheck`s without a prompt part: the files)."""
    from virtue.train.data import DataSource, load_source

    if kind == "scar-train" and subsets is not None:
        subsets = tuple(f"SCAR_{s}" for s in subsets)
    source = DataSource(kind="scar" if kind == "scar-train" else "mmeb", path=str(dest),
                        image_root=None if image_root is None else str(image_root), subsets=subsets,
                        hard_negatives=hard_negatives, limit=limit)
    for subset in load_source(source, on_bad_row="skip", check_images=False):
        refs = ((e.row_id, c.column, c.image, "") for e in subset.examples for c in e.deferred if c.part is None)
        rows = len(subset.examples) + len(subset.bad_rows)
        yield SubsetCheck(subset.name, rows=rows, dropped_rows=list(subset.bad_rows)), refs


def _eval_references(
    kind: str, dest: Path, image_root: Path | None, subsets: tuple[str, ...] | None, limit: int | None
) -> Iterator[tuple[SubsetCheck, Iterator[_Ref]]]:
    """The task files `virtue eval` finds under `dest` (`available_tasks`) and its image root (`--image-root`, else
    SCaR: the data root; MMEB: `mmeb_image_root`), each row's path joined to it as the evaluation reader does."""
    from virtue.eval.runner import EvalConfig, available_tasks, task_files

    benchmark = "scar" if kind == "scar-eval" else "mmeb"
    cfg = EvalConfig(benchmark=benchmark, data_root=str(dest), tasks=subsets,
                     image_root=None if image_root is None else str(image_root))
    for task in available_tasks(cfg):
        files, root = task_files(task, cfg)
        labels = [files[0].name] if benchmark == "scar" else [f.relative_to(dest).as_posix() for f in files]
        subset = SubsetCheck(task.name)
        yield subset, _eval_refs(subset, files, labels, root, benchmark, limit)


def _eval_refs(
    subset: SubsetCheck, files: Sequence[Path], labels: Sequence[str], root: Path, benchmark: str, limit: int | None
) -> Iterator[_Ref]:
    """Row ids `<label>:<row>` counted per file, `limit` over all files, as `virtue.eval.datasets` counts them."""
    columns = DATASETS["scar-eval" if benchmark == "scar" else "mmeb-eval"].image_columns
    for row_id, pairs in _row_values(files, columns, labels=labels, required=columns[:1], limit=limit):
        subset.rows += 1
        for column, value in pairs:
            if isinstance(value, str) and value.strip():
                yield row_id, column, root / value, ""
            elif benchmark == "scar":  # a SCaR query always has an image; an empty MMEB path is a text-only side
                yield row_id, column, None, f"expected an image path, got {value!r}"
            elif value is not None and not isinstance(value, str):
                yield row_id, column, None, f"expected an image path or '', got {value!r}"


def _check_subset(subset: SubsetCheck, refs: Iterator[_Ref], decode: bool, workers: int, progress: bool) -> None:
    first: dict[Path, tuple[str, str]] = {}
    counts: Counter[Path] = Counter()
    bad_values: list[Problem] = []
    for row_id, column, path, reason in refs:
        subset.references += 1
        if path is None:
            bad_values.append(Problem("bad path", subset.name, row_id, column, "", reason))
            continue
        first.setdefault(path, (row_id, column))
        counts[path] += 1
    subset.images = len(first)
    inspect = _decode_failure if decode else _header_failure
    paths = list(first)
    with ThreadPoolExecutor(workers) as pool:
        failures = list(tqdm(pool.map(inspect, paths), total=len(paths), desc=f"check {subset.name}", unit="img",
                             disable=not progress or not paths, leave=False))
    problems = list(bad_values)
    for path, failure in zip(paths, failures, strict=True):
        if failure is None:
            continue
        kind, reason = failure
        row_id, column = first[path]
        problems.append(Problem(kind, subset.name, row_id, column, str(path), reason, counts[path] - 1))
        if kind == "missing" and not path.parent.is_dir():
            subset.missing_folders[str(path.parent)] = subset.missing_folders.get(str(path.parent), 0) + 1
    subset.problems = problems


def _header_failure(path: Path) -> tuple[str, str] | None:
    """The readers' own check (`virtue.rows.read_image_size`): the file exists and its header gives a size."""
    from virtue.rows import read_image_size

    size = read_image_size(path)
    if isinstance(size, str):
        return ("missing" if not path.is_file() else "unreadable"), size
    return None


def _decode_failure(path: Path) -> tuple[str, str] | None:
    """The header check, then every pixel decoded (`virtue.processing.images.load_image`)."""
    from virtue.errors import ImageError
    from virtue.processing.images import load_image

    failure = _header_failure(path)
    if failure is not None:
        return failure
    try:
        load_image(path, str(path)).close()
    except ImageError as exc:
        return "unreadable", str(exc)
    return None
