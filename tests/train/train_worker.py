"""Run by tests/train/test_distributed.py under torchrun: `train()` from a config file, optionally stopped or
resumed; rank 0 writes the losses of the steps it ran."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from virtue.train.config import TrainConfig  # noqa: E402
from virtue.train.trainer import train  # noqa: E402


def main(config: str, out: str, stop: int, resume: bool) -> None:
    cfg = TrainConfig.load(config)
    result = train(cfg, resume=resume, stop_at_step=stop or None, show_progress_bar=False)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"losses": result.losses, "steps": result.steps}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume")
