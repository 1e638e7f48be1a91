"""`virtue data get` / `virtue data check`, with `huggingface_hub.snapshot_download` replaced by a function that copies
the files of a small hub-layout repository matching `allow_patterns` (the only stub): `virtue eval` and `virtue train`
then read DEST as it is, and `data check` names every missing or corrupt image with its subset and row."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from tests.conftest import FIXTURE, MINI_SCAR
from virtue.apps.data_fetch import unpack
from virtue.cli.main import main
from virtue.errors import DataError

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "grey": (120, 120, 120)}


# ---------------------------------------------------------------------------------------------------------------
# A fake hub: one folder per repository, in the repositories' own layouts (virtue.apps.data_fetch's docstring)


class FakeHub:
    """Stands in for `huggingface_hub.snapshot_download`: records each call and copies the matching files of
    `root/<repo_id>` into `local_dir`, with the `.cache/huggingface/` folder the real function leaves there."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[dict] = []

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    def __call__(self, repo_id, *, repo_type=None, revision=None, local_dir=None, allow_patterns=None, **kwargs):
        self.calls.append({"repo_id": repo_id, "repo_type": repo_type, "allow_patterns": list(allow_patterns)})
        assert repo_type == "dataset" and local_dir is not None and not kwargs
        repo = self.repo(repo_id)
        files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            target = Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(repo / name, target)
            meta = Path(local_dir) / ".cache/huggingface/download" / f"{name}.metadata"
            meta.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text("fake\n")
        return str(local_dir)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    import huggingface_hub

    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _png(colour) -> bytes:
    from io import BytesIO

    out = BytesIO()
    Image.new("RGB", (40, 32), colour).save(out, format="PNG")
    return out.getvalue()


def _mini_scar_rows() -> list[dict]:
    return pq.read_table(MINI_SCAR / "mini_scar.parquet").to_pylist()


def _renamed(rows: list[dict], folder: str) -> list[dict]:
    """mini-SCaR rows (`images/<name>.jpg`) naming their photos in `folder` instead."""
    return [{**r, "qry_image_path": f"{folder}/{Path(r['qry_image_path']).name}"} for r in rows]


def _scar_eval_repo(hub: FakeHub) -> None:
    repo = hub.repo("Sony/SCaR-Eval")
    rows = _mini_scar_rows()
    _write(repo / "SCaR_eval_RefCOCOg.parquet", _renamed(rows, "refcocog_val"))
    _write(repo / "SCaR_eval_ADE20K.parquet", _renamed(rows[:6], "ade20k_val"))
    (repo / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")


def _scar_train_repo(hub: FakeHub) -> None:
    repo = hub.repo("Sony/SCaR-Train")
    train = [{"qry": r["qry_text"], "qry_image_path": f"refcocog_train/{Path(r['qry_image_path']).name}",
              "pos_text": r["tgt_text"][0], "pos_image_path": None, "neg_text": r["tgt_text"][1:],
              "bbox": r["bbox"], "segmentation": None, "category": r["category"], "image_id": r["image_id"]}
             for r in _mini_scar_rows()[:8]]
    train[2]["pos_text"] = "  "  # a row the reader drops for its text, not its image
    _write(repo / "SCAR_RefCOCOg.parquet", train)
    (repo / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")


def _mmeb_train_repo(hub: FakeHub) -> None:
    """Two of the recipe's subsets and one more, each with its three splits; the MSCOCO_i2t rows name images of
    the `MSCOCO` archive, so the archives to fetch must be read off the rows."""
    repo = hub.repo("TIGER-Lab/MMEB-train")
    names = list(COLOURS)
    subsets = {
        "ImageNet_1K": [{"qry": "<|image_1|>\nRepresent the given image for classification\n",
                         "qry_image_path": f"images/ImageNet_1K/Train/{n}.png", "pos_text": n, "pos_image_path": "",
                         "neg_text": "", "neg_image_path": ""} for n in names],
        "MSCOCO_i2t": [{"qry": "<|image_1|>\nFind an image caption describing the given everyday image.\n",
                        "qry_image_path": f"images/MSCOCO/Train/{n}.png", "pos_text": f"a {n} square",
                        "pos_image_path": "", "neg_text": "", "neg_image_path": ""} for n in names],
        "CIFAR_100": [{"qry": "<|image_1|>\nclassify\n", "qry_image_path": "images/CIFAR_100/Train/x.png",
                       "pos_text": "x", "pos_image_path": "", "neg_text": "", "neg_image_path": ""}],
    }
    for subset, rows in subsets.items():
        for split in ("original", "diverse_instruction", "train"):
            _write(repo / subset / f"{split}-00000-of-00001.parquet", rows)
    for archive, folder in (("ImageNet_1K", "ImageNet_1K"), ("MSCOCO", "MSCOCO"), ("CIFAR_100", "CIFAR_100")):
        (repo / "images_zip").mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(repo / "images_zip" / f"{archive}.zip", "w") as z:
            for name, colour in COLOURS.items():
                z.writestr(f"{folder}/Train/{name}.png", _png(colour))
    (repo / "unzip_file.py").write_text("# unzip images_zip/*.zip -d images/\n")


def _mmeb_eval_repo(hub: FakeHub) -> None:
    repo = hub.repo("TIGER-Lab/MMEB-eval")
    names = list(COLOURS)
    rows = [{"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path":
             f"ImageNet-1K/{n}.png", "tgt_text": [n, *(m for m in names if m != n)], "tgt_img_path": [""] * 4}
            for n in names]
    _write(repo / "ImageNet-1K" / "test-00000-of-00001.parquet", rows)
    with zipfile.ZipFile(repo / "images.zip", "w") as z:
        for name, colour in COLOURS.items():
            z.writestr(f"ImageNet-1K/{name}.png", _png(colour))


def _saved_model(tiny_model, tmp_path: Path) -> str:
    path = tmp_path / "tiny-model"
    tiny_model.save_pretrained(path)
    return str(path)


def _first_row(parquet: Path, column: str, value: str) -> int:
    return pq.read_table(parquet, columns=[column]).column(column).to_pylist().index(value)


# ---------------------------------------------------------------------------------------------------------------
# SCaR-Eval: get, photos put where `get` says, `virtue eval`, `data check`


def test_scar_eval_get_eval_and_check(hub, tiny_model, tmp_path, capsys):
    _scar_eval_repo(hub)
    dest = tmp_path / "SCaR-Eval"
    assert main(["data", "get", "scar-eval", str(dest)]) == 0
    out = capsys.readouterr().out
    assert hub.calls == [{"repo_id": "Sony/SCaR-Eval", "repo_type": "dataset", "allow_patterns": [
        f"SCaR_eval_{x}.parquet" for x in ("ADE20K", "COCO_Stuff", "RefCOCO_plus", "RefCOCOg", "VisualGenome")]}]
    assert sorted(p.name for p in dest.glob("*.parquet")) == ["SCaR_eval_ADE20K.parquet", "SCaR_eval_RefCOCOg.parquet"]
    assert "warning: Sony/SCaR-Eval holds no files for ['COCO_Stuff', 'RefCOCO_plus', 'VisualGenome']" in out
    # where the photos come from, by subset, with the folders the rows name and where they go
    assert "Sony/SCaR-Eval holds no photos" in out
    assert "SCaR_eval_RefCOCOg.parquet: 27 photos. RefCOCOg marks regions on COCO 2014 training photos" in out
    assert "refcocog_val/  27 photos, e.g. refcocog_val/000000000049.jpg; file names of COCO 2017" in out
    assert f"->  {dest / 'images' / 'refcocog_val'}/" in out and f"->  {dest / 'images' / 'ade20k_val'}/" in out
    assert f"virtue data check scar-eval {dest} --image-root {dest / 'images'}" in out

    for folder in ("refcocog_val", "ade20k_val"):  # the user's step: the COCO photos, where `get` said
        shutil.copytree(MINI_SCAR / "images", dest / "images" / folder)
    images = ["--image-root", str(dest / "images")]
    assert main(["data", "check", "scar-eval", str(dest), *images, "--no-progress"]) == 0
    assert "RefCOCOg: 72 rows, 72 image references, 27 images: all readable" in capsys.readouterr().out

    model = _saved_model(tiny_model, tmp_path)
    rc = main(["eval", "--model", model, "--no-hub", "--device", "cpu", "--benchmark", "scar", "--data-root",
               str(dest), *images, "--limit", "2", "--cache-dir", "", "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert {t: int(m["n"]) for t, m in results["tasks"].items()} == {"RefCOCOg": 2, "ADE20K": 2}

    # one photo deleted, one overwritten with junk, one truncated (its header still reads)
    gone, junk, cut = "000000000064.jpg", "000000000127.jpg", "000000000241.jpg"
    (dest / "images" / "refcocog_val" / gone).unlink()
    (dest / "images" / "refcocog_val" / junk).write_bytes(b"not a jpeg")
    data = (dest / "images" / "refcocog_val" / cut).read_bytes()
    (dest / "images" / "refcocog_val" / cut).write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["data", "check", "scar-eval", str(dest), *images, "--no-progress",
                 "--report", str(tmp_path / "r.json")]) == 2
    out = capsys.readouterr().out
    parquet = dest / "SCaR_eval_RefCOCOg.parquet"
    row = {n: _first_row(parquet, "qry_image_path", f"refcocog_val/{n}") for n in (gone, junk, cut)}
    assert (f"missing: RefCOCOg row SCaR_eval_RefCOCOg.parquet:{row[gone]}, column 'qry_image_path': image file "
            f"not found: {dest / 'images' / 'refcocog_val' / gone}") in out
    assert f"unreadable: RefCOCOg row SCaR_eval_RefCOCOg.parquet:{row[junk]}, column 'qry_image_path'" in out
    assert cut not in out  # header-only check
    assert "RefCOCOg: 72 rows, 72 image references, 27 images: 1 missing, 1 unreadable" in out
    assert "ADE20K: 6 rows, 6 image references" in out
    report = json.loads((tmp_path / "r.json").read_text())
    problems = {s["name"]: [(p["kind"], p["row_id"]) for p in s["problems"]] for s in report["subsets"]}
    expected = [("missing", f"SCaR_eval_RefCOCOg.parquet:{row[gone]}"),
                ("unreadable", f"SCaR_eval_RefCOCOg.parquet:{row[junk]}")]
    assert not report["ok"] and problems == {"RefCOCOg": sorted(expected, key=lambda p: int(p[1].split(":")[1])),
                                             "ADE20K": []}

    assert main(["data", "check", "scar-eval", str(dest), *images, "--no-progress", "--decode",
                 "--subsets", "RefCOCOg"]) == 2
    out = capsys.readouterr().out
    assert f"unreadable: RefCOCOg row SCaR_eval_RefCOCOg.parquet:{row[cut]}, column 'qry_image_path'" in out
    assert "ADE20K" not in out and "1 missing, 2 unreadable" in out


def test_scar_get_with_subsets_asks_for_those_files_only(hub, tmp_path, capsys):
    _scar_eval_repo(hub)
    assert main(["data", "get", "scar-eval", str(tmp_path / "a"), "--subsets", "RefCOCOg"]) == 0
    assert hub.calls[-1]["allow_patterns"] == ["SCaR_eval_RefCOCOg.parquet"]
    assert "warning" not in capsys.readouterr().out
    # a subset named and not on the hub is an error, with the exit status 2 and the message
    assert main(["data", "get", "scar-eval", str(tmp_path / "b"), "--subsets", "RefCOCO+", "ADE20K"]) == 2
    assert hub.calls[-1]["allow_patterns"] == ["SCaR_eval_RefCOCO_plus.parquet", "SCaR_eval_ADE20K.parquet"]
    assert "Sony/SCaR-Eval holds no files for ['RefCOCO_plus']" in capsys.readouterr().err
    assert main(["data", "get", "scar-eval", str(tmp_path / "c"), "--subsets", "Flickr"]) == 2
    assert "unknown SCaR subset 'Flickr'" in capsys.readouterr().err


def test_scar_train_get_and_check(hub, tmp_path, capsys):
    _scar_train_repo(hub)
    dest = tmp_path / "SCaR-Train"
    assert main(["data", "get", "scar-train", str(dest), "--subsets", "SCAR_RefCOCOg"]) == 0
    out = capsys.readouterr().out
    assert hub.calls == [{"repo_id": "Sony/SCaR-Train", "repo_type": "dataset",
                          "allow_patterns": ["SCAR_RefCOCOg.parquet"]}]
    assert (dest / "images").is_dir()  # the training reader looks for the photos in DEST/images/ once it exists
    assert f"->  {dest / 'images' / 'refcocog_train'}/" in out
    assert "training config: data.sources: [{kind: scar, path: " in out
    shutil.copytree(MINI_SCAR / "images", dest / "images" / "refcocog_train")
    assert main(["data", "check", "scar-train", str(dest), "--no-progress", "--hard-negatives", "9"]) == 0
    out = capsys.readouterr().out
    assert "SCAR_RefCOCOg: 8 rows, 7 image references" in out
    assert "dropped by the reader: SCAR_RefCOCOg row SCAR_RefCOCOg.parquet:2, column 'pos_text': empty text" in out


# ---------------------------------------------------------------------------------------------------------------
# MMEB-train: get (original split only, archives read off the rows, unpacked), `virtue train`, `data check`


def test_mmeb_train_get_train_and_check(hub, tmp_path, capsys):
    _mmeb_train_repo(hub)
    dest = tmp_path / "MMEB-train"
    get = ["data", "get", "mmeb-train", str(dest), "--subsets", "ImageNet_1K", "MSCOCO_i2t", "--no-progress"]
    assert main(get) == 0
    assert hub.calls == [
        {"repo_id": "TIGER-Lab/MMEB-train", "repo_type": "dataset",
         "allow_patterns": ["ImageNet_1K/original-*.parquet", "MSCOCO_i2t/original-*.parquet"]},
        {"repo_id": "TIGER-Lab/MMEB-train", "repo_type": "dataset",
         "allow_patterns": ["images_zip/ImageNet_1K.zip", "images_zip/MSCOCO.zip"]},
    ]
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert files == [
        "ImageNet_1K/original-00000-of-00001.parquet",
        "MSCOCO_i2t/original-00000-of-00001.parquet",
        *(f"images/ImageNet_1K/Train/{n}.png" for n in sorted(COLOURS)),
        *(f"images/MSCOCO/Train/{n}.png" for n in sorted(COLOURS)),
        "images_zip/ImageNet_1K.zip", "images_zip/MSCOCO.zip",
    ]
    assert "ImageNet_1K.zip -> " in capsys.readouterr().out
    assert main(get) == 0  # again: the download resumes, nothing is unpacked twice
    assert capsys.readouterr().out.count("files written (all already there)") == 2

    assert main(["data", "check", "mmeb-train", str(dest), "--no-progress"]) == 0
    assert "ImageNet_1K: 4 rows, 4 image references, 4 images: all readable" in capsys.readouterr().out

    config = {
        "model": {"preset": "tiny", "tokenizer": str(FIXTURE / "checkpoint")},
        "data": {"sources": [{"kind": "mmeb", "path": str(dest)}], "global_batch_size": 2, "num_workers": 0,
                 "image_checks": "eager"},
        "gradcache": {"enabled": True, "query_chunk": 2, "target_chunk": 2},
        "trainable": {"lora": True, "connector": True},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "max_steps": 1},
        "output": {"dir": str(tmp_path / "run"), "checkpoint_every": 1, "tensorboard": False, "export": False},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "--no-progress"]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["subset"] in ("ImageNet_1K", "MSCOCO_i2t")

    (dest / "images" / "MSCOCO" / "Train" / "green.png").unlink()
    (dest / "images" / "ImageNet_1K" / "Train" / "blue.png").write_bytes(b"\x89PNG broken")
    capsys.readouterr()
    assert main(["data", "check", "mmeb-train", str(dest), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert ("missing: MSCOCO_i2t row MSCOCO_i2t/original-00000-of-00001.parquet:1, column 'qry_image_path': image "
            f"file not found: {dest / 'images' / 'MSCOCO' / 'Train' / 'green.png'}") in out
    assert ("unreadable: ImageNet_1K row ImageNet_1K/original-00000-of-00001.parquet:2, column 'qry_image_path': "
            "cannot read") in out
    assert "2 subset(s), 8 rows, 8 images: 1 missing, 1 unreadable, 0 bad path(s)" in out


def test_mmeb_train_without_images_or_unpacking(hub, tmp_path, capsys):
    _mmeb_train_repo(hub)
    assert main(["data", "get", "mmeb-train", str(tmp_path / "a"), "--subsets", "MSCOCO_i2t", "--no-images"]) == 0
    assert len(hub.calls) == 1 and not (tmp_path / "a" / "images_zip").exists()
    assert "fetch images_zip/MSCOCO.zip from TIGER-Lab/MMEB-train" in capsys.readouterr().out
    assert main(["data", "get", "mmeb-train", str(tmp_path / "b"), "--subsets", "MSCOCO_i2t", "--no-unpack"]) == 0
    assert not (tmp_path / "b" / "images").exists()
    zip_path = tmp_path / "b" / "images_zip" / "MSCOCO.zip"
    assert f"unpack with: unzip -n {zip_path} -d {tmp_path / 'b' / 'images'}/" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# MMEB-eval: get (test shards + images.zip -> eval_images/), `virtue eval`, `data check`


def test_mmeb_eval_get_eval_and_check(hub, tiny_model, tmp_path, capsys):
    _mmeb_eval_repo(hub)
    dest = tmp_path / "MMEB-eval"
    assert main(["data", "get", "mmeb-eval", str(dest), "--no-progress"]) == 0
    (call,) = hub.calls
    assert call["allow_patterns"][0] == "ImageNet-1K/test-*.parquet" and call["allow_patterns"][-1] == "images.zip"
    assert len(call["allow_patterns"]) == 37  # the 36 tasks and the images
    assert (dest / "eval_images" / "ImageNet-1K" / "red.png").is_file()
    assert main(["data", "check", "mmeb-eval", str(dest), "--no-progress"]) == 0
    assert "ImageNet-1K: 4 rows, 4 image references, 4 images: all readable" in capsys.readouterr().out
    rc = main(["eval", "--model", _saved_model(tiny_model, tmp_path), "--no-hub", "--device", "cpu", "--benchmark",
               "mmeb", "--data-root", str(dest), "--limit", "2", "--cache-dir", "", "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "results.json").read_text())["tasks"]["ImageNet-1K"]["n"] == 2


# ---------------------------------------------------------------------------------------------------------------
# Failures


def test_a_failed_download_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert main(["data", "get", "scar-eval", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "downloading Sony/SCaR-Eval" in err and "run the same command again to resume" in err


def test_nothing_matching_on_the_hub_is_an_error(hub, tmp_path, capsys):
    hub.repo("Sony/SCaR-Train").mkdir(parents=True)
    (hub.repo("Sony/SCaR-Train") / "train.parquet").write_bytes(b"")
    assert main(["data", "get", "scar-train", str(tmp_path / "d")]) == 2
    assert "layout may have changed" in capsys.readouterr().err


def test_unpack_refuses_members_outside_the_folder(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../escaped.txt", b"x")
    with pytest.raises(DataError, match="outside"):
        unpack(archive, tmp_path / "into", progress=False)
    assert not (tmp_path / "escaped.txt").exists()
