"""UDON: loss terms, gradient blocking, domain sampling, and a demo run that learns a universal embedding."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.conftest import free_port, run_entry, tiny_overrides
from unic.data.sampling import DomainBatchSampler, DomainSampler
from unic.losses.udon import udon_loss
from unic.models.heads import build_margin_head
from unic.models.universal import DomainHeads


def _batch(seed=0, B=6, C=4):
    g = torch.Generator().manual_seed(seed)
    teacher_raw = torch.randn(B, 8, generator=g)
    universal_raw = torch.randn(B, 5, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    return teacher_raw, universal_raw, labels


def test_udon_terms_match_direct_computation():
    torch.manual_seed(0)
    teacher_raw, universal_raw, labels = _batch()
    head_t, head_u = build_margin_head("normface", 8, 4), build_margin_head("normface", 5, 4)
    out = udon_loss(teacher_raw, universal_raw, labels, head_t, head_u, temperature=0.1, relational_weight=32.0)

    e_t, e_u = F.normalize(teacher_raw, dim=-1), F.normalize(universal_raw, dim=-1)
    cos_t = (e_t @ F.normalize(head_t.weight, dim=-1).T).detach()
    cos_u = (e_u @ F.normalize(head_u.weight, dim=-1).T).detach()
    ce_t = np.mean([-math.log(math.exp(16 * cos_t[i, labels[i]]) / sum(math.exp(16 * c) for c in cos_t[i])) for i in range(6)])
    ce_u = np.mean([-math.log(math.exp(16 * cos_u[i, labels[i]]) / sum(math.exp(16 * c) for c in cos_u[i])) for i in range(6)])
    p_t, p_s = torch.softmax(cos_t / 0.1, -1), torch.softmax(cos_u / 0.1, -1)
    kl = float((p_t * (p_t.log() - p_s.log())).sum(-1).mean())
    sims_t, sims_u = e_t @ e_t.T, e_u @ e_u.T
    relational = 32.0 * sum(float(sims_t[i, j] - sims_u[i, j]) ** 2 for i in range(6) for j in range(6)) / 36
    assert out["ce_teacher"].item() == pytest.approx(ce_t, rel=1e-5)
    assert out["ce_universal"].item() == pytest.approx(ce_u, rel=1e-5)
    assert out["kl"].item() == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert out["relational"].item() == pytest.approx(relational, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce_t + ce_u + kl + relational, rel=1e-5)


def test_no_gradient_reaches_the_teacher_side_from_kl_and_relational():
    teacher_raw, universal_raw, labels = _batch(1)
    teacher_raw.requires_grad_(True)
    universal_raw.requires_grad_(True)
    head_t, head_u = build_margin_head("arcface", 8, 4), build_margin_head("arcface", 5, 4)
    out = udon_loss(teacher_raw, universal_raw, labels, head_t, head_u)
    (out["kl"] + out["relational"]).backward()
    assert teacher_raw.grad is None and head_t.weight.grad is None
    assert universal_raw.grad.abs().sum() > 0 and head_u.weight.grad.abs().sum() > 0
    # the teacher CE does train the teacher side
    teacher_raw.grad = None
    udon_loss(teacher_raw, universal_raw, labels, head_t, head_u)["ce_teacher"].backward()
    assert teacher_raw.grad.abs().sum() > 0 and head_t.weight.grad.abs().sum() > 0


def test_domain_heads_shapes_head_options_and_memory():
    heads = DomainHeads(16, {"a": 3, "b": 5}, 8, 4, "subcenter_arcface", {"k": 2, "m": 0.3})
    assert heads.teacher_classifiers["b"].weight.shape == (10, 8)
    assert heads.universal_classifiers["a"].weight.shape == (6, 4)
    assert heads.teacher_classifiers["a"].m == pytest.approx(0.3) and heads.teacher_classifiers["a"].k == 2
    report = heads.memory_report()
    assert set(report) == {"a", "b"} and report["b"] > report["a"] > 0
    dyn = DomainHeads(16, {"a": 3}, 8, 4, "dynm_arcface", {}, {"a": [10, 1, 5]})
    margins = dyn.teacher_classifiers["a"].class_margins
    assert int(margins.argmax()) == 1 and int(margins.argmin()) == 0  # rarest class gets m_max


def test_sampler_strategies_marginals():
    n = 4000
    for strategy, expected in (("uniform", [1 / 3] * 3), ("size", [0.1, 0.3, 0.6])):
        sampler = DomainSampler([10, 30, 60], strategy, seed=1)
        draws = np.bincount([sampler.next_domain() for _ in range(n)], minlength=3) / n
        np.testing.assert_allclose(draws, expected, atol=0.03)
    rr = DomainSampler([10, 30, 60], "round_robin")
    assert [rr.next_domain() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_dynamic_update_follows_mean_teacher_ce_in_a_fixed_window():
    sampler = DomainSampler([10, 10, 10, 10], "dynamic", update_every=4, seed=0)
    first = [sampler.next_domain() for _ in range(4)]
    assert first == [0, 1, 2, 3]  # round-robin until the first update
    for d, ce in zip(first, [1.0, 2.0, 3.0, 4.0]):
        sampler.record(d, torch.tensor(ce))
    assert sampler.maybe_update()
    np.testing.assert_allclose(sampler.probs.numpy(), [0.1, 0.2, 0.3, 0.4])
    # next window: only domains 0 and 3 drawn (forced), the others keep their p
    sampler.step += 4
    sampler.record(0, torch.tensor(3.0))
    sampler.record(0, torch.tensor(1.0))  # mean 2.0
    sampler.record(3, torch.tensor(6.0))
    assert sampler.maybe_update()
    free = 1 - 0.2 - 0.3
    np.testing.assert_allclose(sampler.probs.numpy(), [free * 2 / 8, 0.2, 0.3, free * 6 / 8])
    # the window is fixed: it was emptied
    assert sampler.window_count.sum() == 0


def test_sampler_state_round_trip():
    a = DomainSampler([5, 5, 5], "dynamic", update_every=3, seed=4)
    for _ in range(7):
        d = a.next_domain()
        a.record(d, torch.tensor(float(d + 1)))
        a.maybe_update()
    b = DomainSampler([5, 5, 5], "dynamic", update_every=3, seed=99)
    b.load_state_dict(a.state_dict())
    assert [a.next_domain() for _ in range(20)] == [b.next_domain() for _ in range(20)]


def test_domain_batch_sampler_resumes_and_reshuffles_passes():
    full = DomainBatchSampler(20, 8, 0, 1, seed=0, domain_index=1, offset=100)
    it = iter(full)
    batches = [next(it) for _ in range(6)]
    assert all(100 <= i < 120 for b in batches for i, _ in b)
    first_pass = sorted(i for b in batches[:2] for i, _ in b)
    assert len(set(first_pass)) == 16  # 2 batches per pass, remainder dropped
    assert [i for i, _ in batches[0]] != [i for i, _ in batches[2]]  # new pass, new order
    resumed = iter(DomainBatchSampler(20, 8, 0, 1, seed=0, domain_index=1, offset=100, start_batch=3))
    assert [next(resumed) for _ in range(3)] == batches[3:6]
    ranks = [iter(DomainBatchSampler(20, 8, r, 2, seed=0, domain_index=1, offset=100)) for r in range(2)]
    assert next(ranks[0]) + next(ranks[1]) == batches[0]


def _sampler_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sampler = DomainSampler([10, 20, 30], "dynamic", update_every=5, seed=3)
    drawn = []
    for _ in range(40):
        d = sampler.next_domain()
        drawn.append(d)
        sampler.record(d, torch.tensor(float((d + 1) * (rank + 1))))  # ranks see different losses
        sampler.maybe_update()
    torch.save({"drawn": drawn, "probs": sampler.probs}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_sampler_agrees_across_two_gloo_ranks(tmp_path):
    mp.spawn(_sampler_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["drawn"] == r1["drawn"] and torch.equal(r0["probs"], r1["probs"])
    # equal to one process fed the rank-averaged losses
    single = DomainSampler([10, 20, 30], "dynamic", update_every=5, seed=3)
    for expected in r0["drawn"]:
        d = single.next_domain()
        assert d == expected
        single.record(d, torch.tensor((d + 1) * 1.5))
        single.maybe_update()
    torch.testing.assert_close(single.probs, r0["probs"])


def test_demo_run_learns_a_universal_embedding(tmp_path, demo_root):
    out = tmp_path / "udon"
    overrides = tiny_overrides(demo_root, str(out), **{
        "data.domains": "[digits]", "data.batch_size_per_gpu": 32, "loss.w_distill": 0.0,
        "student.kwargs": "{patch_size: 4, embed_dim: 64, depth: 4, num_heads: 4}",
        "optim.epochs": 14, "optim.lr": 2e-3, "optim.min_lr": 2e-3, "optim.warmup_epochs": 0,
        "optim.scale_lr": False, "optim.betas": "[0.9,0.999]", "udon.head_lr": 2e-3, "train.validate_first": True,
        "train.log_every": 10,
    })
    result = run_entry(["main_unic.py", *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [r for r in records if r["split"] == "val"]
    untrained, trained = val[0]["universal_R@1"], val[-1]["universal_R@1"]
    print(f"universal-embedding R@1 on held-out demo queries: untrained {untrained:.4f}, trained {trained:.4f}")
    assert val[0]["step"] == 0 and trained > untrained + 0.1
    train = [r for r in records if r["split"] == "train"]
    assert "udon/digits/ce_teacher" in train[-1] and "p/digits" in train[-1]
    assert train[-1]["udon/digits/ce_teacher"] < train[0]["udon/digits/ce_teacher"]

    # the exported universal model gives the same embeddings as the trained one
    from unic.eval.encoders import load_encoder

    x = torch.randn(3, 3, 32, 32)
    a = load_encoder(str(out / "universal.pth"))
    b = load_encoder(str(out / "checkpoint.pth"), "universal")
    assert a.kind == "universal"
    torch.testing.assert_close(a(x), b(x))
    assert a(x).shape == (3, 64)
    oracle = load_encoder(str(out / "checkpoint.pth"), "domain:digits")
    assert oracle(x).shape == (3, 256)
