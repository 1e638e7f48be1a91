"""Run by tests/eval/test_memory.py in a fresh interpreter: build a 1-layer model of Qwen2-VL-2B's width (random
weights), evaluate one MMEB task, print the peak RSS the evaluation added above the loaded model (JSON)."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main(data_root: str, out: str, tokenizer_dir: str) -> None:
    import torch
    from transformers import AutoTokenizer

    from virtue import VirtueModel
    from virtue.eval.runner import EvalConfig, run_eval
    from virtue.model.presets import tiny_config

    config = tiny_config(hidden_size=1536, num_layers=1, sam_enabled=False)
    backbone = copy.deepcopy(config.backbone)
    backbone["text_config"]["intermediate_size"] = 64  # only the width D matters for the bound: a small FFN
    torch.manual_seed(0)
    model = VirtueModel(dataclasses.replace(config, backbone=backbone), AutoTokenizer.from_pretrained(tokenizer_dir))
    model.eval()
    cfg = EvalConfig(benchmark="mmeb", data_root=data_root, tasks=("MSCOCO_i2t",), batch_size=256,
                     cache_dir=str(Path(out) / "cache"), out_dir=str(Path(out) / "results"), show_progress_bar=False)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak: building the model does not count
        f.write("5")
    base = rss_kib("VmRSS")
    start = time.perf_counter()
    report = run_eval(model, cfg, model_name="width-1536")
    print(json.dumps({"peak_above_model_mib": (rss_kib("VmHWM") - base) / 1024, "model_mib": base / 1024,
                      "seconds": time.perf_counter() - start, "dim": model.config.hidden_size,
                      "encoded": report.timings["encoded_inputs"], "n": report.tasks["MSCOCO_i2t"]["n"]}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
