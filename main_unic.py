"""Training entry point.

    torchrun --nproc_per_node N main_unic.py [--config <preset>] [key=value ...]
    python main_unic.py --config unic_vitb16_in1k --plan --world_size 8 data.root=/imagenet

With no argument it trains the embedded demo (unic/configs/demo.yaml: small student, two small random teachers,
generated data); a run resumes from <run.output_dir>/checkpoint.pth, on any number of processes that divides
the global batch (config.yaml stays; changed settings go to config.resume-N.yaml). Ctrl-C or SIGTERM finishes
the step, saves a checkpoint and exits 130 or 143; a second Ctrl-C quits at once. A finished run ends with
results.json and curves.png.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from teachers import CheckpointFormatError, TeacherWeightsError
from unic import distributed
from unic.cli import parse
from unic.config import DEMO_CONFIG, ConfigError, UnicConfig, objectives, unifex_enabled
from unic.data.uned import DataFormatError
from unic.io import CheckpointWriteError

logger = logging.getLogger("main_unic")

EXAMPLE = "torchrun --nproc_per_node 4 main_unic.py --config unic_vitb16_in1k data.root=/imagenet optim.lr=1e-4"


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", action="store_true",
                        help="print the preflight plan (models, teachers and their files, batch, schedule, FLOPs, "
                             "memory), write <run.output_dir>/plan.json and exit without training or using a GPU")
    parser.add_argument("--world_size", type=int, default=None,
                        help="with --plan: the number of processes the run will use (default: $WORLD_SIZE or 1)")


def parse_args(argv: list[str] | None = None):
    """(the validated training config, the action flags) of a command line."""
    return parse(argv, UnicConfig, __doc__, EXAMPLE, default_config=DEMO_CONFIG, flags=_flags)


def run_plan(cfg, world_size: int | None) -> None:
    """``--plan``: the plan of ``cfg``, reading the train split's size (and UniFEx's merged classes) when
    ``data.root`` is there (else assuming the dataset's known size). Missing teacher files are reported, not
    fatal."""
    from unic.train.build import check_teacher_weights
    from unic.train.plan import build_plan, format_plan, skipped_features, write_plan

    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if world < 1:
        raise ConfigError(f"--world_size (or $WORLD_SIZE) must be >= 1, got {world}")
    num_images, num_classes, data_skips = None, None, []
    if cfg.data.root and os.path.isdir(os.path.expanduser(cfg.data.root)):
        from unic.train.build import build_datasets, domain_classes

        train_set = build_datasets(cfg, objectives(cfg)[1], data_skips)[0]
        num_images = len(train_set)
        if unifex_enabled(cfg):  # the size of the merged label space, so that the plan counts the head
            num_classes = sum(len(c) for c in domain_classes(train_set))
    plan = build_plan(cfg, world, num_images, skipped=skipped_features(cfg, data_skips), num_classes=num_classes)
    path = os.path.join(os.path.abspath(os.path.expanduser(cfg.run.output_dir)), "plan.json")
    write_plan(plan, path)
    print(format_plan(plan))
    try:
        check_teacher_weights(cfg)
    except TeacherWeightsError as err:
        print(f"before training: {err}")
    print(f"plan written to {path}")


def train(cfg) -> int:
    """Build the trainer and run it; the exit code of a run that ended on an error of its own."""
    from unic.train import faults
    from unic.train.loop import CollectiveTimeoutError, FinishedRun, NonFiniteLossError, Preempted, Trainer

    trainer = None
    try:
        trainer = Trainer(cfg)
        faults.install(trainer)  # the chaos suite's faults (UNIC_FAULTS); nothing otherwise
        trainer.train()
    except FinishedRun as finished:
        if distributed.is_main_process():
            print(finished)
        return 0
    except Preempted as stop:
        if stop.exit_code == 143:  # SIGTERM: torchrun restarts the group, which resumes from the checkpoint
            print(f"preempted: {stop}", file=sys.stderr)
        elif distributed.is_main_process():
            print(f"interrupted: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the first step: nothing trained, nothing to save
        if distributed.is_main_process():
            print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    except (NonFiniteLossError, CollectiveTimeoutError, CheckpointWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv)
        if args.config == DEMO_CONFIG and cfg.data.dataset != "demo":
            print(f"warning: no --config given, so the demo preset's small student and schedule are used with "
                  f"data.dataset={cfg.data.dataset}; pass --config <preset> for a real recipe", file=sys.stderr)
        if args.plan:
            run_plan(cfg, args.world_size)
            return 0
        return train(cfg)
    except (ConfigError, TeacherWeightsError, CheckpointFormatError, DataFormatError, FileNotFoundError,
            FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.destroy_distributed()


def cli() -> None:
    """Console-script and ``__main__`` entry: exits with main()'s code (see distributed.exit_process)."""
    distributed.exit_process(main())


if __name__ == "__main__":
    cli()
