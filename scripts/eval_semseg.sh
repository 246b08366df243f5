#!/usr/bin/env bash
# ADE20K linear probe on N processes (default: every visible GPU, at least 1).
#   bash scripts/eval_semseg.sh data.root=/data/ADEChallengeData2016 \
#       model.source=output/unic_vitb16_in1k/checkpoint.pth [semseg.layers=last4] [semseg.visualize=16]
# semseg.schedule=unic (default): UNIC's own 80k iterations at a global batch of 8 (UNIC ran it on 1 GPU), the
#   schedule behind its published 39.6 (ViT-B/16) / 48.3 (UNIC-L ViT-L/14) mIoU;
# semseg.schedule=dinov2: DINOv2's 40k iterations at a global batch of 16 (2 per GPU on 8 GPUs).
# The global batch is fixed by the schedule (or data.global_batch) whatever N is; N must divide it
# (unic: N_GPUS in 1, 2, 4, 8; dinov2: also 16). Explicit settings (semseg.iterations, semseg.lr, ...) override
# the schedule; eval_dense/eval_semseg.py --help lists every key.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)  # no cd: relative paths are the caller's
N_GPUS=${N_GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun --standalone --nproc_per_node "${N_GPUS}" "${REPO}/eval_dense/eval_semseg.py" "$@"
