"""Every script in benchmarks/ runs its real code path end to end at the smallest size and prints its figures, so
an API change breaks a test here, not a benchmark nobody runs. Nothing is timed: the checks are that each script
exits 0 and prints (and writes) the figures it exists for, with their baselines named and the load recorded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
NUMBER = r"[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?"
LOAD = r"[0-9.]+/[0-9.]+/[0-9.]+"

# script -> (arguments at the smallest size, regular expressions its output must match)
SMOKE: dict[str, tuple[list[str], list[str]]] = {
    "throughput.py": (
        ["--preset", "tiny", "--repeats", "1", "--photos", "1", "--k", "1", "--queries", "2", "--candidates", "4",
         "--official-without-head"],
        [rf"pipelined / max\(preprocessing, model\) = {NUMBER} / {NUMBER} = {NUMBER}",
         rf"ours vs official-like \[.*load average {LOAD}\]: queries/s x{NUMBER}",
         rf"ours vs encode, reuse\+prefetch off \[.*load average {LOAD}\]: queries/s x{NUMBER}",
         rf"official-like +{NUMBER} +{NUMBER} +{NUMBER}",  # the memory table
         rf"measured float32 matmul peak: {NUMBER} TFLOP/s before the timed runs, {NUMBER} after",
         rf"MMEB-like +ours +{NUMBER} +{NUMBER}%"]),
    "feature_cache.py": (
        ["--preset", "tiny", "--num-images", "1", "--ks", "1", "--repeats", "1"],
        [rf"^ +1 +1 +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER} +{LOAD}$"]),
    "train_pipeline.py": (
        ["--steps", "2", "--warmup", "1", "--repeats", "1", "--mem-repeats", "1", "--mem-steps", "1",
         "--image-size", "64", "--batch", "4", "--chunk", "2", "--mem-batch", "4", "--mem-hidden", "32",
         "--mem-layers", "2", "--mem-image-size", "56"],
        [rf"Medians over 1 repeat\(s\) \[load average {LOAD}\]",
         rf"scar parquet +0 +{NUMBER} .* 1\.00 ", rf"^on / off +{NUMBER} +{NUMBER}"]),
    "train_synthetic.py": (
        ["--steps", "1", "--warmup", "0", "--train-examples", "8", "--eval-queries", "4", "--batch", "4",
         "--chunk", "2", "--hidden", "16", "--layers", "1", "--vision-depth", "1", "--vision-dim", "32",
         "--no-progress"],
        [r'"sam": true.*"hit@1": [0-9.]+', r'"sam": false.*"hit@1": [0-9.]+',
         rf'"gradcache_step_MiB": {NUMBER}, "ratio": {NUMBER}, "load_average": "{LOAD}"']),
    "vision_tower.py": (
        ["--workloads", "thumbnails", "--repeats", "1"],
        [rf"load average {LOAD}", rf"64 thumbnails at 56² +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER}"]),
}


def run(args: list[str], tmp_path: Path, timeout: int = 600) -> str:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, f"{args[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if '__name__ == "__main__"' in p.read_text()}
    assert scripts == set(SMOKE) | {"gpu_all.py"}, f"scripts without a smoke test: {scripts - set(SMOKE)}"


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_and_prints_its_figures(script, tmp_path):
    args, patterns = SMOKE[script]
    if script == "train_synthetic.py":
        args = [*args, "--out", str(tmp_path / "out")]
    extra = ["--json", str(tmp_path / "figures.json")] if script == "throughput.py" else []
    out = run([str(BENCHMARKS / script), *args, *extra], tmp_path)
    missing = [p for p in patterns if not re.search(p, out, re.M)]
    assert not missing, f"{script} did not print {missing}:\n{out[-4000:]}"
    if script == "throughput.py":
        figures = json.loads((tmp_path / "figures.json").read_text())["figures"]
        ratios = [f for f in figures if f["unit"] == "x" and f["section"] == "scar"]
        assert {f["baseline"] for f in ratios} == {"official-like", "official-like, LM head skipped",
                                                   "encode, reuse+prefetch off"}
        assert all(re.fullmatch(LOAD, f["load"]) and f["device"] for f in figures)


def test_gpu_all_dry_run_writes_every_section(tmp_path):
    """The one prepared GPU command, on the CPU at the smallest size: every section runs (or says why not) and the
    JSON and Markdown tables are written."""
    out = run([str(BENCHMARKS / "gpu_all.py"), "--device", "cpu", "--preset", "tiny", "--out", str(tmp_path)],
              tmp_path)
    data = json.loads((tmp_path / "dry-run-cpu-tiny.json").read_text())
    sections = data["notes"]["sections"]
    assert all(sections[s].startswith("ok") for s in ("parity", "scar", "memory")), sections
    assert "not run" in sections["vllm"]
    parity = {f["name"].split(":")[0]: f["value"] for f in data["figures"] if f["section"] == "parity"}
    assert parity["float32"] < 1e-5 and parity["bfloat16"] < 0.1, parity  # CPU, 3 fixture cases
    assert any(f["section"] == "memory" and f["name"].startswith("official-like") for f in data["figures"])
    assert any(f["section"] == "mfu" for f in data["figures"])
    table = (tmp_path / "dry-run-cpu-tiny.md").read_text()
    assert "| scar |" in table and "| parity |" in table and "wrote" in out
