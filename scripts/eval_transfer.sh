#!/usr/bin/env bash
# Transfer evaluation (t-ReX protocol) of one encoder on a list of data sets, then one summary table.
#   PRETRAINED=output/unic_vitb16_in1k/checkpoint.pth DATA_ROOT=/data \
#       DATASETS="aircraft cars196 dtd eurosat flowers pets food101 sun397" bash scripts/eval_transfer.sh
# Data set <name> is read from ${DATA_ROOT}/<name>, or from <NAME>_DIR (e.g. IN1K_DIR=/imagenet). Each data set
# uses its registry classifier (unic/data/registry.py: in1k, inat* and cog_* the SGD one on l2-normalised
# features, the others L-BFGS on raw features, as t-ReX). Features already extracted are reused. Extra
# arguments go to main_ft_extract.py as key=value (e.g. features.token_type=both).
# The classifier settings are UNIC's (eval_transfer/ in naver/unic): seed 22, 40 Optuna trials; like there, the
# L-BFGS classifier runs under Intel's scikit-learn patch (python -m sklearnex) when scikit-learn-intelex is
# installed (SKLEARNEX=0: plain scikit-learn, SKLEARNEX=1: require it).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)  # no cd: relative paths (DATA_ROOT, OUTPUT_ROOT, ...) are the caller's
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
: "${PRETRAINED:?set PRETRAINED to a UNIC checkpoint or timm:<model> / open_clip:<model>:<tag>}"
DATA_ROOT=${DATA_ROOT:-data}
DATASETS=${DATASETS:-"aircraft cars196 dtd eurosat flowers pets food101 sun397"}
N_GPUS=${N_GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
if [[ -f "${PRETRAINED}" ]]; then
    OUTPUT_ROOT=${OUTPUT_ROOT:-$(dirname "${PRETRAINED}")/transfer}
else
    OUTPUT_ROOT=${OUTPUT_ROOT:-output/transfer/${PRETRAINED//[:\/]/_}}
fi
SEED=${SEED:-22}
SKLEARNEX=${SKLEARNEX:-auto}
sklearn_python=(python)
if [[ "${SKLEARNEX}" == 1 ]] || { [[ "${SKLEARNEX}" == auto ]] && python -c "import sklearnex" 2>/dev/null; }; then
    sklearn_python=(python -m sklearnex)
fi

feature_dirs=()
for dataset in ${DATASETS}; do
    dir_var="$(echo "${dataset}" | tr '[:lower:]' '[:upper:]')_DIR"
    data_dir=${!dir_var:-${DATA_ROOT}/${dataset}}
    features_dir="${OUTPUT_ROOT}/features_${dataset}"
    if [[ ! -f "${features_dir}/features_trainval.pth" || ! -f "${features_dir}/features_test.pth" ]]; then
        torchrun --standalone --nproc_per_node "${N_GPUS}" "${REPO}/eval_transfer/main_ft_extract.py" \
            model.source="${PRETRAINED}" data.dataset="${dataset}" data.root="${data_dir}" \
            run.output_dir="${features_dir}" "$@"
    fi
    clf_type=$(python -c 'import sys; from unic.data.registry import get_dataset
print(get_dataset(sys.argv[1]).defaults["clf_type"])' "${dataset}")
    if [[ "${clf_type}" == logreg_sklearn ]]; then runner=("${sklearn_python[@]}"); else runner=(python); fi
    # features_norm: the classifier's default (none for logreg_sklearn, l2 for logreg_torch)
    "${runner[@]}" "${REPO}/eval_transfer/main_clf.py" clf.features_dir="${features_dir}" clf.clf_type="${clf_type}" \
        run.seed="${SEED}"
    feature_dirs+=("${features_dir}")
done
python "${REPO}/eval_transfer/print_results.py" "${feature_dirs[@]}"
