#!/usr/bin/env bash
# Every GPU figure in one command, on a CUDA machine with this repository copied over (and ../shared beside it, or
# shared/ inside it, or $VIRTUE_SHARED): installs what it needs, then runs benchmarks/gpu_all.py (about 8 minutes on
# an H100), which writes benchmarks/results/gpu-<card>.json and .md. Arguments go to gpu_all.py; the CPU dry run:
#   bash benchmarks/gpu_all.sh --device cpu --preset tiny --out /tmp/dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if ! "$PY" -c "import virtue" 2>/dev/null; then
  # The machine's own torch stays (a CUDA build); the rest comes from the index when it can be reached. Offline,
  # the package runs from the source tree with the libraries already installed (their versions are printed).
  "$PY" -m pip install -q -e . 2>/dev/null || "$PY" -m pip install -q --no-deps -e . 2>/dev/null \
    || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import torch, transformers, PIL; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__, 'Pillow', PIL.__version__)"
exec "$PY" benchmarks/gpu_all.py "$@"
