"""`virtue` subcommands through `main(argv)`, checked against the library calls they wrap."""

from __future__ import annotations

import json

import numpy as np

from virtue.cli.main import main


def model_args(fixture_dir) -> list[str]:
    return ["--model", str(fixture_dir / "checkpoint"), "--no-hub", "--device", "cpu"]


def test_embed_writes_what_encode_returns(fixture_dir, fixture_images, _official_model, tmp_path):
    out = tmp_path / "v.npy"
    image = fixture_images["rocket.png"]
    rc = main(["embed", *model_args(fixture_dir), "--image", str(image), "--text", "Find it.",
               "--box", "108", "22", "132", "152", "--point", "120", "50", "--negative-point", "5", "5",
               "-o", str(out)])
    assert rc == 0
    expected = _official_model.encode([{"image": image, "text": "Find it.", "box": [108, 22, 132, 152],
                                        "points": [[120, 50], [5, 5]], "labels": [1, 0]}])
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)


def test_embed_texts_file_to_stdout(fixture_dir, _official_model, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("A cat\n\nA dog\n")
    assert main(["embed", *model_args(fixture_dir), "--texts-file", str(texts)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dim"] == 24
    np.testing.assert_allclose(printed["embeddings"], _official_model.encode(["A cat", "A dog"]), atol=1e-6)


def test_similarity_ranks_by_score(fixture_dir, fixture_images, _official_model, capsys):
    image = fixture_images["chelsea.png"]
    candidates = ["A cat", "A dog", "A tiger"]
    rc = main(["similarity", *model_args(fixture_dir), "--query-image", str(image), "--query-text", "What is it?",
               "--query-point", "56", "75", "--candidates", *candidates, "--json"])
    assert rc == 0
    ranking = json.loads(capsys.readouterr().out)
    q = _official_model.encode({"image": image, "text": "What is it?", "points": [[56, 75]]})
    scores = _official_model.encode(candidates) @ q
    assert [r["candidate"] for r in ranking] == [candidates[i] for i in np.argsort(-scores)]
    np.testing.assert_allclose([r["score"] for r in ranking], np.sort(scores)[::-1], atol=1e-6)


def test_errors_exit_2_with_the_message(fixture_dir, fixture_images, capsys):
    rc = main(["embed", *model_args(fixture_dir), "--image", str(fixture_images["rocket.png"]),
               "--box", "10", "10", "10", "40"])
    assert rc == 2
    assert "PromptError: input 0: box [10, 10, 10, 40] has zero or negative width" in capsys.readouterr().err


def test_convert_command(fixture_dir, tmp_path, capsys):
    assert main(["convert", str(fixture_dir / "checkpoint"), str(tmp_path / "out"), "--no-hub"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "virtue"
