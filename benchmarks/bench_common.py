"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this folder is on sys.path).

Measurement hygiene in one place:
* `PeakMeter`: the hardware's matmul peak measured before the timed runs and again after them (a loaded machine
  understates it; the higher of the two is used for MFU), and on CUDA the datasheet figure beside it;
* `Figures`: every printed figure recorded with the load average at that moment (`os.getloadavg()`), the baseline
  it is against and its device, so a JSON of the run can be kept (`--json`);
* `OtherLoad`: how many cores other processes used while a measurement ran;
* `rotated`: the order of the compared paths changes with every repeat (none always runs first).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The project's shared data: $VIRTUE_SHARED, else a `shared/` inside the checkout (how it travels to a GPU
    machine), else the `../shared` beside it."""
    if os.environ.get("VIRTUE_SHARED"):
        return Path(os.environ["VIRTUE_SHARED"])
    inside = REPO / "shared"
    return inside if inside.is_dir() else REPO.parent / "shared"


SHARED = shared_dir()
FIXTURE = SHARED / "fixtures/virtue-official-tiny"
TOKENIZER = FIXTURE / "checkpoint"
PHOTOS = SHARED / "data/mini-scar/images"


# ---------------------------------------------------------------------------------------------------------------
# The machine


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. "0.52/0.61/0.70"."""
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


class OtherLoad:
    """CPU used by other processes while active, in cores on average: the machine's busy CPU time (/proc/stat)
    minus this process's and its reaped children's (DataLoader workers, memory children), over the wall time."""

    cores = 0.0

    def __enter__(self) -> OtherLoad:
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        (t0, busy0, ours0), (t1, busy1, ours1) = self._start, self._sample()
        self.cores = max(0.0, (busy1 - busy0 - (ours1 - ours0)) / max(t1 - t0, 1e-9))

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return time.perf_counter(), busy, sum(u.ru_utime + u.ru_stime for u in usage)


def cpu_model_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def device_label(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"{cpu_model_name()}, {n} torch thread{'s' if n != 1 else ''}"


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "git: unknown"
    return f"git {head}{' (tracked files modified)' if dirty else ''}"


def environment(device: Any) -> str:
    import PIL
    import torch
    import transformers

    return (f"device: {device_label(device)}; python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, Pillow {PIL.__version__}, torch threads "
            f"{torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), CPUs {os.cpu_count()} (usable "
            f"{len(os.sched_getaffinity(0))}), load average {load_average()}; {git_state()}")


# ---------------------------------------------------------------------------------------------------------------
# Peaks

# Datasheet dense peaks (TFLOP/s) by device name: (substrings of the upper-cased name, label, bf16/fp16 tensor core,
# fp32 without tensor cores). First match wins.
DATASHEET_PEAKS: tuple[tuple[tuple[str, ...], str, float, float], ...] = (
    (("H200",), "H200", 989.0, 67.0),
    (("H100", "PCIE"), "H100 PCIe", 756.0, 51.0),
    (("H100", "NVL"), "H100 NVL", 835.0, 60.0),
    (("H100",), "H100 SXM", 989.0, 67.0),
    (("A100",), "A100", 312.0, 19.5),
)


def datasheet_peak(name: str, dtype: Any) -> tuple[float | None, str]:
    """The datasheet's dense peak (TFLOP/s) for a CUDA device name and dtype, with its label."""
    import torch

    for keys, label, bf16, fp32 in DATASHEET_PEAKS:
        if all(k in name.upper() for k in keys):
            if dtype in (torch.bfloat16, torch.float16):
                return bf16, f"datasheet dense bf16 peak of {label}: {bf16:g} TFLOP/s"
            return fp32, f"datasheet fp32 (no tensor cores, TF32 off) peak of {label}: {fp32:g} TFLOP/s"
    return None, f"no datasheet peak known for {name}"


def matmul_peak(device: Any, dtype: Any) -> float:
    """TFLOP/s of the best square matmul in `dtype` on `device`: 2048² (CPU, best of 4) or 8192² (CUDA, best of 10
    after 3 warm-ups), at the thread count set now."""
    import torch

    n, runs = (8192, 10) if device.type == "cuda" else (2048, 4)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3 if device.type == "cuda" else 1):
        a @ b
    best = float("inf")
    for _ in range(runs):
        best = min(best, timed(lambda: a @ b, device))
    return 2 * n**3 / best / 1e12


@dataclass
class PeakMeter:
    """The matmul peak measured before and after the timed runs; MFU uses the higher (a busy moment understates
    the peak, which would overstate MFU)."""

    device: Any
    dtype: Any
    before: float | None = None
    after: float | None = None
    datasheet: float | None = None
    datasheet_note: str = ""

    def measure_before(self) -> None:
        self.before = matmul_peak(self.device, self.dtype)
        if self.device.type == "cuda":
            import torch

            self.datasheet, self.datasheet_note = datasheet_peak(torch.cuda.get_device_name(self.device), self.dtype)

    def measure_after(self) -> None:
        self.after = matmul_peak(self.device, self.dtype)

    @property
    def best(self) -> float | None:
        known = [v for v in (self.before, self.after) if v is not None]
        return max(known) if known else None

    def note(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        parts = [f"measured {dtype} matmul peak: {_fmt(self.before)} TFLOP/s before the timed runs, "
                 f"{_fmt(self.after)} after (MFU uses the higher)"]
        if self.datasheet_note:
            parts.append(self.datasheet_note)
        return "; ".join(parts)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


# ---------------------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def rotated(seq: Sequence[Any], r: int) -> list[Any]:
    """The r-th rotation: alternating repeats start with a different configuration each time."""
    r %= len(seq)
    return list(seq[r:]) + list(seq[:r])


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Figure:
    section: str
    name: str
    value: float
    unit: str
    baseline: str | None = None  # what a ratio is against, by name
    device: str = ""
    load: str = field(default_factory=load_average)  # at the moment the figure was taken


@dataclass
class Figures:
    """Every figure of a run, with its load average and baseline; `dump` writes them as JSON."""

    items: list[Figure] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, section: str, name: str, value: float, unit: str, *, baseline: str | None = None,
            device: str = "") -> Figure:
        figure = Figure(section, name, float(value), unit, baseline, device)
        self.items.append(figure)
        return figure

    def dump(self, path: str | Path) -> None:
        data = {"notes": self.notes, "figures": [asdict(f) for f in self.items]}
        Path(path).write_text(json.dumps(data, indent=1) + "\n")


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for k, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------------------------------------------------------
# Models


def build_model(preset: str, device: Any, dtype: Any, seed: int = 0) -> Any:
    """A VIRTUE with random weights from an architecture preset (`virtue.model.presets.PRESETS`: tiny, mid, 2b,
    7b), built directly on `device` in `dtype` (a 7B model is never materialised in float32). Nothing is
    downloaded: the tokenizer is the fixture's (the Qwen2 tokenizer)."""
    import torch
    from transformers import AutoTokenizer

    from virtue.config import quiet_transformers
    from virtue.model.embedder import VirtueModel
    from virtue.model.presets import PRESETS

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
        config = PRESETS[preset]()
        torch.manual_seed(seed)
        before = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with device:
                model = VirtueModel(config, tokenizer)
        finally:
            torch.set_default_dtype(before)
    return model.to(device=device, dtype=dtype).eval()
