"""Run by tests/eval/test_distributed_eval.py under torchrun: inside a process group (as in a training job), rank 0
alone evaluates with `distributed=False` while the other rank waits at a barrier; rank 0 writes the report."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch.distributed as dist  # noqa: E402

from tests.conftest import MINI_SCAR  # noqa: E402
from virtue import VirtueModel  # noqa: E402
from virtue.eval.runner import EvalConfig, run_eval  # noqa: E402


def main(model_dir: str, data_root: str, out: str) -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        model = VirtueModel.from_pretrained(model_dir, allow_hub=False)
        cfg = EvalConfig(benchmark="scar", data_root=data_root, image_root=str(MINI_SCAR), limit=4, batch_size=4,
                         cache_dir=None, out_dir=out, show_progress_bar=False, distributed=False)
        run_eval(model, cfg, model_name="tiny")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
