"""ADE20K linear semantic segmentation on a frozen encoder (DINOv2 linear protocol, no mmcv/mmseg).

    [torchrun --nproc_per_node N] eval_dense/eval_semseg.py [--config F] model.source=run/checkpoint.pth \\
        data.root=ADEChallengeData2016 [semseg.schedule=unic|dinov2] [semseg.layers=last4] [semseg.visualize=8]
    eval_dense/eval_semseg.py model.source=run/checkpoint.pth data.root=ADEChallengeData2016 \\
        semseg.load_head=run/semseg_ade20k_unic_last/head.pth        # re-score a saved head

Trains BatchNorm + 1x1 conv on the final-normed patch tokens of the frozen backbone's last block (or last 4
concatenated): 512x512 crops of images rescaled 0.5-2.0 x (99999999, 512) (short side 512 x ratio), flip,
photometric distortion; AdamW lr 1e-3 wd 1e-4, poly schedule after 1500 linear warm-up iterations; then
evaluates on the validation split with sliding windows (512, stride 341). ``semseg.schedule`` picks the length:

- ``unic`` (default): 80k iterations at a global batch of 8, UNIC's ``eval_dense/eval_semseg.py`` defaults
  (``samples_per_gpu=8``, ``iter_with_8_gpu=10000`` x 8 on its single GPU), the schedule behind UNIC's published
  39.6 (ViT-B/16) and UNIC-L's 48.3 (ViT-L/14) mIoU;
- ``dinov2``: 40k iterations at a global batch of 16 (2 per GPU x 8 GPUs), DINOv2's published
  ``dinov2_vit*14_ade20k_linear_config.py``.

Both see 640k crops and evaluate every 10k iterations; the reported numbers are those after the last one.
Settings given explicitly (``semseg.iterations``, ``data.global_batch``, ``semseg.lr``, ...) override the
schedule's and are recorded as such. The global batch does not depend on the number of processes (SyncBN on
CUDA, so BN statistics are over the global batch too).

Writes to ``run.output_dir`` (default: ``<checkpoint dir>/semseg_ade20k_<schedule>_<layers>``):
``results.json`` (mIoU, aAcc, mAcc and per-class IoU/accuracy as fractions in [0, 1], ``"unit": "fraction"``,
the schedule and every resolved setting), ``config.yaml``, ``head.pth``, ``log.txt`` (metrics in percent,
``mIoU 39.60 %``), ``metrics.jsonl`` (fractions), TensorBoard logs and, with ``semseg.visualize=N``,
``visualizations/*.png`` (image | ground truth | prediction). A re-scoring run (``semseg.load_head``) writes by
default to the head's folder, as ``results_eval.json``, ``eval_config.yaml`` and ``visualizations_eval/``, so the
training's files are never replaced (its log lines are appended to ``log.txt``, its metrics to ``metrics.jsonl``
as split ``eval``). Every training crop's augmentation is seeded from (run.seed, epoch, image index): the head
does not depend on ``data.num_workers`` (capped at the machine's CPUs; results.json records the count used).
Library: :mod:`unic.eval.semseg_run`.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unic import distributed
from unic.cli import parse
from unic.config import ConfigError
from unic.eval.semseg_run import SemsegConfig, run, schedules_text
from unic.io import CheckpointWriteError

EXAMPLE = ("eval_dense/eval_semseg.py model.source=output/unic_vitb16_in1k/checkpoint.pth "
           "data.root=/data/ADEChallengeData2016 semseg.layers=last4 semseg.visualize=16")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = parse(argv, SemsegConfig, f"{__doc__}\n{schedules_text()}", EXAMPLE,
                       renamed={"batch_size": "data.global_batch", "num_classes": "data.num_classes"})
        run(cfg)
    except CheckpointWriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, ValueError) as err:  # settings, missing files, encoder, layout, labels
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.destroy_distributed()
    return 0


def cli() -> None:
    """Console-script and ``__main__`` entry: exits with main()'s code (see distributed.exit_process)."""
    distributed.exit_process(main())


if __name__ == "__main__":
    cli()
