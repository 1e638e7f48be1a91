"""`index_directory`: rows and their columns, incremental re-indexing, the regions sidecar, model checks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.search.helpers import EncodeCounter, image_paths, image_size, region_lines, stored, write_regions
from virtue.errors import DataError
from virtue.search import IndexMismatchError, MissingDependencyError, index_directory, open_index


def test_index_writes_one_row_per_image(tiny_model, photos, tmp_path):
    db = tmp_path / "db"
    stats = index_directory(tiny_model, photos, db, batch_size=4)
    assert (stats.added, stats.updated, stats.unchanged, stats.removed, stats.embedded) == (6, 0, 0, 0, 6)
    rows, vectors = stored(db)
    assert sorted(r["path"] for r in rows) == image_paths(photos)
    for row in rows:
        path = photos / row["path"]
        assert row["kind"] == "image" and row["root"] == str(photos.resolve()) and row["prompt"] is None
        assert (row["width"], row["height"]) == image_size(path)
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert (row["size"], row["mtime_ns"]) == (path.stat().st_size, path.stat().st_mtime_ns)
    # Image rows are the image-only embedding (default image text, grid prompt).
    expected = tiny_model.encode([{"image": photos / r["path"]} for r in rows])
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert vectors.shape == (6, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    meta = json.loads((db / "virtue_index.json").read_text())
    assert meta["dim"] == 32 and meta["metric"] == "dot" and len(meta["fingerprint"]) == 32


def test_reindex_is_incremental(tiny_model, photos, tmp_path):
    db = tmp_path / "db"
    index_directory(tiny_model, photos, db)
    counter = EncodeCounter(tiny_model)

    again = index_directory(tiny_model, photos, db)
    assert (again.added, again.updated, again.unchanged, again.removed, again.embedded) == (0, 0, 6, 0, 0)
    assert counter.rows == 0

    # Same bytes, new mtime: hashed, found unchanged, re-stamped (not re-embedded).
    touched = photos / image_paths(photos)[0]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    # New bytes for one image, another deleted.
    changed, deleted = photos / image_paths(photos)[1], photos / image_paths(photos)[4]
    with Image.open(changed) as img:
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, quality=90)
    deleted.unlink()

    stats = index_directory(tiny_model, photos, db)
    assert (stats.added, stats.updated, stats.unchanged, stats.removed, stats.embedded) == (0, 1, 4, 1, 1)
    assert counter.rows == 1
    final = index_directory(tiny_model, photos, db)
    assert (final.unchanged, final.embedded) == (5, 0) and counter.rows == 1
    rows, vectors = stored(db)
    assert sorted(r["path"] for r in rows) == image_paths(photos)
    by_path = {r["path"]: (r, v) for r, v in zip(rows, vectors, strict=True)}
    assert by_path[touched.relative_to(photos).as_posix()][0]["mtime_ns"] == touched.stat().st_mtime_ns
    row, vector = by_path[changed.relative_to(photos).as_posix()]
    assert row["sha256"] == hashlib.sha256(changed.read_bytes()).hexdigest()
    np.testing.assert_allclose(vector, tiny_model.encode({"image": changed}), atol=1e-5)


def test_renamed_or_copied_image_reuses_the_stored_vector(tiny_model, photos, tmp_path):
    db = tmp_path / "db"
    index_directory(tiny_model, photos, db)
    before = {r["path"]: v for r, v in zip(*stored(db), strict=True)}
    counter = EncodeCounter(tiny_model)
    first, second, third, fourth = image_paths(photos)[:4]
    (photos / first).rename(photos / "renamed.jpg")
    shutil.copyfile(photos / second, photos / "sub" / "copy.jpg")
    shutil.copyfile(photos / fourth, photos / third)  # changed bytes, which another stored image has
    stats = index_directory(tiny_model, photos, db)
    assert (stats.added, stats.updated, stats.unchanged, stats.removed) == (2, 1, 4, 1)
    assert (stats.reused, stats.embedded, counter.rows) == (3, 0, 0)
    assert stats.to_dict()["reused"] == 3 and "0 vectors embedded, 3 reused" in stats.summary()
    rows, vectors = stored(db)
    assert sorted(r["path"] for r in rows) == image_paths(photos)
    after = {r["path"]: (r, v) for r, v in zip(rows, vectors, strict=True)}
    for path, source in (("renamed.jpg", first), ("sub/copy.jpg", second), (third, fourth)):
        row, vector = after[path]
        np.testing.assert_array_equal(vector, before[source])
        file = photos / path
        assert (row["size"], row["mtime_ns"]) == (file.stat().st_size, file.stat().st_mtime_ns)
        assert row["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    np.testing.assert_allclose(after["renamed.jpg"][1], tiny_model.encode({"image": photos / "renamed.jpg"}),
                               atol=1e-5)
    # A region on a copy is embedded (regions are keyed by their line), its image row is not.
    write_regions(photos, [{"image": "sub/copy.jpg", "box": [5, 5, 40, 40]}])
    shutil.copyfile(photos / second, photos / "copy2.jpg")
    counter.rows = 0
    stats = index_directory(tiny_model, photos, db)
    assert (stats.added, stats.reused, stats.regions_added, stats.embedded, counter.rows) == (1, 1, 1, 1, 1)


def test_an_image_that_cannot_be_decoded_is_skipped_and_reported(tiny_model, photos, tmp_path):
    # The header reads (so the file is planned), the pixels do not: the model refuses it while embedding.
    data = (photos / image_paths(photos)[0]).read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (photos / "noise.jpg").write_bytes(b"not a jpeg")  # refused from its header
    stats = index_directory(tiny_model, photos, tmp_path / "db", batch_size=4)
    assert (stats.added, stats.skipped, stats.embedded) == (6, 2, 6)
    assert sorted(s.split(": ")[0] for s in stats.skipped_files) == [str(photos / "noise.jpg"),
                                                                      str(photos / "truncated.jpg")]
    assert "skipped_files" not in stats.to_dict()
    rows, _ = stored(tmp_path / "db")
    bad = ("noise.jpg", "truncated.jpg")
    assert sorted(r["path"] for r in rows) == [p for p in image_paths(photos) if p not in bad]


def test_regions_sidecar(tiny_model, photos, tmp_path):
    db = tmp_path / "db"
    lines = region_lines(photos)
    write_regions(photos, lines)
    stats = index_directory(tiny_model, photos, db)
    assert (stats.added, stats.regions_added, stats.embedded) == (6, 3, 9)
    rows, vectors = stored(db, where="kind = 'region'")
    assert len(rows) == 3 and open_index(db).count("image") == 6
    by_prompt = {r["prompt"]: (r, v) for r, v in zip(rows, vectors, strict=True)}
    for line in lines:
        prompt = {k: v for k, v in line.items() if k not in ("image", "id", "label")}
        row, vector = by_prompt[json.dumps(prompt, sort_keys=True)]
        assert row["path"] == line["image"] and row["label"] == line.get("label")
        assert row["region_id"] == line.get("id", row["region_id"]) and row["region_id"]
        spec = {"image": photos / line["image"], **prompt}
        if "mask" in spec:
            spec["mask"] = photos / spec["mask"]
        np.testing.assert_allclose(vector, tiny_model.encode(spec), atol=1e-5)

    # Edit one line, drop another, keep the third: only the edited one is embedded.
    counter = EncodeCounter(tiny_model)
    write_regions(photos, [{**lines[0], "box": [12, 20, 100, 90]}, lines[2]])
    stats = index_directory(tiny_model, photos, db)
    assert (stats.unchanged, stats.regions_added, stats.regions_removed, stats.regions_unchanged) == (6, 1, 2, 1)
    assert counter.rows == 1 and open_index(db).count("region") == 2

    # Same bytes, new mtime, and a new region on it: every row of the image gets the new stamp.
    first = photos / lines[0]["image"]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    write_regions(photos, [{**lines[0], "box": [12, 20, 100, 90]}, lines[2], {**lines[0], "id": "box2"}])
    stats = index_directory(tiny_model, photos, db)
    assert (stats.unchanged, stats.regions_added, stats.regions_unchanged, counter.rows) == (6, 1, 2, 2)
    rows, _ = stored(db, where=f"path = '{lines[0]['image']}'")
    assert len(rows) == 4 and {r["mtime_ns"] for r in rows} == {first.stat().st_mtime_ns}


def test_bad_sidecar_line_is_named_and_nothing_is_written(tiny_model, photos, tmp_path):
    db = tmp_path / "db"
    first = image_paths(photos)[0]
    w, h = image_size(photos / first)
    write_regions(photos, [{"image": first, "box": [0, 0, 10, 10]}, {"image": first, "box": [0, 0, w + 50, 10]}])
    with pytest.raises(DataError, match=r"regions.jsonl:2: box \[0, 0, .*\] lies outside"):
        index_directory(tiny_model, photos, db)
    assert open_index(db).count() == 0
    (photos.parent / "outside.jpg").write_bytes((photos / first).read_bytes())
    for line, message in [
        ({"image": "missing.jpg", "box": [0, 0, 10, 10]}, "'image' file not found"),
        ({"image": "../outside.jpg", "box": [0, 0, 10, 10]}, "'image' '../outside.jpg' lies outside"),
        ({"image": first, "box": [0, 0, 10, 10], "colour": "red"}, r"unknown key\(s\) \['colour'\]"),
        ({"image": first, "labels": [1]}, "a region needs a 'box', 'points' or 'mask'"),
        ({"image": first, "box": [5, 5, 5, 9]}, "zero or negative width"),
    ]:
        write_regions(photos, [line])
        with pytest.raises(DataError, match=f"regions.jsonl:1: .*{message}"):
            index_directory(tiny_model, photos, db)


def test_another_model_is_refused_unless_rebuild(tiny_model, tokenizer, photos, tmp_path):
    from virtue import VirtueModel
    from virtue.model.presets import tiny_config
    from virtue.search import search

    db = tmp_path / "db"
    index_directory(tiny_model, photos, db)
    torch.manual_seed(1)
    other = VirtueModel(tiny_config(), tokenizer).eval()
    with pytest.raises(IndexMismatchError, match="fingerprint .* differs.*--rebuild"):
        index_directory(other, photos, db)
    with pytest.raises(IndexMismatchError, match="built with model fingerprint"):
        search(other, db, "a dog")
    assert open_index(db).count() == 6  # untouched
    stats = index_directory(other, photos, db, rebuild=True)
    assert (stats.added, stats.embedded) == (6, 6)
    assert search(other, db, "a dog", top_k=1)[0].kind == "image"


def test_optional_dependencies_are_imported_only_when_used():
    code = (
        "import sys, virtue, virtue.search, virtue.cli.index, virtue.cli.search; "
        "print(sorted(m for m in ('lancedb', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_local_path_needs_no_ray(tiny_model, photos, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as when it is not installed
    assert index_directory(tiny_model, photos, tmp_path / "db").added == 6
    with pytest.raises(MissingDependencyError, match=r'pip install "ray\[data\]"'):
        index_directory(tiny_model, photos, tmp_path / "db2", ray_address="auto")
