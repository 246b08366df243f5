"""Large students: FSDP2 sharding (train.parallelism=fsdp, 2 gloo processes on CPU) against DDP, its checkpoints
resumed under FSDP and under DDP, activation checkpointing against plain backward, the refused combinations
and the plan's memory per GPU for each way of scaling out."""

import copy
import json
import os
import shutil

import pytest
import torch

from tests.conftest import run_entry, tiny_overrides
from unic.config import ConfigError, load_config
from unic.io import load_checkpoint

# UNIC + UDON on the same global batch of 16, with the UNIC presets' per-parameter clipping active (gradient
# norms ~10-30 against 0.05). Nothing depends on the process count (no stochastic depth, UDON's local relational
# term off), so a 1-process DDP run continues a 2-process FSDP checkpoint as an uninterrupted run would.
COMMON = {"data.global_batch": 16, "train.log_every": 1, "train.max_steps": 4, "udon.relational_weight": 0.0,
          "optim.clip_grad": 0.05, "optim.clip_mode": "per_param", "optim.lr": 5e-4, "udon.head_lr": 5e-4}
# FSDP averages gradients by reduce-scatter, DDP by all-reduce: sums of the same two fp32 values (on CPU/gloo the
# losses come out bit-identical); 1e-5 relative leaves room for another reduction order while catching a real
# difference (a gradient clipped twice, a shard clipped on its own norm, a wrong resume: 1e-4 and more)
REL = 1e-5


def _metrics(out_dir, split="train"):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _run(demo_root, out, nproc, **extra):
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(out), **{**COMMON, **extra})], nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _resume_from(src, dst, step):
    """A fresh output folder holding only ``src``'s periodic checkpoint of ``step`` as its checkpoint.pth."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, f"checkpoint_step{step:08d}.pth"), os.path.join(dst, "checkpoint.pth"))


def test_fsdp_trains_like_ddp_and_its_checkpoints_resume_under_fsdp_and_ddp(tmp_path, demo_root):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _run(demo_root, ddp, 2, **{"train.validate_first": "true"})
    # activation checkpointing on the FSDP side too: the same losses again (recomputation is exact)
    result = _run(demo_root, fsdp, 2, **{"train.parallelism": "fsdp", "train.activation_checkpointing": "true",
                                         "train.validate_first": "true", "train.save_every": 2,
                                         "train.keep_checkpoints": 2})
    assert "plan: memory" in result.stdout and "(fsdp, activation checkpointing)" in result.stdout
    m_ddp, m_fsdp = _metrics(ddp), _metrics(fsdp)
    assert [r["step"] for r in m_fsdp] == [1, 2, 3, 4]
    for a, b in zip(m_ddp, m_fsdp):
        assert b["loss"] == pytest.approx(a["loss"], rel=REL), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=REL), a["step"]
    # validation scores a full copy of the sharded weights on every rank
    v_ddp, v_fsdp = _metrics(ddp, "val"), _metrics(fsdp, "val")
    assert [r["step"] for r in v_fsdp] == [0]
    for a, b in zip(v_ddp, v_fsdp):
        assert b["loss"] == pytest.approx(a["loss"], rel=REL) and b["knn20_top1"] == a["knn20_top1"]

    # the checkpoint is DDP's format, full tensors; the export holds the same backbone weights
    w_ddp, w_fsdp = (load_checkpoint(str(d / "checkpoint.pth")) for d in (ddp, fsdp))
    assert w_fsdp["model"].keys() == w_ddp["model"].keys()
    for key, value in w_ddp["model"].items():
        assert type(w_fsdp["model"][key]) is torch.Tensor and w_fsdp["model"][key].shape == value.shape, key
        torch.testing.assert_close(w_fsdp["model"][key], value, rtol=1e-4, atol=1e-6)
    assert w_fsdp["optimizer"]["state"].keys() == w_ddp["optimizer"]["state"].keys()
    for index, state in w_ddp["optimizer"]["state"].items():
        assert w_fsdp["optimizer"]["state"][index]["exp_avg"].shape == state["exp_avg"].shape
    student = load_checkpoint(str(fsdp / "student.pth"))["state_dict"]
    for key, value in student.items():
        assert torch.equal(value, w_fsdp["model"][f"backbone.{key}"]), key

    # resumed at step 2 under FSDP (2 processes) and under DDP (1 process): steps 3 and 4 as uninterrupted
    for name, nproc, parallelism in (("fsdp_resumed", 2, "fsdp"), ("ddp_resumed", 1, "ddp")):
        out = tmp_path / name
        _resume_from(fsdp, out, 2)
        result = _run(demo_root, out, nproc, **{"train.parallelism": parallelism, "train.validate": "false"})
        assert f"resumed from {out / 'checkpoint.pth'} at step 2" in result.stdout
        resumed = _metrics(out)
        assert [r["step"] for r in resumed] == [3, 4]
        for a, b in zip(m_fsdp[2:], resumed):
            assert b["loss"] == pytest.approx(a["loss"], rel=REL), (name, a["step"])
        final = load_checkpoint(str(out / "checkpoint.pth"))["model"]
        for key, value in w_fsdp["model"].items():
            torch.testing.assert_close(final[key], value, rtol=1e-4, atol=1e-6)


def _tiny_unic_model(seed: int = 0):
    from unic.models.ladder import Ladder, UnicModel
    from unic.models.student import build_student

    torch.manual_seed(seed)
    backbone = build_student("vit_tiny_patch16_224", 32, 0.2, {"patch_size": 8, "embed_dim": 32, "depth": 3,
                                                                "num_heads": 2})
    ladder = Ladder(32, 3, {"a": 16, "b": 24}, None, 32, 64)
    return UnicModel(backbone, ladder, torch.nn.Linear(32, 8), "normed").train()


def test_activation_checkpointing_gives_the_plain_gradients():
    """Every block recomputed in backward (timm's grad checkpointing, which forward_intermediates honours: the
    ladder still reads every block's taps) gives the gradients of plain backward, stochastic depth included
    (the recomputation replays the saved RNG state)."""
    plain = _tiny_unic_model()
    checkpointed = copy.deepcopy(plain)
    checkpointed.backbone.set_grad_checkpointing(True)
    calls = []
    checkpointed.backbone.blocks[1].register_forward_pre_hook(lambda *args: calls.append(1))
    images = torch.randn(4, 3, 32, 32)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(7)  # the same stochastic-depth draws
        out = model(images)
        loss = out["cls"].square().sum() + out["universal_raw"].sum()
        for per_type in out["preds"].values():
            loss = loss + sum((v * torch.linspace(-1, 1, v.shape[-1])).sum() for v in per_type.values())
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert len(calls) == 2  # the block ran again in backward
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("ladder.") for k in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert grads[0]["backbone.blocks.0.attn.qkv.weight"].abs().sum() > 0


def test_every_ladder_parameter_gets_a_gradient_tensor_of_its_own():
    """In-place gradient clipping scales each gradient once only if no two parameters share gradient memory.
    The grouped ladder once summed its second-layer biases as a stacked tensor, whose backward handed every
    block's bias a view of one tensor: clipping scaled it once per block (what first set DDP apart from FSDP,
    whose reduce-scatter writes fresh gradients)."""
    from unic.train.optim import clip_gradients

    model = _tiny_unic_model()
    model.ladder.batched = True  # the grouped kernels (the CUDA default) on this CPU
    out = model(torch.randn(2, 3, 32, 32))
    sum(v.square().sum() for per_type in out["preds"].values() for v in per_type.values()).backward()
    grads = {name: p.grad for name, p in model.ladder.named_parameters()}
    expected = {name: g * min(1.0, 1e-3 / (float(g.norm()) + 1e-6)) for name, g in grads.items()}
    clip_gradients(list(model.ladder.parameters()), 1e-3, "per_param")
    for name, p in model.ladder.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_the_trainer_switches_activation_checkpointing_on(tmp_path, demo_root):
    from unic.train.build import build_backbone

    cfg = load_config(None, tiny_overrides(demo_root, str(tmp_path), **{"train.activation_checkpointing": "true"}))
    assert build_backbone(cfg).grad_checkpointing
    assert not build_backbone(load_config(None, tiny_overrides(demo_root, str(tmp_path)))).grad_checkpointing


@pytest.mark.parametrize("override, words", [
    ({"train.compile": "true"}, "train.compile with train.parallelism=fsdp"),
    ({"run.precision": "fp16"}, "run.precision=fp16 with train.parallelism=fsdp"),
    ({"heads.partial_fc": 0.5}, "heads.partial_fc with train.parallelism=fsdp"),
    ({"unifex.enabled": "true", "unifex.backbone": "timm:vit_tiny_patch16_224", "loss.w_distill": 0,
      "udon.enabled": "false"}, "the UniFEx recipe (unifex.enabled)"),
    ({"train.parallelism": "zero3"}, "choose one of ddp, fsdp"),
])
def test_combinations_fsdp_cannot_run_are_refused_in_one_line(tmp_path, demo_root, override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, tiny_overrides(demo_root, str(tmp_path), **{"train.parallelism": "fsdp", **override}))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_plan_reports_memory_per_gpu_for_ddp_fsdp_and_activation_checkpointing():
    """UNIC-L on 8 GPUs (64 images each): FSDP divides the fp32 weights, gradients and AdamW state by the world
    size and drops DDP's buckets; activation checkpointing keeps only the blocks' inputs (and the ladder's)."""
    from unic.train.plan import build_plan, format_plan

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unic", "configs")
    cfg = load_config(os.path.join(configs, "unic_l_vitl14.yaml"),
                      ["data.root=/nonexistent", "train.parallelism=fsdp", "train.activation_checkpointing=true"])
    plan = build_plan(cfg, world_size=8)
    mem = plan["memory_per_gpu"]
    trainable = plan["student"]["trainable_params"] + plan["ladder"]["params"]
    assert mem["trainable_params"] == trainable
    assert mem["weights_grads_adamw_gb"] == pytest.approx(trainable * 16 / 8 / 2**30)
    assert "ddp_buckets_gb" not in mem and mem["autocast_weight_copies_gb"] == 0
    # the ladder (201.9M) and a block (12.6M) are the two largest units: bf16 weights + fp32 gradients
    block = 12 * 1024**2 + 13 * 1024
    assert mem["fsdp_gathered_gb"] == pytest.approx((plan["ladder"]["params"] + block) * 6 / 2**30)
    by = mem["total_gb_by_setup"]
    assert mem["total_gb"] == pytest.approx(by["fsdp+ac"])
    assert by["fsdp+ac"] < by["fsdp"] < by["ddp"] and by["fsdp+ac"] < by["ddp+ac"] < by["ddp"]
    # FSDP saves the state that DDP replicates: 7/8 of 16 B per parameter and autocast's 2 B copies (DDP's
    # buckets are its gradients: gradient_as_bucket_view)
    frozen = plan["student"]["params"] - plan["student"]["trainable_params"]  # the final norm (raw last tap)
    assert by["ddp"] - by["fsdp"] == pytest.approx(
        (trainable * (16 * 7 / 8 + 2) + frozen * 4 * 7 / 8) / 2**30 - mem["fsdp_gathered_gb"], rel=1e-9)
    assert "scaling  per GPU on 8: ddp" in format_plan(plan)
