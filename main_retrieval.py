"""Retrieval and kNN evaluation entry point (SPEC section 8).

    torchrun --nproc_per_node N main_retrieval.py model.source=run/checkpoint.pth data.dataset=uned data.root=/data/uned
    python main_retrieval.py model.source=timm:vit_base_patch16_224.dino data.dataset=folder data.root=/data/sop
    python main_retrieval.py model.source=run/checkpoint.pth data.dataset=imagenet data.root=/data/imagenet
    python main_retrieval.py model.descriptors=run/eval/retrieval-uned-test-universal/descriptors.npz

Descriptors are extracted sharded over the ranks and saved to <output_dir>/descriptors.npz; rank 0 then searches
them (exact FAISS inner product, on every visible GPU when FAISS has GPU support) and writes results.json, the
resolved config.yaml, a table on stdout, TensorBoard scalars and, with retrieval.visualize=N, neighbour figures.
data.dataset names a dataset registry entry (unic.data.registry) whose defaults set the task, metrics and crop.
With no argument it evaluates output/demo/checkpoint.pth (from `python main_unic.py`) on the demo data.
"""

from __future__ import annotations

import logging
import sys

from unic import cli as config_cli
from unic import distributed
from unic.config import ConfigError

logger = logging.getLogger("main_retrieval")

EXAMPLE = ("python main_retrieval.py model.source=timm:vit_base_patch16_224.dino data.dataset=folder "
           "data.root=/data/sop retrieval.visualize=4")


def main(argv: list[str] | None = None) -> int:
    from unic.eval.retrieval import InputError, RetrievalConfig, run

    try:
        cfg, _ = config_cli.parse(argv, RetrievalConfig, __doc__, EXAMPLE)
        device = distributed.init_distributed(cfg.run.device)
        run(cfg, device)
    except (ConfigError, InputError) as err:
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
