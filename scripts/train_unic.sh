#!/usr/bin/env bash
# Launch UNIC training with torchrun, from any folder: relative paths (data.root, OUTPUT_DIR, CONFIG files)
# are the caller's, not the repository's.
#   N_GPUS=4 OUTPUT_DIR=output/unic_b16 CONFIG=unic_vitb16_in1k \
#       bash scripts/train_unic.sh data.root=/imagenet teachers.weights_dir=/ckpts
# CONFIG is a packaged preset name or a YAML file; extra arguments are passed through (key=value overrides).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
N_GPUS=${N_GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
CONFIG=${CONFIG:-unic_vitb16_in1k}
OUTPUT_DIR=${OUTPUT_DIR:-output/$(basename "${CONFIG}" .yaml)}
exec torchrun --standalone --nproc_per_node "${N_GPUS}" "${REPO}/main_unic.py" --config "${CONFIG}" \
    run.output_dir="${OUTPUT_DIR}" "$@"
