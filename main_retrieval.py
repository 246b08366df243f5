"""Retrieval and kNN evaluation entry point (SPEC section 8).

    torchrun --nproc_per_node N main_retrieval.py --checkpoint run/checkpoint.pth --data uned --data.root /data/uned
    python main_retrieval.py --checkpoint timm:vit_base_patch16_224.dino --data folder --data.root /data/sop
    python main_retrieval.py --checkpoint run/checkpoint.pth --data imagenet --data.root /data/imagenet
    python main_retrieval.py --descriptors run/eval/retrieval-uned-test-universal/descriptors.npz

Descriptors are extracted sharded over the ranks and saved to <output_dir>/descriptors.npz; rank 0 then searches
them (exact FAISS inner product, on every visible GPU when FAISS has GPU support) and writes results.json, a
table on stdout, TensorBoard scalars and, with --visualize N, neighbour figures. With no argument it evaluates
output/demo/checkpoint.pth (from `python main_unic.py`) on the demo data.
"""

from __future__ import annotations

import argparse
import logging
import sys

from unic import distributed

logger = logging.getLogger("main_retrieval")


def _names(values: list[str] | None) -> list[str] | None:
    """``--domains cars,sop inat`` -> [cars, sop, inat]."""
    if values is None:
        return None
    return [name for value in values for name in value.split(",") if name]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model (or --descriptors)")
    model.add_argument("--checkpoint", help="UNIC checkpoint.pth / student.pth / universal.pth, timm:<model>[.<tag>] "
                       "or open_clip:<model>:<tag> (default: output/demo/checkpoint.pth)")
    model.add_argument("--weights", help="local weights file for a timm:/open_clip: model")
    model.add_argument("--embedding", default="auto",
                       help="auto (universal when the file has one, else backbone), backbone (cls), universal, "
                            "oracle (each domain's own teacher head) or domain:<name> (one head for all)")
    model.add_argument("--descriptors", metavar="NPZ", help="evaluate saved descriptors (no model, no images)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", choices=["demo", "uned", "folder", "imagenet"],
                      help="UnED layout (demo: generated), folder benchmark (root/<class>/ leave-one-out, or "
                           "root/query/ + root/gallery/), imagenet (train/ + val/, kNN); default demo")
    data.add_argument("--data.root", dest="data_root", metavar="DIR", help="data folder")
    data.add_argument("--split", help="query split: test (default) or val for retrieval; val for kNN")
    data.add_argument("--domains", nargs="+", metavar="NAME", help="domains to evaluate (default: all); a,b or a b")
    data.add_argument("--pairs", nargs="+", metavar="DOMAIN=QUERY:INDEX",
                      help="explicit query/index splits, e.g. met=test:index (default: the UnED table)")
    data.add_argument("--name", help="benchmark name of --data folder/imagenet (default: folder name / imagenet)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--task", choices=["retrieval", "knn"],
                            help="default: knn for --data imagenet, else retrieval")
    evaluation.add_argument("--metrics", help="uned (R@1,mMP@5,mAP@5), recall (R@1..R@100,mAP@100), all, or a "
                            "comma list; default: recall for --data folder, else uned")
    evaluation.add_argument("--modes", nargs="+", choices=["separate", "merged"],
                            help="indexes to search (default: both; separate for folders and oracle)")
    evaluation.add_argument("--knn_k", nargs="+", type=int, default=[10, 20, 100, 200], help="kNN neighbours")
    evaluation.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    evaluation.add_argument("--chunk_size", type=int, default=8192, help="queries per FAISS search call")
    evaluation.add_argument("--visualize", type=int, default=0, metavar="N",
                            help="PNG per domain: N queries and their top-8 neighbours")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--img_size", type=int, help="input size (default: the encoder's)")
    runtime.add_argument("--crop_ratio", type=float,
                         help="resize short side to img_size/ratio, centre crop (default: 1.0 UnED, 0.875 others)")
    runtime.add_argument("--batch_size", type=int, default=128, help="images per process and step")
    runtime.add_argument("--num_workers", type=int, default=8, help="data-loading workers per process")
    runtime.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                         help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU)")
    runtime.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    runtime.add_argument("--output_dir", help="default: <checkpoint dir>/eval/<task>-<data>-<split>-<embedding>, "
                         "or the folder of --descriptors")
    args = parser.parse_args(argv)
    args.domains = _names(args.domains)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from unic.eval.retrieval import EvalConfig, InputError, run

    fields = vars(args)
    device_name = fields.pop("device")
    try:
        try:
            device = distributed.init_distributed(device_name)
        except RuntimeError as err:  # --device cuda without CUDA
            raise InputError(str(err)) from err
        run(EvalConfig(**fields), device)
    except InputError as err:
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
