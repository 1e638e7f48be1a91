"""Every GPU figure of the README in one run (`bash benchmarks/gpu_all.sh`), written as one JSON and one Markdown
table under `benchmarks/results/`, named after the card. Sized to finish in about 8 minutes on an H100.

1. parity -- the official-layout fixture (`../shared/fixtures/virtue-official-tiny`, or $VIRTUE_PARITY_FIXTURE)
   on the device in float32 and bfloat16: max |delta| per case against the official implementation's embeddings.
2. scar -- the real 2B architecture (random weights, `--preset`), bfloat16: SCaR-style queries/s of `encode`
   against each baseline (official-like, and `encode` with reuse and prefetch off), with the model's, the LLM's and
   the ViT's MFU against the measured bf16 matmul peak (before and after; the datasheet quoted beside it)
   (`throughput.py --only scar`).
3. memory -- the 7B architecture (`--memory-preset`), bfloat16: peak memory of one SCaR-like encode per path
   (`throughput.py --only memory`).
4. vllm -- the vLLM plugin's throughput, once it exists (reported as not run until then).

A section that fails is recorded with its error and the others still run. The CPU dry run (`--device cpu --preset
tiny`) runs the same code at the smallest size; the test suite runs it so that this script cannot rot.

    bash benchmarks/gpu_all.sh                                 # on a CUDA machine
    bash benchmarks/gpu_all.sh --device cpu --preset tiny --out /tmp/dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import throughput
import torch
from bench_common import FIXTURE, REPO, Figures, device_label, environment, load_average

from virtue.model.embedder import VirtueModel


class NotRun(Exception):
    """A section that cannot run here (said in the results, not a failure of the script)."""


def parity_section(device: torch.device, figures: Figures, max_cases: int | None) -> None:
    os.environ.setdefault("VIRTUE_PARITY_FIXTURE", str(FIXTURE))
    sys.path.insert(0, str(REPO))
    from tests.checkpoints.test_parity import CASES, case_inputs, expected

    cases = CASES[:max_cases] if max_cases else CASES
    fixture = Path(os.environ["VIRTUE_PARITY_FIXTURE"])
    label = device_label(device)
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = VirtueModel.from_pretrained(fixture / "checkpoint", device=device, dtype=dtype, allow_hub=False)
        worst, worst_case = 0.0, ""
        for case in cases:
            items, resize = case_inputs(case)
            got = model.encode(items, batch_size=case["batch_size"], image_resize=resize, convert_to_numpy=False)
            err = (got - expected(case)).abs().max().item()
            if err >= worst:
                worst, worst_case = err, case["name"]
        what = f"{name}: max |delta| over {len(cases)} of {len(CASES)} cases (worst: {worst_case})"
        figures.add("parity", what, worst, "max abs difference", baseline="official implementation's embeddings",
                    device=label)
        print(f"parity {name} [{label}; load average {load_average()}]: max |delta| {worst:.2e} (case "
              f"{worst_case})", flush=True)


def throughput_section(argv: list[str], figures: Figures) -> None:
    result = throughput.run(throughput.parse_args(argv))
    figures.items += result.items
    figures.notes.setdefault("throughput", []).append(" ".join(argv) + " | " + result.notes.get("peak", ""))


def vllm_section(device: torch.device, figures: Figures) -> None:
    raise NotRun("not run: the vLLM plugin does not exist yet (issue 17)")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def markdown(figures: Figures, sections: dict[str, str]) -> str:
    lines = [f"# GPU figures: {figures.notes.get('device', '')}", "", figures.notes.get("environment", ""), "",
             "| section | figure | value | unit | against | load average |", "|---|---|---|---|---|---|"]
    for f in figures.items:
        value = f"{f.value:.3e}" if f.unit == "max abs difference" else f"{f.value:.4g}"
        lines.append(f"| {f.section} | {f.name} | {value} | {f.unit} | {f.baseline or ''} | {f.load} |")
    lines += ["", "| section | status |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sections.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--preset", default="2b", help="architecture of the speed section (CPU dry run: tiny)")
    p.add_argument("--memory-preset", default=None, help="architecture of the memory section (default 7b on CUDA, "
                   "the --preset on the CPU)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results"), help="folder for the JSON and Markdown")
    p.add_argument("--only", nargs="+", choices=["parity", "scar", "memory", "vllm"], default=None)
    p.add_argument("--parity-cases", type=int, default=None, help="the first N fixture cases (default: all; the "
                   "CPU dry run: 3, the test suite runs every case itself)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available (the CPU dry run: --device cpu --preset tiny)")
    cuda = device.type == "cuda"
    memory_preset = args.memory_preset or ("7b" if cuda else args.preset)
    dtype = "bfloat16" if cuda else "float32"
    small = [] if cuda else ["--photos", "1", "--k", "1", "--repeats", "1"]
    scar = ["--device", args.device, "--preset", args.preset, "--dtype", dtype, "--only", "scar",
            "--official-without-head",
            *(small or ["--photos", "16", "--k", "1", "3", "--repeats", "3"])]
    memory = ["--device", args.device, "--preset", memory_preset, "--dtype", dtype, "--only", "memory",
              *(small or ["--photos", "4", "--k", "3", "--batch-size", "16"])]
    figures = Figures()
    figures.notes.update({"device": device_label(device), "environment": environment(device)})
    steps: dict[str, Callable[[], Any]] = {
        "parity": lambda: parity_section(device, figures, args.parity_cases or (None if cuda else 3)),
        "scar": lambda: throughput_section(scar, figures),
        "memory": lambda: throughput_section(memory, figures),
        "vllm": lambda: vllm_section(device, figures),
    }
    status: dict[str, str] = {}
    for name, step in steps.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            step()
            status[name] = f"ok, {time.perf_counter() - start:.0f} s"
        except NotRun as exc:
            status[name] = str(exc)
        except Exception as exc:  # recorded; the other sections still run
            status[name] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
            traceback.print_exc()
        print(f"== {name}: {status[name]}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    figures.notes["sections"] = status
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{slug(figures.notes['device'])}" if cuda else f"dry-run-{slug(args.device)}-{args.preset}"
    figures.dump(out / f"{stem}.json")
    (out / f"{stem}.md").write_text(markdown(figures, status))
    print(json.dumps(status, indent=1))
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
