"""Fault tolerance and hostile input (the chaos suite's guarantees, each backed here on CPU)."""

import glob
import importlib.util
import os
import random
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import REPO, tiny_overrides
from unic.config import load_config
from unic.data.folders import ImageListDataset
from unic.data.transforms import eval_transform
from unic.data.uned import read_info_file
from unic.io import CheckpointWriteError, load_checkpoint, save_checkpoint
from unic.train import checkpoint as ckpt_lib
from unic.train import faults

spec = importlib.util.spec_from_file_location("chaos", os.path.join(REPO, "scripts", "chaos.py"))
chaos = importlib.util.module_from_spec(spec)
sys.modules["chaos"] = chaos  # dataclasses look their module up there
spec.loader.exec_module(chaos)


@pytest.fixture
def inject(monkeypatch):
    """Activate faults in this process (as UNIC_FAULTS would at start-up)."""
    def _set(spec: str):
        monkeypatch.setattr(faults, "_FAULTS", faults.parse(spec))
    return _set


def test_fault_spec_parsing():
    parsed = faults.parse("kill:rank=1:step=7:attempt=2; nan:step=3")
    assert [(f.kind, f.rank, f.step, f.attempt) for f in parsed] == [("kill", 1, 7, 2), ("nan", 0, 3, 0)]
    with pytest.raises(ValueError, match="unknown fault kind"):
        faults.parse("explode:step=1")


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, inject):
    """A full disk mid-write (a kill mid-write is scripts/chaos.py's checkpoint_crash scenario)."""
    path = tmp_path / "checkpoint.pth"
    faults.faulty_save({"step": 1, "w": torch.ones(3)}, str(path), step=1)
    inject("save_enospc:step=2")
    with pytest.raises(CheckpointWriteError, match="previous checkpoint is intact"):
        faults.faulty_save({"step": 2, "w": torch.zeros(10000)}, str(path), step=2)
    state = load_checkpoint(str(path))
    assert state["step"] == 1 and not glob.glob(str(tmp_path / ".*.tmp*"))


def test_partial_files_are_never_loaded_and_are_cleaned(tmp_path):
    save_checkpoint({"step": 4}, str(tmp_path / "checkpoint.pth"))
    partial = tmp_path / ".checkpoint.pth.tmp1234"
    partial.write_bytes(b"PK\x03\x04 half a zip")  # what a killed writer leaves
    assert load_checkpoint(str(tmp_path / "checkpoint.pth"))["step"] == 4
    assert ckpt_lib.remove_partial_files(str(tmp_path)) == [str(partial)]


def test_periodic_checkpoints_pruned_only_after_a_complete_write(tmp_path, inject):
    for step in (2, 4):
        faults.faulty_save({"step": step}, ckpt_lib.periodic_path(str(tmp_path), step), step=step)
        ckpt_lib.prune_periodic(str(tmp_path), 2)
    inject("save_enospc:step=6")
    with pytest.raises(CheckpointWriteError):
        faults.faulty_save({"step": 6, "w": torch.zeros(10000)}, ckpt_lib.periodic_path(str(tmp_path), 6), step=6)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_step00000002.pth", "checkpoint_step00000004.pth"]


def test_hostile_files_are_skipped_reported_and_never_hang(tmp_path):
    bad = chaos.make_hostile_domain(str(tmp_path), "hostile", num_good=20)
    samples = [(p, labels, 0) for p, labels in read_info_file(str(tmp_path), "hostile", "val")]
    ds = ImageListDataset(samples, eval_transform(16))
    loader = DataLoader(ds, batch_size=16, num_workers=2, timeout=120)
    reported, rows = {}, 0
    for batch in loader:
        rows += len(batch["image"])
        for lines in batch["bad"]:
            for line in filter(None, lines.split("\n")):
                path, _, reason = line.partition(": ")
                reported[path] = reason
    assert rows == len(samples)
    normalise = {os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p)) for p in reported}
    assert normalise == bad
    bombs = [r for p, r in reported.items() if "bomb" in p]
    assert bombs and all("DecompressionBomb" in r for r in bombs)
    assert any("not a regular file" in r for p, r in reported.items() if "fifo" in p)


def _tiny_trainer(tmp_path, demo_root, **extra):
    from unic.train.loop import Trainer

    cfg = load_config(None, tiny_overrides(demo_root, str(tmp_path / "run"), **{"train.validate": False, **extra}))
    trainer = Trainer(cfg)
    faults.install(trainer)  # as main_unic.py does
    return trainer


def test_nan_step_is_skipped_and_counted(tmp_path, demo_root, inject):
    inject("nan:step=2")
    trainer = _tiny_trainer(tmp_path, demo_root, **{"train.max_steps": 4})
    before = {}

    original = trainer.train_step

    def spy(images, domain=None, labels=None):
        if trainer.step == 2:
            before.update({k: v.clone() for k, v in trainer.model_state().items()})
        out = original(images, domain, labels)
        if trainer.step == 2:
            after = trainer.model_state()
            assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the state"
            assert out["skipped_step"].item() == 1
        return out

    trainer.train_step = spy
    trainer.train()
    assert trainer.bad_steps == 1 and trainer.step == 4
    trainer.close()


def test_consecutive_nan_steps_stop_with_last_good_checkpoint(tmp_path, demo_root, inject):
    from unic.train.loop import NonFiniteLossError

    inject(";".join(f"nan:step={s}" for s in range(5, 12)))
    trainer = _tiny_trainer(tmp_path, demo_root, **{"train.save_every": 4, "train.max_bad_steps": 3})
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps.*checkpoint.pth"):
        trainer.train()
    assert load_checkpoint(trainer.checkpoint_path)["step"] == 4
    trainer.close()


@pytest.fixture(scope="module")
def chaos_ctx(tmp_path_factory, demo_root):
    ctx = chaos.make_context(str(tmp_path_factory.mktemp("chaos")), trials=1, seed=0)
    return ctx


def test_malformed_invocations_each_fail_cleanly(chaos_ctx):
    outcome = chaos.malformed_invocations(chaos_ctx)
    assert outcome.trials >= 30
    assert outcome.ok, "\n".join(outcome.details)


def test_untrusted_files_are_refused(chaos_ctx):
    outcome = chaos.untrusted_files(chaos_ctx)
    assert outcome.ok, "\n".join(outcome.details)


def test_sigterm_under_torchrun_saves_and_resumes_exactly(chaos_ctx):
    """torchrun --max-restarts: SIGTERM on one rank saves a checkpoint on every rank at the same step, the job
    restarts itself and ends bit-identical to an uninterrupted run."""
    chaos_ctx.trials, chaos_ctx.rng = 1, random.Random(3)
    outcome = chaos.preempt(chaos_ctx, "term")
    assert outcome.ok, "\n".join(outcome.details)


def test_hung_rank_ends_with_a_timeout_naming_it(chaos_ctx):
    chaos_ctx.rng = random.Random(1)
    outcome = chaos.hung_collective(chaos_ctx)
    assert outcome.ok, "\n".join(outcome.details)
