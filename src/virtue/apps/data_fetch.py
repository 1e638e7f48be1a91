"""`virtue data get DATASET DEST`: the published datasets downloaded in the layout the readers read (`fetch`).

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
  recipe unpacks with `unzip images.zip -d eval_images/` (`virtue.data.layouts`).

Archives are unpacked as `unzip -d` would (`unpack=False` prints the command instead); a member already there
with its size is skipped, so an interrupted unpack resumes. The archives stay where the hub put them: deleting
them would make the next `fetch` download them again.

SCaR's photos are not on the hub. `fetch` reads the downloaded rows and prints, per subset, the folders their
`qry_image_path` values name (with counts and an example), the photo set the file names belong to (COCO train2014,
COCO 2017, Visual Genome, ADE20K), where to download it, and where the folders must go: under `DEST/images/` (the
training reader looks there when `DEST/images/` exists, which `fetch` creates; `virtue eval --image-root
DEST/images` for the evaluation files, unless the rows already start with `images/`).

`virtue data check` (`virtue.apps.data_check`) then lists the images the rows name that are missing or unreadable.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from virtue.data.layouts import (
    ARCHIVES_FOLDER,
    DATASETS,
    IMAGES_FOLDER,
    KINDS,
    MMEB_EVAL_IMAGES,
    MMEB_EVAL_ZIP,
    MMEB_SPLIT,
    MMEB_TRAIN_SUBSETS,
    SCAR_SUBSETS,
    mmeb_task_files,
    original_shards,
)
from virtue.data.parquet import unique_paths
from virtue.errors import ConfigError, DataError

__all__ = ["FetchResult", "PhotoFolder", "check_kind", "default_subsets", "fetch", "resolve_subsets", "unpack"]

Say = Callable[[str], None]

SHOWN_FOLDERS = 8  # photo folders printed per SCaR subset


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


def resolve_subsets(kind: str, names: Sequence[str] | None) -> tuple[str, ...] | None:
    """The subsets `names` as the hub names them, in order, without repeats.

    SCaR: file suffixes (`RefCOCOg`, `RefCOCO_plus`), from a suffix, a file stem (`SCAR_RefCOCOg`, `SCaR_eval_RefCOCOg`)
    or an evaluation task name or group (`RefCOCO+`, `SCaR`). MMEB-train: subset folder names, as given. MMEB-eval:
    task names (the folders), from task names or groups as `virtue eval --tasks` takes them. None stays None (every
    subset; `fetch` then takes `default_subsets`).
    """
    check_kind(kind)
    if names is None:
        return None
    if isinstance(names, str) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"subsets: expected a non-empty list of names, got {names!r}")
    if kind == "mmeb-train":
        return tuple(dict.fromkeys(n.strip() for n in names))
    from virtue.eval.tasks import get_tasks

    if kind == "mmeb-eval":
        return tuple(dict.fromkeys(t.file_stem for t in get_tasks(list(names), benchmark="mmeb")))
    suffixes = SCAR_SUBSETS
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
    check_kind(kind)
    if kind in ("scar-eval", "scar-train"):
        return SCAR_SUBSETS
    if kind == "mmeb-train":
        return MMEB_TRAIN_SUBSETS
    from virtue.eval.tasks import get_tasks

    return tuple(t.file_stem for t in get_tasks(None, benchmark="mmeb"))


def check_kind(kind: str) -> None:
    """ConfigError unless `kind` is one of `KINDS`."""
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
    check_kind(kind)
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
        result.patterns.append(MMEB_EVAL_ZIP)
    _snapshot(result.repo_id, dest, result.patterns, revision, say)
    found = _present_subsets(kind, dest, chosen)
    result.missing_subsets = [s for s in chosen if s not in found]
    if not found:
        asked = result.patterns if len(result.patterns) <= 6 else [*result.patterns[:3], "..."]
        raise DataError(f"{result.repo_id}: no file matched {asked} in the repository; its layout may have changed "
                        "(see `virtue.apps.data_fetch`)")
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
        return [f"{s}/{MMEB_SPLIT}-*.parquet" for s in subsets]
    return [f"{s}/test-*.parquet" for s in subsets]


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
            files = list(original_shards(dest / subset))
        else:
            files = mmeb_task_files(dest, subset)
        files = [f for f in files if f.is_file()]
        if files:
            found[subset] = files
    return found


def _scar_photos(result: FetchResult, found: dict[str, list[Path]], say: Say) -> None:
    """Say where each subset's photos come from and where their folders must go (module docstring)."""
    dest = result.dest
    (dest / IMAGES_FOLDER).mkdir(exist_ok=True)  # the training reader resolves rows under it once it exists
    values = {subset: unique_paths(files, "qry_image_path") for subset, files in found.items()}
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
        named = {PurePosixPath(v).parts[1] for f in files for v in unique_paths([f], *columns)
                 if _under_images(v) and len(PurePosixPath(v).parts) > 2}
        for name in sorted(named) or [subset]:
            sets[name] = None
    return list(sets)


def _mmeb_eval_images(result: FetchResult, images: bool, unpack_archives: bool, progress: bool, say: Say) -> None:
    dest = result.dest
    if not images:
        say(f"images not downloaded (--no-images): fetch {MMEB_EVAL_ZIP} from {result.repo_id} and unpack it into "
            f"{dest / MMEB_EVAL_IMAGES}/")
        return
    archive = dest / MMEB_EVAL_ZIP
    if not archive.is_file():
        result.missing_archives = [MMEB_EVAL_ZIP]
        say(f"warning: {result.repo_id} holds no {MMEB_EVAL_ZIP}; pass --image-root to the folder holding its images")
        return
    result.archives = [archive]
    _unpack_all(result, dest / MMEB_EVAL_IMAGES, unpack_archives, progress, say)


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
