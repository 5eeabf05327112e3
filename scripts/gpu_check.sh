#!/usr/bin/env bash
# The GPU path, checked: SmolLM2 probed on CUDA in fp32 and bf16 and one LoRA training stage of
# the pipeline on CUDA, compared with the CPU fp32 probe (tolerances and method:
# collapse_core/devtools/bench_gpu.py). Exit status: 0 pass, 1 out of tolerance, 2 no CUDA here.
# Extra arguments go to `python -m collapse_core bench gpu` (e.g. --prompts 128 --tokens 64).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch $(python -c 'import torch; print(torch.__version__)'); nothing was run (install the CUDA build of the pinned torch on a GPU machine)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
exec python -m collapse_core bench gpu "$@"
