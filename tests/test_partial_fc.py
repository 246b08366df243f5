"""Partial FC against the replicated margin heads: 1 and 2 real gloo ranks against one process on the union
batch, the class draw, UDON with sharded classifiers, and a resume across a world-size change."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.conftest import free_port
from unic import distributed
from unic.losses.udon import udon_loss
from unic.models.heads import build_margin_head
from unic.models.partial_fc import (PartialFC, draw_classes, full_state, load_full_state, num_sampled_classes,
                                    optimizer_state_dict, shard_range, sharded_parameters)
from unic.models.universal import DomainHeads

C, D, E = 13, 8, 5  # classes (odd: the shards differ in size), embedding dims of teacher and universal side
HEADS = {
    "normface": {}, "cosface": {}, "arcface": {}, "subcenter_arcface": {"k": 3},
    "dynm_arcface": {"class_counts": [5, 1, 9, 2, 2, 40, 7, 3, 3, 11, 1, 6, 8]},
    "adacos": {}, "liarcface": {}, "curricularface": {}, "adaface": {},
}
RATES = (1.0, 0.5)
SEED = 7


def local_batch(rank: int, step: int, dim: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch (3 rows on rank 0, 5 on rank 1) with spread-out norms (AdaFace)."""
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + dim)
    n = 3 + 2 * rank
    y = torch.randint(0, C, (n,), generator=g)
    e = torch.randn(n, dim, generator=g) * (1 + 10 * torch.rand(n, 1, generator=g))
    return e, y


def union_batch(world: int, step: int, dim: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [local_batch(r, step, dim) for r in range(world)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def rows_of(rank: int) -> slice:
    start = sum(3 + 2 * r for r in range(rank))
    return slice(start, start + 3 + 2 * rank)


def pfc_step(name: str, rate: float, e: torch.Tensor, y: torch.Tensor, step: int = 0) -> dict:
    """One forward/backward of a fresh Partial FC; what a comparison needs."""
    pfc = PartialFC(name, D, C, rate, SEED, **HEADS[name]).train()
    e = e.clone().requires_grad_(True)
    out = pfc(e, y, step=step)
    out["loss"].backward()
    return {"loss": out["loss"].detach(), "e_grad": e.grad, "w_grad": pfc.weight.grad, "weight": pfc.weight.detach(),
            "buffers": {k: v.clone() for k, v in pfc.head.named_buffers()},
            "classes": out["sample"].classes_N, "num_sampled": out["sample"].num_sampled}


def udon_step(rate: float, t_raw: torch.Tensor, u_raw: torch.Tensor, y: torch.Tensor, head: str = "arcface") -> dict:
    heads = DomainHeads(4, {"a": C}, D, E, head, {}, partial_fc=rate, seed=SEED).train()
    t_raw, u_raw = t_raw.clone().requires_grad_(True), u_raw.clone().requires_grad_(True)
    out = udon_loss(t_raw, u_raw, y, heads.teacher_classifiers["a"], heads.universal_classifiers["a"], step=3)
    (out["ce_teacher"] + out["ce_universal"] + out["kl"]).backward()
    return {**{k: v.detach() for k, v in out.items()}, "t_grad": t_raw.grad, "u_grad": u_raw.grad,
            "wt_grad": heads.teacher_classifiers["a"].weight.grad, "wu_grad": heads.universal_classifiers["a"].weight.grad}


def train_steps(pfc: PartialFC, optimizer: torch.optim.Optimizer, world: int, rank: int, steps: range) -> None:
    for step in steps:
        e, y = local_batch(rank, step) if world > 1 else union_batch(2, step)
        pfc(e, y, step=step)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


RESUME = dict(name="curricularface", rate=0.6)  # a stateful head (t) and a real draw


def resume_model() -> tuple[PartialFC, torch.optim.Optimizer]:
    pfc = PartialFC(RESUME["name"], D, C, RESUME["rate"], SEED).train()
    return pfc, torch.optim.AdamW(pfc.parameters(), lr=0.05, weight_decay=0.1)


def save_resume_state(pfc: PartialFC, optimizer: torch.optim.Optimizer, path: Path) -> None:
    state = {"centres": full_state(pfc, optimizer), "module": pfc.state_dict(),
             "optimizer": optimizer_state_dict(optimizer, pfc)}
    if distributed.is_main_process():
        torch.save(state, path)


def load_resume_state(path: Path) -> tuple[PartialFC, torch.optim.Optimizer]:
    """The trainer's order: module state, optimizer state, then the centres and their state."""
    pfc, optimizer = resume_model()
    state = torch.load(path)
    pfc.load_state_dict(state["module"])
    optimizer.load_state_dict(state["optimizer"])
    load_full_state(pfc, optimizer, state["centres"])
    return pfc, optimizer


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = Path(out_dir)
        results = {}
        for name in HEADS:
            for rate in RATES:
                results[name, rate] = pfc_step(name, rate, *local_batch(rank, 0))
        for rate in RATES:
            t_raw, y = local_batch(rank, 0, D)
            u_raw, _ = local_batch(rank, 0, E)
            results["udon", rate] = udon_step(rate, t_raw, u_raw, y)
        # a DDP-wrapped backbone under the head: its averaged gradient is the full head's
        backbone = ddp_backbone()
        x, y = local_batch(rank, 5)
        pfc = PartialFC("subcenter_arcface", D, C, 1.0, SEED, k=3).train()
        model = DistributedDataParallel(backbone)  # held: its reducer averages the gradients in backward
        pfc(model(x), y)["loss"].backward()
        results["ddp"] = {"backbone": backbone.weight.grad, "centres": pfc.weight.grad}
        # resume: uninterrupted steps 0-1 here; and steps 0 saved here, 1 after loading the 1-process state
        pfc, optimizer = resume_model()
        train_steps(pfc, optimizer, world, rank, range(2))
        save_resume_state(pfc, optimizer, out / f"uninterrupted_w{world}.pt")
        pfc, optimizer = resume_model()
        train_steps(pfc, optimizer, world, rank, range(1))
        save_resume_state(pfc, optimizer, out / f"step0_w{world}.pt")
        if (out / "step0_w1.pt").exists():
            pfc, optimizer = load_resume_state(out / "step0_w1.pt")
            train_steps(pfc, optimizer, world, rank, range(1, 2))
            save_resume_state(pfc, optimizer, out / f"resumed_from_w1_on_w{world}.pt")
        torch.save(results, out / f"rank{rank}_w{world}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    """Every rank's results on 1 and 2 gloo ranks (one spawn each), and the folder of their checkpoints."""
    out = tmp_path_factory.mktemp("pfc")
    for world in (1, 2):
        mp.spawn(_worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return {"dir": out, **{world: [torch.load(out / f"rank{r}_w{world}.pt") for r in range(world)]
                           for world in (1, 2)}}


def ddp_backbone() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(D, D)


def full_weight(name: str) -> torch.Tensor:
    """The centres a Partial FC starts from (one process holds them all)."""
    return PartialFC(name, D, C, 1.0, SEED, **HEADS[name]).weight.detach().clone()


def full_head_step(name: str, e: torch.Tensor, y: torch.Tensor) -> dict:
    head = build_margin_head(name, D, C, **HEADS[name]).train()
    with torch.no_grad():
        head.weight.copy_(full_weight(name))
    e = e.clone().requires_grad_(True)
    logits = head(e, y)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return {"loss": loss.detach(), "e_grad": e.grad, "w_grad": head.weight.grad, "logits": logits.detach(),
            "buffers": dict(head.named_buffers())}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_shards_and_sample_count_rule():
    for classes, world in ((13, 2), (13, 4), (3, 4), (10, 1)):
        bounds = [shard_range(classes, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in rank order
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert num_sampled_classes(2, 10, 0.3) == 3  # not 4: 0.3 * 10 = 3.0000000000000004
    assert num_sampled_classes(5, 10, 0.3) == 5 and num_sampled_classes(0, 10, 1.0) == 10
    assert num_sampled_classes(1, 1000, 0.1) == 100


def test_draw_keeps_positives_has_the_right_count_and_is_reproducible():
    labels = torch.tensor([3, 3, 17, 40, 99, 0])
    drawn = draw_classes(labels, 100, 0.1, seed=5, step=11)
    assert drawn.numel() == 10 and torch.equal(drawn, drawn.sort().values) and drawn.unique().numel() == 10
    assert set(labels.tolist()) <= set(drawn.tolist())
    assert torch.equal(drawn, draw_classes(labels, 100, 0.1, seed=5, step=11))
    others = [draw_classes(labels, 100, 0.1, seed=s, step=t) for s, t in ((5, 12), (6, 11))]
    assert all(not torch.equal(drawn, o) for o in others)
    many = torch.arange(0, 100, 4)  # 25 positives > ceil(0.1 * 100): positives only
    assert torch.equal(draw_classes(many, 100, 0.1, 5, 0), many)
    # each shard keeps exactly its part of the global draw, on any number of ranks
    for world in (1, 3, 4):
        parts = [PartialFC("arcface", D, 100, 0.1, 5, shard=(r, world)).sample(labels, 11) for r in range(world)]
        assert torch.equal(torch.cat([p.classes_N for p in parts]), drawn)
        assert sum((p.col_G >= 0).long() for p in parts).tolist() == [1] * len(labels)  # one owner per row
        for p, r in zip(parts, range(world)):
            here = p.col_G >= 0
            assert torch.equal(p.classes_N[p.col_G[here]], labels[here])
    with pytest.raises(ValueError, match="step"):
        PartialFC("arcface", D, 100, 0.1).sample(labels, None)
    # more ranks than classes: the last shard is empty and still runs (and stays in the autograd graph)
    for name in ("adacos", "subcenter_arcface", "curricularface"):
        empty = PartialFC(name, D, 3, 0.5, shard=(3, 4), **HEADS.get(name, {})).train()
        e = torch.randn(4, D, requires_grad=True)
        out = empty(e, torch.tensor([0, 1, 2, 1]), step=0)
        assert empty.num_local == 0 and out["logits"].shape == (4, 0)
        out["loss"].backward()


def test_initial_centres_do_not_depend_on_the_world_size():
    for name, world in (("arcface", 3), ("subcenter_arcface", 2)):
        kw = HEADS[name]
        whole = PartialFC(name, D, 9000, 1.0, 3, **kw).weight.detach()  # several init chunks
        shards = [PartialFC(name, D, 9000, 1.0, 3, shard=(r, world), **kw).weight.detach() for r in range(world)]
        assert torch.equal(torch.cat(shards), whole)
        assert whole.abs().max() <= math.sqrt(3 / D) and whole.std().item() == pytest.approx(D ** -0.5, rel=0.02)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_rate_one_in_one_process_equals_the_full_head(name: str):
    e, y = union_batch(2, 0)
    ours, ref = pfc_step(name, 1.0, e, y), full_head_step(name, e, y)
    close(ours["loss"], ref["loss"])
    close(ours["e_grad"], ref["e_grad"])
    close(ours["w_grad"], ref["w_grad"])
    for key, value in ref["buffers"].items():
        close(ours["buffers"][key], value)


@pytest.mark.parametrize("world", [1, 2])
def test_rate_one_on_gloo_ranks_equals_the_full_head_on_the_union_batch(ranks, world: int):
    e, y = union_batch(world, 0)
    for name in HEADS:
        ref = full_head_step(name, e, y)
        for rank, res in enumerate(ranks[world]):
            ours = res[name, 1.0]
            close(ours["loss"], ref["loss"])  # every rank holds the global loss
            # the contract: W x the full gradient on the local rows (DDP then averages), exact centre rows
            close(ours["e_grad"] / world, ref["e_grad"][rows_of(rank)] if world > 1 else ref["e_grad"])
            start, stop = shard_range(C, rank, world)
            k = HEADS[name].get("k", 1)
            close(ours["w_grad"], ref["w_grad"][start * k : stop * k])
            for key, value in ref["buffers"].items():
                close(ours["buffers"][key], value)


@pytest.mark.parametrize("world", [1, 2])
def test_sampled_softmax_is_the_full_heads_logits_on_the_drawn_classes(ranks, world: int):
    e, y = union_batch(world, 0)
    drawn = draw_classes(y, C, 0.5, SEED, 0)
    assert drawn.numel() == num_sampled_classes(y.unique().numel(), C, 0.5) < C
    single = pfc_step("arcface", 0.5, e, y)
    for name in HEADS:
        res = [r[name, 0.5] for r in ranks[world]]
        assert torch.equal(torch.cat([r["classes"] for r in res]), drawn)
        if name != "adacos":  # AdaCos's B_avg is taken over the drawn classes: its scale differs
            ref = full_head_step(name, e, y)
            restricted = F.cross_entropy(ref["logits"][:, drawn], torch.searchsorted(drawn, y))
            close(res[0]["loss"], restricted)
        # the number of ranks changes nothing: 2 ranks equal one process on the union batch
        one = pfc_step(name, 0.5, e, y) if name != "arcface" else single
        for rank, ours in enumerate(res):
            close(ours["loss"], one["loss"])
            close(ours["e_grad"] / world, one["e_grad"][rows_of(rank)] if world > 1 else one["e_grad"])
            start, stop = shard_range(C, rank, world)
            k = HEADS[name].get("k", 1)
            close(ours["w_grad"], one["w_grad"][start * k : stop * k])
            undrawn = torch.ones(C, dtype=torch.bool)
            undrawn[drawn] = False
            assert (ours["w_grad"].view(-1, k, D)[undrawn[start:stop]] == 0).all()


@pytest.mark.parametrize("world", [1, 2])
def test_udon_with_partial_fc_at_rate_one_equals_the_replicated_heads(ranks, world: int):
    t_raw, y = union_batch(world, 0, D)
    u_raw, _ = union_batch(world, 0, E)
    ref_heads = DomainHeads(4, {"a": C}, D, E, "arcface", {}).train()
    pfc_heads = DomainHeads(4, {"a": C}, D, E, "arcface", {}, partial_fc=1.0, seed=SEED)
    for kind in ("teacher_classifiers", "universal_classifiers"):
        with torch.no_grad():
            getattr(ref_heads, kind)["a"].weight.copy_(getattr(pfc_heads, kind)["a"].weight)
    t_raw, u_raw = t_raw.requires_grad_(True), u_raw.requires_grad_(True)
    ref = udon_loss(t_raw, u_raw, y, ref_heads.teacher_classifiers["a"], ref_heads.universal_classifiers["a"])
    (ref["ce_teacher"] + ref["ce_universal"] + ref["kl"]).backward()
    assert ref["kl"] > 1e-3
    for rank, res in enumerate(ranks[world]):
        ours = res["udon", 1.0]
        for key in ("ce_teacher", "ce_universal", "kl"):
            close(ours[key], ref[key])
        rows = rows_of(rank) if world > 1 else slice(None)
        close(ours["t_grad"] / world, t_raw.grad[rows])
        close(ours["u_grad"] / world, u_raw.grad[rows])
        start, stop = shard_range(C, rank, world)
        close(ours["wt_grad"], ref_heads.teacher_classifiers["a"].weight.grad[start:stop])
        close(ours["wu_grad"], ref_heads.universal_classifiers["a"].weight.grad[start:stop])
        # the relational term pairs the local batch
        local = udon_loss(t_raw[rows].detach(), u_raw[rows].detach(), y[rows], ref_heads.teacher_classifiers["a"],
                          ref_heads.universal_classifiers["a"])
        close(ours["relational"], local["relational"])
    if world == 1:  # one process: every term and the loss itself
        close(ranks[1][0]["udon", 1.0]["loss"], ref["loss"])
    # rate < 1: both classifiers share one draw, and 2 ranks equal one process on the union batch
    one = udon_step(0.5, t_raw.detach(), u_raw.detach(), y)
    for res in ranks[world]:
        for key in ("ce_teacher", "ce_universal", "kl"):
            close(res["udon", 0.5][key], one[key])


@pytest.mark.parametrize("world", [1, 2])
def test_ddp_backbone_gradient_is_the_full_heads(ranks, world: int):
    x, y = union_batch(world, 5)
    backbone, head = ddp_backbone(), build_margin_head("subcenter_arcface", D, C, k=3).train()
    with torch.no_grad():
        head.weight.copy_(PartialFC("subcenter_arcface", D, C, 1.0, SEED, k=3).weight)
    F.cross_entropy(head(backbone(x), y), y).backward()
    for rank, res in enumerate(ranks[world]):
        close(res["ddp"]["backbone"], backbone.weight.grad)
        start, stop = shard_range(C, rank, world)
        close(res["ddp"]["centres"], head.weight.grad[3 * start : 3 * stop])


def test_udon_without_a_step_at_rate_below_one_fails():
    heads = DomainHeads(4, {"a": C}, D, E, partial_fc=0.5)
    t_raw, y = local_batch(0, 0, D)
    with pytest.raises(ValueError, match="step"):
        udon_loss(t_raw, local_batch(0, 0, E)[0], y, heads.teacher_classifiers["a"], heads.universal_classifiers["a"])


def _assert_same_state(a: dict, b: dict) -> None:
    (name,) = a["centres"]
    close(a["centres"][name]["weight"], b["centres"][name]["weight"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        close(a["centres"][name]["optimizer"][key], b["centres"][name]["optimizer"][key])
    for key, value in a["module"].items():
        close(value, b["module"][key])


def test_resume_across_a_world_size_change_is_exact(ranks):
    folder = ranks["dir"]
    uninterrupted = {w: torch.load(folder / f"uninterrupted_w{w}.pt") for w in (1, 2)}
    _assert_same_state(uninterrupted[2], uninterrupted[1])  # 2 ranks train exactly like one process
    state = torch.load(folder / "step0_w2.pt")
    assert state["centres"][""]["weight"].shape == (C, D) and float(state["centres"][""]["optimizer"]["step"]) == 1
    assert set(state["optimizer"]["state"]) == set()  # the sharded state is only in the full state
    # saved on 2 ranks, loaded on 1, one more AdamW step: the uninterrupted run
    pfc, optimizer = load_resume_state(folder / "step0_w2.pt")
    train_steps(pfc, optimizer, 1, 0, range(1, 2))
    resumed = {"centres": full_state(pfc, optimizer), "module": pfc.state_dict()}
    _assert_same_state(resumed, uninterrupted[1])
    # saved by one process, loaded on 2 ranks (in the spawned run)
    _assert_same_state(torch.load(folder / "resumed_from_w1_on_w2.pt"), uninterrupted[1])


def test_domain_heads_with_partial_fc_keep_their_api():
    heads = DomainHeads(16, {"a": 30, "b": 5}, 8, 4, "subcenter_arcface", {"k": 2}, partial_fc=0.2)
    assert isinstance(heads.teacher_classifiers["a"], PartialFC) and heads.teacher_classifiers["a"].k == 2
    assert heads.universal_classifiers["b"].weight.shape == (10, 4)
    assert len(sharded_parameters(heads)) == 4
    assert not any(k.endswith("classifiers.a.weight") for k in heads.state_dict())
    heads.load_state_dict(heads.state_dict())  # strict: the centres are not expected there
    report, plain = heads.memory_report(), DomainHeads(16, {"a": 30, "b": 5}, 8, 4, "subcenter_arcface", {"k": 2})
    assert report == pytest.approx(plain.memory_report())  # one rank holds every centre
    heads.sync_gradients("a")  # no process group: a no-op
    with pytest.raises(ValueError, match="sample rate"):
        DomainHeads(16, {"a": 30}, partial_fc=1.5)
