#!/usr/bin/env bash
# Launch UNIC training with torchrun.
#   N_GPUS=4 OUTPUT_DIR=output/unic_b16 CONFIG=unic/configs/unic_vitb16_in1k.yaml \
#       bash scripts/train_unic.sh data.root=/imagenet teachers.weights_dir=/ckpts
# Extra arguments are passed through as key=value overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
N_GPUS=${N_GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
CONFIG=${CONFIG:-unic/configs/unic_vitb16_in1k.yaml}
OUTPUT_DIR=${OUTPUT_DIR:-output/$(basename "${CONFIG}" .yaml)}
exec torchrun --standalone --nproc_per_node "${N_GPUS}" main_unic.py --config "${CONFIG}" \
    run.output_dir="${OUTPUT_DIR}" "$@"
