"""`virtue` subcommands through `main(argv)`, checked against the library calls they wrap."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

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


HEAVY = ("torch", "transformers", "peft", "safetensors", "fastapi", "gradio", "lancedb", "ray", "pyarrow",
         "matplotlib", "sentence_transformers", "mteb", "tqdm")


def test_help_and_version_start_without_the_model_stack():
    """`virtue --help`, every `virtue <command> --help` and `virtue --version` parse arguments only: none of the
    heavy packages is imported (they took 10-20 s to import before any argument was read)."""
    code = f"""
import contextlib, io, sys
from virtue.cli.main import build_parser, main
names = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)
for argv in [["--help"], ["--version"], *[[name, "--help"] for name in names]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as stop:
            assert stop.code == 0, (argv, stop.code)
    assert out.getvalue().strip(), argv
print(len(names), sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    count, heavy = done.stdout.strip().split(" ", 1)
    assert int(count) >= 11 and heavy == "[]", done.stdout


def test_version(capsys):
    from virtue import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"virtue {__version__}"
