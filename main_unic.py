"""Training entry point.

    torchrun --nproc_per_node N main_unic.py [--config unic/configs/<preset>.yaml] [key=value ...]

With no argument it trains the embedded demo (unic/configs/demo.yaml: small student, two small random teachers,
generated data).
"""

from __future__ import annotations

import argparse
import logging
import sys

from teachers import CheckpointFormatError, TeacherWeightsError
from unic import distributed
from unic.config import DEMO_CONFIG, ConfigError, load_config, objectives
from unic.data.uned import DataFormatError
from unic.io import CheckpointWriteError

logger = logging.getLogger("main_unic")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEMO_CONFIG,
                        help="YAML preset, only what differs from the schema defaults (default: the demo, %(default)s)")
    parser.add_argument("--plan", action="store_true",
                        help="print the preflight plan (models, teachers and their files, batch, schedule, FLOPs, "
                             "memory), write <run.output_dir>/plan.json and exit without training or using a GPU")
    parser.add_argument("--world_size", type=int, default=None,
                        help="with --plan: the number of processes the run will use (default: $WORLD_SIZE or 1)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 data.root=/imagenet")
    return parser.parse_intermixed_args(argv)


def run_plan(cfg, world_size: int | None) -> None:
    """``--plan``: the plan of ``cfg``, reading the train split's size when ``data.root`` is there."""
    import os

    from unic.train.plan import build_plan, format_plan, write_plan

    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if world < 1:
        raise ConfigError(f"--world_size (or $WORLD_SIZE) must be >= 1, got {world}")
    num_images = None
    if os.path.isdir(os.path.expanduser(cfg.data.root)):
        from unic.train.loop import build_datasets

        num_images = len(build_datasets(cfg, objectives(cfg)[1])[0])
    plan = build_plan(cfg, world, num_images)
    path = os.path.join(os.path.abspath(os.path.expanduser(cfg.run.output_dir)), "plan.json")
    write_plan(plan, path)
    print(format_plan(plan))
    print(f"plan written to {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trainer = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.config == DEMO_CONFIG and cfg.data.dataset != "demo":
            print(f"warning: no --config given, so the demo preset's small student and schedule are used with "
                  f"data.dataset={cfg.data.dataset}; pass --config unic/configs/<preset>.yaml for a real recipe",
                  file=sys.stderr)
        if args.plan:
            run_plan(cfg, args.world_size)
            return 0
        from unic.train.loop import CollectiveTimeoutError, NonFiniteLossError, Preempted, Trainer

        try:
            trainer = Trainer(cfg)
            trainer.train()
        except Preempted as stop:
            print(f"preempted: {stop}", file=sys.stderr)
            return 143  # 128 + SIGTERM: torchrun restarts the group, which resumes from the checkpoint
        except (NonFiniteLossError, CollectiveTimeoutError, CheckpointWriteError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    except (ConfigError, TeacherWeightsError, CheckpointFormatError, DataFormatError, FileNotFoundError,
            FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
        distributed.destroy_distributed()
    return 0


def cli() -> None:
    """Console-script and ``__main__`` entry: exits with main()'s code (see distributed.exit_process)."""
    distributed.exit_process(main())


if __name__ == "__main__":
    cli()
