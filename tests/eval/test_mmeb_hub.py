"""MMEB-eval read in the layout `huggingface_hub.snapshot_download("TIGER-Lab/MMEB-eval", repo_type="dataset")`
writes: `<Task>/test-00000-of-00001.parquet` per task, `images.zip` at the top (extracted into `eval_images/`)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from virtue.cli.main import main
from virtue.data.layouts import mmeb_image_root, mmeb_task_files
from virtue.errors import ConfigError
from virtue.eval.runner import EvalConfig, available_tasks

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def _image(path: Path, colour: tuple[int, int, int], fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (28, 20), colour).save(path, format=fmt)


def _snapshot(root: Path) -> Path:
    """Two tasks of MMEB-eval in the hub layout (v1 columns, as TIGER-Lab/MMEB-eval holds them)."""
    images = root / "eval_images"
    for name, colour in COLOURS.items():
        _image(images / "ImageNet-1K" / f"{name}.JPEG", colour, "JPEG")
        _image(images / "MSCOCO_t2i" / f"{name}.png", colour, "PNG")
    cls = [{"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path":
            f"ImageNet-1K/{name}.JPEG", "tgt_text": [name, *(n for n in COLOURS if n != name)],
            "tgt_img_path": ["", "", ""]} for name in COLOURS]
    inst = "<|image_1|>\nRepresent the given image."
    t2i = [{"qry_text": f"Find me an everyday image that matches the given caption: a {name} square",
            "qry_img_path": "", "tgt_text": [inst] * 3,
            "tgt_img_path": [f"MSCOCO_t2i/{n}.png" for n in (name, *(m for m in COLOURS if m != name))]}
           for name in COLOURS]
    for task, rows in (("ImageNet-1K", cls), ("MSCOCO_t2i", t2i)):
        (root / task).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), root / task / "test-00000-of-00001.parquet")
    with zipfile.ZipFile(root / "images.zip", "w") as z:  # the snapshot keeps the archive beside its extraction
        z.writestr("ImageNet-1K/red.JPEG", b"")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: ImageNet-1K\n  data_files:\n  - split: test\n"
                                    "    path: ImageNet-1K/test-*\n---\n")
    return root


def test_cli_finds_every_task_of_the_snapshot(tiny_model, tmp_path, capsys):
    root = _snapshot(tmp_path / "MMEB-eval")
    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(model_dir)
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(model_dir), "--no-hub", "--device", "cpu", "--benchmark", "mmeb",
               "--data-root", str(root), "--batch-size", "4", "--cache-dir", "", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == ["ImageNet-1K", "MSCOCO_t2i"]
    assert all(m["n"] == 3 for m in results["tasks"].values())
    assert results["aggregates"]["n_tasks/Overall"] == 2 and results["boxes_outside_image"] == {}
    assert results["timings"]["encoded_inputs"] == 3 + 3 + 3 + 3  # per task: 3 queries, 3 distinct candidates


def test_layouts_and_image_root(tmp_path):
    root = _snapshot(tmp_path / "MMEB-eval")
    assert mmeb_task_files(root, "ImageNet-1K") == [root / "ImageNet-1K/test-00000-of-00001.parquet"]
    assert mmeb_task_files(root, "GQA") == []
    assert mmeb_image_root(root) == root / "eval_images"
    cfg = EvalConfig(benchmark="mmeb", data_root=str(root))
    assert [t.name for t in available_tasks(cfg)] == ["ImageNet-1K", "MSCOCO_t2i"]

    # the parquet-converter branch spells shards <Task>/test/0000.parquet; several shards are read in order
    converted = tmp_path / "converted" / "GQA" / "test"
    converted.mkdir(parents=True)
    for name in ("0001.parquet", "0000.parquet"):
        (converted / name).touch()
    assert [p.name for p in mmeb_task_files(tmp_path / "converted", "GQA")] == ["0000.parquet", "0001.parquet"]

    # the flat layout (one <Task>.parquet each) still works; both layouts for one task is ambiguous
    (root / "GQA.parquet").touch()
    assert mmeb_task_files(root, "GQA") == [root / "GQA.parquet"]
    (root / "ImageNet-1K.parquet").touch()
    with pytest.raises(ConfigError, match="both ImageNet-1K.parquet and ImageNet-1K/test-00000"):
        mmeb_task_files(root, "ImageNet-1K")

    # images.zip not extracted yet: the error says how
    (root / "eval_images").rename(root / "elsewhere")
    with pytest.raises(ConfigError, match=r"unzip .*images.zip -d .*eval_images.* or pass --image-root"):
        mmeb_image_root(root)
    (root / "images.zip").unlink()
    assert mmeb_image_root(root) == root  # the flat layout's images are relative to the data root


def test_row_ids_name_the_shard(tmp_path):
    from virtue.eval.datasets import load_mmeb_eval

    root = _snapshot(tmp_path / "MMEB-eval")
    files = mmeb_task_files(root, "MSCOCO_t2i")
    task = load_mmeb_eval(files, root / "eval_images", task="MSCOCO_t2i", root=root, limit=2)
    assert [q.row_id for q in task] == [f"MSCOCO_t2i/test-00000-of-00001.parquet:{i}" for i in range(2)]
    assert task[0].candidates[0].image == root / "eval_images/MSCOCO_t2i/red.png"


def test_no_task_found(tmp_path):
    with pytest.raises(ConfigError, match="no MMEB-eval task found"):
        available_tasks(EvalConfig(benchmark="mmeb", data_root=str(tmp_path)))
