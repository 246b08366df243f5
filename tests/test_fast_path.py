"""The GPU fast path's CPU-checkable parts: no host-device synchronisation in a training step outside the
steps where the host acts (logging, checkpoints), device-side skipping of non-finite steps, fused AdamW."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import final_weights, tiny_overrides
from unic.config import load_config
from unic.train.health import SkippedSteps
from unic.train.optim import is_fused, optimizer_step
from unic.train.syncs import SyncCounter


def _trainer(tmp_path, demo_root, **extra):
    from unic.train.loop import Trainer

    values = {"train.validate": False, "data.num_workers": 1, "train.log_every": 4, "train.max_steps": 9, **extra}
    return Trainer(load_config(None, tiny_overrides(demo_root, str(tmp_path / "run"), **values)))


def _count_by_step(trainer) -> SyncCounter:
    """Train under a :class:`SyncCounter`, each event attributed to the step (0-based) that was running, or
    to ("data", step) while the loader hands out the step's batch: on the CPU the counter sees the loader's
    own host tensors too (a stream's shuffled order and seed when it starts), which are no device reads."""
    counter = SyncCounter()
    original_step, batches = trainer.train_step, trainer.batches
    original_next = batches.next

    def tagged_step(*args, **kwargs):
        counter.phase = trainer.step
        return original_step(*args, **kwargs)

    def tagged_next():
        counter.phase = ("data", trainer.step)
        try:
            return original_next()
        finally:
            counter.phase = trainer.step

    trainer.train_step, batches.next = tagged_step, tagged_next
    with counter:
        trainer.train()
    return counter


def test_counter_sees_every_kind_of_host_read():
    t = torch.arange(6.0)
    with SyncCounter() as counter:
        t.sum().item()
        float(t[0])
        bool(t[1] > 0)
        t.tolist()
        t.numpy()
        t[t > 2]
        torch.nonzero(t)
        torch.tensor([1.0, 2.0], device=t.device)  # a copy from the host
        torch.full((2,), 1.0, device=t.device)  # filled on the device
        (t * 2).add_(1)  # device work only
    kinds = [kind for kind, _ in counter.events]
    assert len(kinds) == 8, counter.report()
    assert sum("scalar read" in k for k in kinds) == 3 and sum("data-dependent" in k for k in kinds) == 2
    assert sum("tolist" in k or "numpy" in k for k in kinds) == 2 and "host-to-device" in kinds[-1]


def test_training_steps_do_not_synchronise_outside_logging_and_checkpoints(tmp_path, demo_root):
    trainer = _trainer(tmp_path, demo_root)
    assert is_fused(trainer.optimizer)  # the default on CPU as on CUDA: fused AdamW
    try:
        counter = _count_by_step(trainer)
    finally:
        trainer.close()
    steps_per_epoch = trainer.steps_per_epoch
    # the steps after which the host acts: logging (every 4th), epoch ends, the last step
    acting = {s for s in range(9) if (s + 1) % 4 == 0 or (s + 1) % steps_per_epoch == 0 or s == 8}
    quiet = [s for s in range(9) if s not in acting]
    assert quiet, "no step without logging or checkpoint to check"
    assert {s: counter.by_phase[s] for s in quiet} == {s: 0 for s in quiet}, counter.report()
    assert all(counter.by_phase[s] > 0 for s in acting)  # the counter does see the reads where they are


def test_an_unfused_optimizer_reads_the_skip_flag_every_step(tmp_path, demo_root):
    """The plain path (the benchmark's --baseline) cannot skip on the device: one read per step, which the
    counter reports (so the test above can fail)."""
    trainer = _trainer(tmp_path, demo_root, **{"optim.fused": False, "train.max_steps": 3})
    assert not is_fused(trainer.optimizer)
    try:
        counter = _count_by_step(trainer)
    finally:
        trainer.close()
    assert all(counter.by_phase[s] >= 1 for s in range(3))
    assert any("optim.py" in where for _, where in counter.events), counter.report()


@pytest.mark.parametrize("fused", [True, False])
def test_optimizer_step_skips_without_touching_state(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for skip in (False, True, False):
        model(torch.randn(5, 4)).square().sum().backward()
        before = ({k: v.clone() for k, v in model.state_dict().items()},
                  {k: v.clone() for s in optimizer.state.values() for k, v in s.items()})
        optimizer_step(optimizer, scaler, torch.tensor(skip))
        optimizer.zero_grad()
        after = (model.state_dict(), {k: v for s in optimizer.state.values() for k, v in s.items()})
        same = all(torch.equal(before[0][k], after[0][k]) for k in before[0])
        assert same == skip
        if skip:
            assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])  # moments and step count
    assert int(next(iter(optimizer.state.values()))["step"]) == 2


def test_fused_and_plain_adamw_take_the_same_steps():
    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 8) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05, fused=fused)
            for m, fused in zip(models, (True, False))]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(5):
        x = torch.randn(4, 8)
        for m, o in zip(models, opts):
            m(x).square().mean().backward()
            optimizer_step(o, scaler, torch.tensor(False))
            o.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_skipped_steps_windows():
    counts = SkippedSteps(torch.device("cpu"), start=10)
    for bad in (False, True, True, False, True):  # steps 10..14
        counts.update(torch.tensor(bad))
    window = counts.read()
    assert (window.skipped, window.run, window.longest, window.first, window.last) == (3, 1, 2, 11, 14)
    for bad in (True, True):  # steps 15, 16: the run of 14 goes on across the read
        counts.update(torch.tensor(bad))
    window = counts.read()
    assert (window.skipped, window.run, window.longest, window.first, window.last) == (2, 3, 3, 15, 16)
    counts.update(torch.tensor(False))
    window = counts.read()
    assert (window.skipped, window.run, window.longest, window.first) == (0, 0, 0, -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_under_sync_debug_mode_error(tmp_path, demo_root):
    """On a GPU: steps run with ``torch.cuda.set_sync_debug_mode("error")``, which raises on any
    synchronising CUDA call (after two warm-up steps, which allocate and initialise)."""
    trainer = _trainer(tmp_path, demo_root, **{"run.device": "cuda", "run.precision": "bf16"})
    try:
        batches = []
        trainer.batches.start(0)
        for _ in range(4):
            domain, batch = trainer.batches.next()
            batches.append((batch["image"].to(trainer.device), domain, trainer.batch_labels(domain, batch)))
        trainer.batches.close()
        for images, domain, labels in batches[:2]:
            trainer.train_step(images, domain, labels)
            trainer.step += 1
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for images, domain, labels in batches[2:]:
                trainer.train_step(images, domain, labels)
                trainer.step += 1
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert trainer.skipped_steps.read().skipped == 0
    finally:
        trainer.close()


def test_bf16_teacher_matches_the_float32_one_under_autocast():
    """Teachers are stored in bf16 for bf16 runs (the matmuls autocast runs anyway): the same tokens as the
    float32 teacher under bf16 autocast, to bf16 precision, from the same float32 input statistics."""
    from unic.models.teacher import FrozenTeacher

    torch.manual_seed(0)
    teacher = FrozenTeacher("toy_vit_p16_d96", "random", "/nonexistent")
    half = FrozenTeacher("toy_vit_p16_d96", "random", "/nonexistent")
    half.load_state_dict(teacher.state_dict())
    half.tokens.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.mean.dtype == torch.float32
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    images = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = teacher(images, mean, std, (8, 8))
        out = half(images, mean, std, (8, 8))
    for key in ("cls", "patch"):
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key], ref[key], rtol=0.05, atol=0.05)


def test_gpu_decode_trains_and_resumes_exactly(tmp_path, demo_root):
    """data.decode=gpu (here on the CPU device: the same code): the workers send encoded images and the
    augmentations drawn for each (index, seed); a run stopped at step 2 and resumed ends bit-identical."""
    from unic.train.loop import Trainer

    common = {"train.validate": False, "data.num_workers": 1, "udon.enabled": False, "data.decode": "gpu",
              "train.log_every": 2}

    def run(out, steps):
        overrides = tiny_overrides(demo_root, str(out), **common, **{"train.max_steps": steps})
        trainer = Trainer(load_config(None, overrides))
        try:
            assert trainer.device_augment is not None
            trainer.train()
        finally:
            trainer.close()

    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    run(tmp_path / "resumed", 4)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpu_decode_is_refused_where_it_does_not_apply(tmp_path, demo_root):
    from unic.config import ConfigError
    from unic.train.loop import Trainer

    cfg = load_config(None, tiny_overrides(demo_root, str(tmp_path / "run"), **{"data.decode": "gpu"}))  # UDON on
    with pytest.raises(ConfigError, match="data.decode=gpu"):
        Trainer(cfg)


def test_fp16_scaler_overflows_are_not_counted_as_bad_steps(tmp_path, demo_root):
    """Under fp16 the GradScaler skips the steps whose scaled gradients overflow and lowers its scale: routine,
    not non-finite steps (they neither count towards train.max_bad_steps nor block checkpoints)."""
    trainer = _trainer(tmp_path, demo_root, **{"run.precision": "fp16", "train.max_steps": 6, "data.num_workers": 0,
                                               "udon.enabled": False, "train.max_bad_steps": 2})
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows for the first steps
    try:
        trainer.train()
        assert trainer.bad_steps == 0 and trainer.scaler.get_scale() < 2.0**40
    finally:
        trainer.close()
