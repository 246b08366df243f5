r"""Zero-shot classification through a student's adaptor to a CLIP teacher (SPEC section 11).

    torchrun --nproc_per_node N main_zeroshot.py model.source=run/student.pth zeroshot.teacher=metaclip_vith14 \
        zeroshot.teacher_weights=/weights/metaclip_h14_fullcc2.5b.bin data.root=/data/imagenet
    python main_zeroshot.py model.source=run/checkpoint.pth zeroshot.teacher=open_clip:ViT-B-16:openai \
        zeroshot.teacher_weights=hub data.root=/data/my_set data.split=test zeroshot.classnames=names.tsv

The student's image embedding is normalize(f_cls @ proj): f_cls its adaptor's prediction of the teacher's cls
token (before the projection), proj the teacher's CLIP visual projection. Class embeddings come from the
teacher's open_clip text tower (prompt templates averaged). The teacher itself is scored beside the student
(zeroshot.evaluate_teacher=false skips it; model.source=null scores the teacher alone). Images are class
folders under <data.root>/<data.split>; zeroshot.classnames maps the folders to names (built-in for
ImageNet's wnid folders). Writes results.json, results.md, predictions.npz and the resolved config.yaml to
run.output_dir (default: <checkpoint dir>/eval/zeroshot-<data>-<split>-<teacher>).
"""

from __future__ import annotations

import logging
import sys

from unic import cli as config_cli
from unic import distributed
from unic.config import ConfigError

logger = logging.getLogger("main_zeroshot")

EXAMPLE = ("python main_zeroshot.py model.source=run/student.pth zeroshot.teacher=metaclip_vith14 "
           "zeroshot.teacher_weights=/weights/metaclip_h14_fullcc2.5b.bin data.root=/data/imagenet")


def main(argv: list[str] | None = None) -> int:
    from unic.eval.zeroshot import ZeroShotConfig, run

    try:
        cfg, _ = config_cli.parse(argv, ZeroShotConfig, __doc__, EXAMPLE)
        device = distributed.init_distributed(cfg.run.device)
        run(cfg, device)
    except ConfigError as err:
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
