"""`virtue eval` under torchrun: two gloo processes write the same results.json as one process (timings aside),
each rank encoding only its share of the unique inputs, and share one embedding cache (rank 0 writes it)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MINI_SCAR
from virtue.cli.main import main
from virtue.eval.datasets import load_scar_eval

LIMIT = 10  # SCaR rows evaluated


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], timeout: int = 300) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


def torchrun_eval(args: list[str]) -> None:
    torchrun(["-m", "virtue.cli.main", "eval", *args])


def results(out) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture
def scar_and_model(tiny_model, tmp_path):
    root = tmp_path / "scar"
    root.mkdir()
    shutil.copy(MINI_SCAR / "mini_scar.parquet", root / "SCaR_eval_RefCOCOg.parquet")
    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(model_dir)
    return root, model_dir


@pytest.fixture
def setup(scar_and_model):
    root, model_dir = scar_and_model
    return ["--model", str(model_dir), "--no-hub", "--device", "cpu", "--data-root", str(root), "--image-root",
            str(MINI_SCAR), "--limit", str(LIMIT), "--batch-size", "4", "--baselines", "text_only", "random",
            "consensus"]


def input_identity(item) -> tuple:
    """What makes two dataset inputs the same cache entry here: text, image path and prompt."""
    prompt = None if item.prompt is None else (repr(item.prompt.points), repr(item.prompt.box), repr(item.prompt.mask))
    return item.text, None if item.image is None else str(item.image), prompt


def planned_shares(data_root: Path, variants: list[str], world: int = 2) -> list[int]:
    """How many inputs each rank should encode, by `Ranks.share`'s documented rule (rank r of w takes the
    contiguous items n*r//w .. n*(r+1)//w - 1 of each call, so the ranks differ by at most one), applied to every
    embedding call of the run: the task's unique inputs for each query variant in turn (the protocol's, then each
    model baseline's), less those an earlier call already put in the cache (rank 0 stores each call's vectors)."""
    cached: set = set()
    shares = [0] * world
    for variant in variants:
        task = load_scar_eval(data_root / "SCaR_eval_RefCOCOg.parquet", MINI_SCAR, task="RefCOCOg",
                              variant=variant, limit=LIMIT)
        keys = [input_identity(x) for x in task.table.inputs]
        assert len(set(keys)) == len(keys)  # a task's table holds each input once
        n = len(keys)
        for rank in range(world):
            shares[rank] += sum(key not in cached for key in keys[n * rank // world : n * (rank + 1) // world])
        cached.update(keys)
    return shares


def test_two_processes_write_what_one_writes(setup, scar_and_model, tmp_path):
    assert main(["eval", *setup, "--cache-dir", str(tmp_path / "cache1"), "--out", str(tmp_path / "one")]) == 0
    torchrun_eval([*setup, "--cache-dir", str(tmp_path / "cache2"), "--out", str(tmp_path / "two")])
    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    timings_one, timings_two = one.pop("timings"), two.pop("timings")
    assert one == two
    assert (tmp_path / "two/results.md").is_file() and (tmp_path / "two/results.png").is_file()

    # each rank encoded its share only: together exactly what one process encoded, both did some
    shares = [timings_two["encoded_inputs_rank0"], timings_two["encoded_inputs_rank1"]]
    assert timings_two["processes"] == 2 and min(shares) > 0
    assert sum(shares) == timings_two["encoded_inputs"] == timings_one["encoded_inputs"]
    # and exactly the planned split: the "box" protocol's inputs, then the text_only baseline's new ones
    assert shares == planned_shares(scar_and_model[0], ["box", "text_only"]), "the ranks' shares are not as planned"

    # rank 0 wrote every rank's vectors to the shared cache: a second run encodes nothing
    torchrun_eval([*setup, "--cache-dir", str(tmp_path / "cache2"), "--out", str(tmp_path / "again")])
    again = results(tmp_path / "again")
    assert again.pop("timings")["encoded_inputs"] == 0 and again == one


def test_one_rank_of_a_process_group_can_evaluate_alone(scar_and_model, tmp_path):
    # As a training job validates: rank 0 calls run_eval(distributed=False), the other rank does not call it.
    root, model_dir = scar_and_model
    torchrun([str(Path(__file__).with_name("rank0_eval_worker.py")), str(model_dir), str(root), str(tmp_path / "o")],
             timeout=180)
    assert results(tmp_path / "o")["tasks"]["RefCOCOg"]["n"] == 4


def test_distributed_true_needs_processes(tiny_model, scar_and_model, tmp_path):
    from virtue.errors import ConfigError
    from virtue.eval.runner import EvalConfig, run_eval

    cfg = EvalConfig(benchmark="scar", data_root=str(scar_and_model[0]), distributed=True, cache_dir=None)
    with pytest.raises(ConfigError, match="torchrun"):
        run_eval(tiny_model, cfg)
