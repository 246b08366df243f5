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
from unic.data.sampling import DomainBatchSampler, DomainSampler, udon_update_weights
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
    # UDON's loss_function: sum_t w_t L_t / sum_t w_t with all four w_t = 1, i.e. the plain mean
    assert out["loss"].item() == pytest.approx((ce_t + ce_u + kl + relational) / 4, rel=1e-5)


def test_udon_loss_is_the_mean_of_its_terms_by_hand():
    """Two samples, two classes, 2-D embeddings with cosines picked by hand (normface s=16, tau=0.1, c=32)."""
    head_t, head_u = build_margin_head("normface", 2, 2), build_margin_head("normface", 2, 2)
    for head in (head_t, head_u):
        with torch.no_grad():
            head.weight.copy_(torch.eye(2))
    a = math.pi / 6  # teacher: sample 0 at angle pi/6 from class 0, sample 1 along class 1
    teacher = torch.tensor([[math.cos(a), math.sin(a)], [0.0, 2.0]])
    universal = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # unnormalised on purpose
    labels = torch.tensor([0, 1])
    out = udon_loss(teacher, universal, labels, head_t, head_u, temperature=0.1, relational_weight=32.0)
    r2 = math.sqrt(0.5)
    cos_t = [[math.cos(a), math.sin(a)], [0.0, 1.0]]
    cos_u = [[1.0, 0.0], [r2, r2]]

    def ce(row, y, s=16.0):
        return -s * row[y] + math.log(sum(math.exp(s * c) for c in row))

    def softmax(row, t=0.1):
        z = [math.exp(c / t) for c in row]
        return [v / sum(z) for v in z]

    ce_t = (ce(cos_t[0], 0) + ce(cos_t[1], 1)) / 2
    ce_u = (ce(cos_u[0], 0) + ce(cos_u[1], 1)) / 2
    kl = sum(sum(p * math.log(p / q) for p, q in zip(softmax(rt), softmax(ru))) for rt, ru in zip(cos_t, cos_u)) / 2
    # Gram matrices: teacher [[1, sin a], [sin a, 1]], universal [[1, r2], [r2, 1]]; diagonals agree
    relational = 32.0 * 2 * (math.sin(a) - r2) ** 2 / 4
    assert out["ce_teacher"].item() == pytest.approx(ce_t, rel=1e-5)
    assert out["ce_universal"].item() == pytest.approx(ce_u, rel=1e-5)
    assert out["kl"].item() == pytest.approx(kl, rel=1e-4)
    assert out["relational"].item() == pytest.approx(relational, rel=1e-5)
    assert out["loss"].item() == pytest.approx((ce_t + ce_u + kl + relational) / 4, rel=1e-5)
    assert relational == pytest.approx(16 * (0.5 - r2) ** 2)  # 0.6863


def test_domain_heads_classifiers_start_as_udon_lecun_uniform():
    torch.manual_seed(0)
    heads = DomainHeads(64, {"a": 3000}, 256, 64)
    for cls, dim in ((heads.teacher_classifiers["a"], 256), (heads.universal_classifiers["a"], 64)):
        assert cls.init == "lecun_uniform"
        assert cls.weight.std().item() == pytest.approx(dim ** -0.5, rel=0.01)
        assert cls.weight.abs().max().item() <= math.sqrt(3 / dim)


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


def reference_update_weights(weights: dict, window: dict, names: list) -> dict:
    """Independent re-implementation of ``Sampler.update_ds_indices`` (UDON ``sampling_utils.py``), weights only.

    ``window``: domain -> list of (summed per-example teacher CE, number of examples) of the steps it was
    drawn in since the metrics were last cleared (only drawn domains appear). The window mean of each drawn
    domain, divided by the sum of those means, becomes its weight; if some domain did not appear, all
    weights (the untouched old ones included) are divided by their new sum.
    """
    weights = dict(weights)
    means = {d: sum(l for l, _ in steps) / sum(n for _, n in steps) for d, steps in window.items()}
    total = sum(means.values())
    for d, m in means.items():
        weights[d] = m / total
    if len(window) != len(names):
        total = sum(weights.values())
        weights = {d: w / total for d, w in weights.items()}
    return weights


def test_dynamic_update_follows_mean_teacher_ce_in_a_fixed_window():
    sampler = DomainSampler([10, 10, 10, 10], "dynamic", update_every=4, seed=0)
    first = [sampler.next_domain() for _ in range(4)]
    assert first == [0, 1, 2, 3]  # round-robin until the first update
    for d, ce in zip(first, [1.0, 2.0, 3.0, 4.0]):
        sampler.record(d, torch.tensor(ce))
    assert sampler.maybe_update()
    np.testing.assert_allclose(sampler.probs.numpy(), [0.1, 0.2, 0.3, 0.4])
    # next window: only domains 0 and 3 drawn (forced); they share a mass of 1, then everything is renormalised
    sampler.step += 4
    sampler.record(0, torch.tensor(3.0))
    sampler.record(0, torch.tensor(1.0))  # mean 2.0
    sampler.record(3, torch.tensor(6.0))
    assert sampler.maybe_update()
    np.testing.assert_allclose(sampler.probs.numpy(), np.array([2 / 8, 0.2, 0.3, 6 / 8]) / 1.5)
    # the window is fixed: it was emptied
    assert sampler.window_count.sum() == 0


def test_unseen_domain_renormalisation_matches_udon_three_domain_example():
    """p = (0.1, 0.45, 0.45), domain 0 not drawn, equal losses: UDON gives 0.1 / 1.1 = 0.0909 (not 0.1)."""
    sampler = DomainSampler([5, 5, 5], "dynamic", update_every=10)
    sampler.probs = torch.tensor([0.1, 0.45, 0.45], dtype=torch.float64)
    sampler.updated, sampler.step = True, 10
    for d in (1, 2, 1, 2):
        sampler.record(d, torch.tensor(2.0))
    assert sampler.maybe_update()
    np.testing.assert_allclose(sampler.probs.numpy(), [0.1 / 1.1, 0.5 / 1.1, 0.5 / 1.1], rtol=1e-12)
    assert sampler.probs[0].item() == pytest.approx(0.0909, abs=1e-4)
    ref = reference_update_weights({"a": 0.1, "b": 0.45, "c": 0.45}, {"b": [(2.0, 1)] * 2, "c": [(2.0, 1)] * 2},
                                   ["a", "b", "c"])
    np.testing.assert_allclose(sampler.probs.numpy(), [ref["a"], ref["b"], ref["c"]], rtol=1e-12)


def test_udon_update_weights_against_the_reference_on_random_windows():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d", "e"]
    probs = torch.full((5,), 0.2, dtype=torch.float64)
    ref = dict.fromkeys(names, 0.2)
    unseen_windows = 0
    for _ in range(40):
        seen = rng.random(5) < 0.6
        window = {n: [(float(rng.uniform(0.1, 5.0)) * 32, 32) for _ in range(rng.integers(1, 4))]
                  for n, s in zip(names, seen) if s}
        sums = torch.tensor([sum(l / n for l, n in window.get(d, [])) for d in names], dtype=torch.float64)
        counts = torch.tensor([len(window.get(d, [])) for d in names], dtype=torch.float64)
        probs = udon_update_weights(probs, sums, counts)
        ref = reference_update_weights(ref, window, names)
        np.testing.assert_allclose(probs.numpy(), [ref[n] for n in names], rtol=1e-12)
        assert probs.sum().item() == pytest.approx(1.0)
        unseen_windows += 0 < len(window) < 5
    assert unseen_windows > 10
    # an empty window leaves the weights as they are (UDON: nothing to set, renormalising a distribution)
    torch.testing.assert_close(udon_update_weights(probs, torch.zeros(5), torch.zeros(5)), probs)


def _reference_trainer_weights(draws, losses, names, update_every, reset_every):
    """UDON's trainer loop (``classification_with_knn_eval_trainer.py``) around the sampler: before step s
    (1-based) with s % update_every == 0 the weights are updated from the metrics collected so far; after
    step s its metrics are appended, and they are cleared at the training summary, after step 1 (chrono
    warm-up) and every step with s % log_summary_steps == 1. Returns the weights after each update."""
    weights, metrics, history = dict.fromkeys(names, 1 / len(names)), {}, []
    for s, (d, loss) in enumerate(zip(draws, losses), start=1):
        if s % update_every == 0:
            weights = reference_update_weights(weights, metrics, names)
            history.append([weights[n] for n in names])
        metrics.setdefault(names[d], []).append((loss, 1))
        if s % reset_every == 1 or s == 1:
            metrics = {}
    return history


def test_reference_window_option_reproduces_udon_bookkeeping():
    names = ["a", "b", "c"]
    sampler = DomainSampler([5, 5, 5], "dynamic", update_every=7, seed=2, window_reset_every=5)
    draws, losses, ours = [], [], []
    for s in range(1, 60):
        d = sampler.next_domain()
        loss = float(d + 1) * (1 + 0.1 * (s % 3))
        draws.append(d)
        losses.append(loss)
        sampler.record(d, torch.tensor(loss, dtype=torch.float64))
        if sampler.maybe_update():
            assert (s + 1) % 7 == 0  # made for the next step, which is a multiple of update_every
            ours.append(sampler.probs.tolist())
    draws.append(0)  # the loop reads one more step to make the update due before it
    losses.append(0.0)
    ref = _reference_trainer_weights(draws, losses, names, 7, 5)
    assert len(ours) == len(ref) == 8
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert draws[:6] == [0, 1, 2, 0, 1, 2]  # round-robin until the first update


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
