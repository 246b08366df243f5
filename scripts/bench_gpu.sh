#!/usr/bin/env bash
# The GPU fast path, measured in one run of a few minutes on one GPU (issue 10):
#   bash scripts/bench_gpu.sh [out_dir]
# 1. the device (nvidia-smi, torch, CUDA);
# 2. the CUDA-only tests: training steps under torch.cuda.set_sync_debug_mode("error"), fused AdamW;
# 3. scripts/bench_train.py --baseline on the UNIC ViT-B/16 recipe (4 ViT-B/16 teachers with random weights,
#    224 px, 128 images on the GPU, bf16): images/s of the fast path and of the plain eager path, their
#    ratio, MFU, peak memory and host syncs per step;
# 4. the loader's ceiling (--data-only) with CPU decoding and with GPU decoding (data.decode=gpu).
# Images: synthetic 500x375 JPEGs in the ImageNet layout, written once under out_dir/images.
# Every figure is also written as JSON under out_dir; the summary is out_dir/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench_gpu_out}}
mkdir -p "$OUT_DIR"
STEPS=${BENCH_STEPS:-10}
WARMUP=${BENCH_WARMUP:-5}

{
  echo "== device"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(0))"
} | tee "$OUT_DIR/device.txt"

python - "$OUT_DIR/images" <<'PY'
import os, sys
import numpy as np
from PIL import Image

root = sys.argv[1]
if not os.path.isfile(os.path.join(root, "COMPLETE")):
    rng = np.random.default_rng(0)
    for split, count in (("train", 1024), ("val", 64)):
        for c in range(2):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count // 2):
                y, x = np.mgrid[0:375, 0:500]
                base = np.stack([(x * (1 + c) + i) % 256, (y * 2 + i) % 256, (x + y) % 256], -1).astype(np.float32)
                noise = rng.normal(0, 20, base.shape)
                Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(
                    os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    open(os.path.join(root, "COMPLETE"), "w").write("ok\n")
print("images in", root)
PY

echo "== CUDA tests"
python -m pytest -q -p no:cacheprovider tests/test_fast_path.py 2>&1 | tail -5 | tee "$OUT_DIR/tests.txt"

RECIPE=(--config unic/configs/unic_vitb16_in1k.yaml "data.root=$OUT_DIR/images" data.global_batch=128
        "teachers.weights={dino_vitb16: random, deit3_vitb16: random, ibot_vitb16: random, dbotft_vitb16: random}"
        train.validate=false)

echo "== UNIC ViT-B/16 recipe: fast path vs baseline"
python scripts/bench_train.py "${RECIPE[@]}" --warmup "$WARMUP" --steps "$STEPS" --baseline \
  > "$OUT_DIR/train.json" 2> "$OUT_DIR/train.log" || { tail -40 "$OUT_DIR/train.log"; exit 1; }

for decode in cpu gpu; do
  echo "== loader ceiling, decode=$decode"
  python scripts/bench_train.py "${RECIPE[@]}" --warmup 3 --steps "$STEPS" --data-only "data.decode=$decode" \
    > "$OUT_DIR/data_$decode.json" 2> "$OUT_DIR/data_$decode.log" || tail -20 "$OUT_DIR/data_$decode.log"
done

python - "$OUT_DIR" <<'PY' | tee "$OUT_DIR/summary.txt"
import json, os, sys

out = sys.argv[1]

def load(name):
    text = "\n" + open(os.path.join(out, name)).read()
    start = text.rfind("\n{\n")  # the JSON object printed after the log lines
    return json.loads(text[start + 1:]) if start >= 0 else None

train = load("train.json")
fast, base = train["fast"], train["baseline"]
print(f"device: {train['device']}")
for label, r in (("fast", fast), ("baseline", base)):
    mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "n/a"
    print(f"{label:9s} {r['images_per_s']:8.1f} img/s  MFU {mfu}  peak {r['peak_memory_gb']:.1f} GB  "
          f"syncs/step {r['host_syncs_per_step']}  compiled {r['compiled']}  fused {r['fused_optimizer']}")
print(f"speedup  {train['speedup']:.2f}x")
for decode in ("cpu", "gpu"):
    d = load(f"data_{decode}.json")
    if d:
        print(f"loader decode={decode}: {d['loader_images_per_s']:.0f} img/s ({d['num_workers']} workers)")
PY
