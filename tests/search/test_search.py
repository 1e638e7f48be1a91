"""`search`: LanceDB's top-k equals a brute-force numpy ranking of the stored vectors; the CLI shells."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from tests.search.helpers import image_paths, image_size, region_lines, stored, write_regions
from virtue.search import index_directory, search, search_vector


def identity(row) -> tuple:
    return (row["kind"], row["path"], row["region_id"])


def assert_brute_force(hits, db, query_vector, top_k, kind="all"):
    """Hit scores are the stored vectors' dot products, and they are the top_k of all of them."""
    rows, vectors = stored(db, where=None if kind == "all" else f"kind = '{kind}'")
    scores = vectors @ query_vector
    order = np.argsort(-scores, kind="stable")[:top_k]
    assert len(hits) == min(top_k, len(rows))
    np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)
    by_identity = dict(zip(map(identity, rows), scores, strict=True))
    for hit in hits:
        key = (hit.kind, hit.rel_path, hit.region_id)
        assert by_identity[key] == pytest.approx(hit.score, abs=1e-5)
    # Same order as numpy wherever numpy's scores are not tied within float32 noise.
    gaps = np.diff(scores[np.argsort(-scores)][: top_k + 1])
    if len(gaps) and np.all(np.abs(gaps) > 1e-5):
        assert [(h.kind, h.rel_path, h.region_id) for h in hits] == [identity(rows[i]) for i in order]


def test_queries_equal_brute_force(tiny_model, photos, tmp_path):
    write_regions(photos, region_lines(photos))  # 6 images and 3 regions (box, points, mask)
    indexed = tmp_path / "db"
    index_directory(tiny_model, photos, indexed)

    text = "a horse on a sports field"
    hits = search(tiny_model, indexed, text, top_k=5)
    assert_brute_force(hits, indexed, tiny_model.encode(text), 5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]

    path = photos / image_paths(photos)[2]
    w, h = image_size(path)
    query = {"image": str(path), "box": [w // 4, h // 4, w - 10, h - 10], "text": "Find the object."}
    vector = tiny_model.encode(query)
    for kind in ("all", "region", "image"):
        hits = search(tiny_model, indexed, query, top_k=4, kind=kind)
        assert_brute_force(hits, indexed, vector, 4, kind)
        assert kind == "all" or {h.kind for h in hits} == {kind}
    assert len(hits := search(tiny_model, indexed, query, top_k=4, kind="region")) == 3
    assert all(h.prompt and h.region_id for h in hits)

    everything = search_vector(indexed, vector, top_k=50)  # top_k past the table's 9 rows
    assert len(everything) == 9
    assert_brute_force(everything, indexed, vector, 50)

    # An indexed image as the query finds itself, with score 1.
    for rel in image_paths(photos):
        best = search(tiny_model, indexed, {"image": str(photos / rel)}, top_k=1, kind="image")[0]
        assert best.rel_path == rel and best.path == str(photos.resolve() / rel)
        assert best.score == pytest.approx(1.0, abs=1e-5)


def run_cli(module, argv: list[str]) -> int:
    """Parse and run one subcommand as `virtue` does (independent of its registration in cli.main)."""
    parser = argparse.ArgumentParser(prog="virtue")
    module.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_index_and_search(tiny_model, photos, tmp_path, capsys):
    from virtue.cli import index as cli_index
    from virtue.cli import search as cli_search

    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    model = ["--model", str(model_dir), "--no-hub", "--device", "cpu"]
    db = tmp_path / "db"
    assert run_cli(cli_index, ["index", str(photos), "--db", str(db), *model, "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 6

    path = photos / image_paths(photos)[0]
    argv = ["search", "--db", str(db), *model, "--image", str(path), "--box", "10", "20", "200", "150",
            "--query-text", "Find it.", "--top-k", "3"]
    assert run_cli(cli_search, [*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = search(tiny_model, db, {"image": str(path), "box": [10, 20, 200, 150], "text": "Find it."}, top_k=3)
    assert [p["path"] for p in printed] == [h.path for h in expected]
    np.testing.assert_allclose([p["score"] for p in printed], [h.score for h in expected], atol=1e-6)

    assert run_cli(cli_search, argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "kind", "region", "path"] and len(table) == 4
