#!/usr/bin/env bash
# ADE20K linear probe (DINOv2 protocol: 40k iterations, global batch 16) on N processes.
#   N_GPUS=8 bash scripts/eval_semseg.sh --data_dir /data/ADEChallengeData2016 \
#       --pretrained output/unic_vitb16_in1k/checkpoint.pth [--layers last4] [--visualize 16]
set -euo pipefail
cd "$(dirname "$0")/.."
N_GPUS=${N_GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun --standalone --nproc_per_node "${N_GPUS}" eval_dense/eval_semseg.py "$@"
