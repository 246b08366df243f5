#!/usr/bin/env bash
# Retrieval / kNN evaluation with torchrun (descriptors sharded over the processes, search on rank 0).
#   N_GPUS=8 bash scripts/eval_retrieval.sh model.source=output/run/checkpoint.pth data.dataset=uned data.root=/data/uned
# Every argument is passed through to main_retrieval.py (see `python main_retrieval.py --help`).
set -euo pipefail
N_GPUS=${N_GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun --standalone --nproc_per_node "${N_GPUS}" "$(dirname "$0")/../main_retrieval.py" "$@"
