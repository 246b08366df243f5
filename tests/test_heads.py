"""Margin heads against hand-computed formulas, finite gradients at cos = +-1, state handling and 2-rank DDP."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from unic.models.heads import MARGIN_HEADS, build_margin_head

C, D = 5, 8
EXTRA_KW = {"dynm_arcface": {"class_counts": [10, 3, 7, 100, 3]}}
STATEFUL = ("adacos", "curricularface", "adaface")


def build(name: str, **kw) -> torch.nn.Module:
    return build_margin_head(name, D, C, **{**EXTRA_KW.get(name, {}), **kw})


def embeddings_with_cos(cos_rows: list[list[float]], norms: list[float] | None = None) -> torch.Tensor:
    """Embeddings whose cosines to the basis vectors e_0..e_{C-1} are ``cos_rows`` (rows need sum cos^2 <= 1)."""
    cos_BC = torch.tensor(cos_rows, dtype=torch.float64)
    rest_B1 = torch.sqrt(1 - cos_BC.square().sum(1, keepdim=True))
    e_BD = torch.cat([cos_BC, rest_B1, torch.zeros(len(cos_rows), D - C - 1, dtype=torch.float64)], dim=1)
    if norms is not None:
        e_BD = e_BD * torch.tensor(norms, dtype=torch.float64)[:, None]
    return e_BD.float()


def basis_head(name: str, **kw) -> torch.nn.Module:
    """Head whose class weights are the first C basis vectors, so cos = the embedding's first C coordinates."""
    head = build(name, **kw)
    with torch.no_grad():
        head.weight.copy_(torch.eye(C, D))
    return head


def arc_target(c: float, m: float, easy: bool = False) -> float:
    if easy:
        return math.cos(math.acos(c) + m) if c > 0 else c
    return math.cos(math.acos(c) + m) if c > math.cos(math.pi - m) else c - m * math.sin(math.pi - m)


def with_targets(cos: np.ndarray, labels: list[int], targets: list[float]) -> np.ndarray:
    out = np.array(cos, dtype=np.float64)
    out[np.arange(len(labels)), labels] = targets
    return out


def assert_logits(actual: torch.Tensor, expected: np.ndarray) -> None:
    assert actual.dtype == torch.float32
    np.testing.assert_allclose(actual.detach().double().numpy(), expected, rtol=1e-5, atol=2e-4)


# Row 0: ordinary target; row 1: target past the arcface fallback threshold cos(pi - 0.5) = -0.8776;
# row 2: negative target above the threshold (easy_margin leaves it alone); row 3: curricular hard negative.
COS = [
    [0.60, 0.20, -0.10, 0.30, 0.05],
    [0.10, -0.90, 0.20, 0.00, -0.15],
    [0.25, 0.30, -0.30, 0.10, 0.40],
    [0.30, 0.02, 0.10, 0.50, -0.20],
]
LABELS = [0, 1, 2, 3]


def run(head: torch.nn.Module, cos_rows=COS, labels=LABELS, norms=None) -> torch.Tensor:
    return head(embeddings_with_cos(cos_rows, norms), torch.tensor(labels))


def cos_y_of(cos_rows=COS, labels=LABELS) -> list[float]:
    return [row[y] for row, y in zip(cos_rows, labels)]


def test_normface_and_cosface():
    cos = np.array(COS)
    assert_logits(run(basis_head("normface")), 16 * cos)
    assert_logits(run(basis_head("cosface")), 30 * with_targets(cos, LABELS, [c - 0.35 for c in cos_y_of()]))
    assert_logits(run(basis_head("cosface", s=10.0, m=0.2)), 10 * with_targets(cos, LABELS, [c - 0.2 for c in cos_y_of()]))


@pytest.mark.parametrize("easy", [False, True])
def test_arcface_branches(easy: bool):
    assert COS[1][1] <= math.cos(math.pi - 0.5) < COS[2][2] < 0  # both branches are exercised
    targets = [arc_target(c, 0.5, easy) for c in cos_y_of()]
    assert_logits(run(basis_head("arcface", easy_margin=easy)), 30 * with_targets(np.array(COS), LABELS, targets))
    # the fallback is linear in cos, not cos(theta + m) evaluated past pi
    if not easy:
        assert targets[1] == pytest.approx(-0.9 - 0.5 * math.sin(0.5))


def test_dynm_margins_and_logits():
    counts = EXTRA_KW["dynm_arcface"]["class_counts"]
    head = basis_head("dynm_arcface")
    margins = head.class_margins.tolist()
    nhat = [(n - min(counts)) / (max(counts) - min(counts)) for n in counts]
    expected = [0.2 + 0.15 * (1 + math.cos(math.pi * x)) for x in nhat]
    assert margins == pytest.approx(expected)
    assert margins[1] == margins[4] == pytest.approx(0.5) and margins[3] == pytest.approx(0.2)
    targets = [arc_target(c, expected[y]) for c, y in zip(cos_y_of(), LABELS)]
    assert_logits(run(head), 30 * with_targets(np.array(COS), LABELS, targets))
    equal = build("dynm_arcface", class_counts=[4] * C, m_min=0.1, m_max=0.4)
    assert equal.class_margins.tolist() == pytest.approx([0.4] * C)
    assert set(dict(head.named_buffers())) == {"class_counts", "class_margins"}
    with pytest.raises(ValueError, match="class_counts"):
        build_margin_head("dynm_arcface", D, C)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_subcenters_take_max(k: int):
    torch.manual_seed(k)
    head = build_margin_head("subcenter_arcface", D, C, k=k)
    assert head.weight.shape == (C * k, D)
    e, y = torch.randn(6, D), torch.randint(0, C, (6,))
    w = F.normalize(head.weight.detach().double(), dim=1).numpy()
    cos_all = F.normalize(e.double(), dim=1).numpy() @ w.T
    # rows c*k .. c*k+k-1 belong to class c
    cos = np.array([[cos_all[i, c * k : c * k + k].max() for c in range(C)] for i in range(6)])
    targets = [arc_target(cos[i, y[i]], 0.5) for i in range(6)]
    assert_logits(head.cosine(e), cos)
    assert_logits(head(e, y), 30 * with_targets(cos, y.tolist(), targets))


def test_liarcface():
    theta = np.arccos(np.array(COS))
    theta[np.arange(4), LABELS] += 0.45
    assert_logits(run(basis_head("liarcface")), 64 * (math.pi - 2 * theta) / math.pi)


def test_curricularface_hard_examples_and_t():
    head = basis_head("curricularface").train()
    logits = run(head)
    t = 0.01 * np.mean(cos_y_of())  # t starts at 0 and is updated before it is used
    assert head.t.item() == pytest.approx(t, rel=1e-5)
    expected = np.array(COS, dtype=np.float64)
    num_hard = 0
    for i, y in enumerate(LABELS):
        phi = math.cos(math.acos(COS[i][y]) + 0.5)
        for j in range(C):
            if j != y and COS[i][j] > phi:
                expected[i, j] = COS[i][j] * (t + COS[i][j])
                num_hard += 1
        expected[i, y] = arc_target(COS[i][y], 0.5)
    assert num_hard >= 3  # row 3's 0.30 > cos(acos(0.5) + 0.5) ~ 0.024, row 1 (fallback) has several
    assert_logits(logits, 64 * expected)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_adaface(alpha: float):
    norms = [1.0, 5.0, 30.0, 250.0]  # the last is clipped to 100
    head = basis_head("adaface", alpha=alpha).train()
    logits = run(head, norms=norms)
    safe = np.clip(norms, 0.001, 100)
    mu = alpha * safe.mean() + (1 - alpha) * 20
    sigma = alpha * safe.std(ddof=1) + (1 - alpha) * 100
    assert head.batch_mean.item() == pytest.approx(mu, rel=1e-5)
    assert head.batch_std.item() == pytest.approx(sigma, rel=1e-5)
    eps, m = 1e-3, 0.4
    cos = np.clip(np.array(COS), -1 + eps, 1 - eps)
    targets = []
    for i, y in enumerate(LABELS):
        ms = np.clip(0.333 * (safe[i] - mu) / (sigma + eps), -1, 1)
        theta = np.clip(math.acos(cos[i, y]) - m * ms, eps, math.pi - eps)
        targets.append(math.cos(theta) - (m + m * ms))
    assert_logits(logits, 64 * with_targets(cos, LABELS, targets))


def test_adacos_true_median_even_batch():
    # Target cosines above cos(pi/4), so the median angle is not clipped at pi/4.
    cos_rows = [
        [0.95, 0.10, 0.05, -0.10, 0.00],
        [0.20, 0.90, 0.10, 0.05, -0.20],
        [0.10, -0.30, 0.80, 0.20, 0.10],
        [0.00, 0.15, 0.20, 0.72, -0.40],
    ]
    head = basis_head("adacos").train()
    s0 = math.sqrt(2) * math.log(C - 1)
    assert head.scale.item() == pytest.approx(s0)
    logits = run(head, cos_rows)
    cos = np.array(cos_rows)
    not_target = np.ones_like(cos, dtype=bool)
    not_target[np.arange(4), LABELS] = False
    b_avg = np.where(not_target, np.exp(s0 * cos), 0).sum(1).mean()
    theta_y = np.arccos(cos[np.arange(4), LABELS])
    s = math.log(b_avg) / math.cos(min(math.pi / 4, np.median(theta_y)))
    s_lower_median = math.log(b_avg) / math.cos(min(math.pi / 4, torch.median(torch.tensor(theta_y)).item()))
    assert abs(s - s_lower_median) > 1e-3  # the test distinguishes the true median from torch.median
    assert head.scale.item() == pytest.approx(s, rel=1e-5)
    assert_logits(logits, s * cos)  # this step's logits already use the new scale
    head.eval()
    run(head, cos_rows)
    assert head.scale.item() == pytest.approx(s, rel=1e-5)


@pytest.mark.parametrize("name", sorted(MARGIN_HEADS))
def test_finite_gradients_at_cos_plus_minus_one(name: str):
    k = 3 if name == "subcenter_arcface" else 1
    head = build(name).train()
    with torch.no_grad():  # all k sub-centres of class c point along e_c, so cos = -1 survives the max
        head.weight.copy_(torch.eye(C, D).repeat_interleave(k, dim=0))
    # Embeddings along (or against) classes 0..3: targets at cos_y = +1 and -1, non-targets at +1 and -1.
    rows = torch.eye(C, D)[:4] * torch.tensor([[2.0], [-1.0], [3.0], [-0.5]])
    labels = torch.tensor([0, 1, 3, 2])
    e = rows.clone().requires_grad_(True)
    cos = head.cosine(e).detach()
    assert cos[0, 0] == 1 and cos[1, 1] == -1 and cos[2, 2] == 1 and cos[3, 3] == -1  # exactly +-1
    logits = head(e, labels)
    F.cross_entropy(logits, labels).backward()
    assert torch.isfinite(logits).all()
    assert torch.isfinite(e.grad).all() and torch.isfinite(head.weight.grad).all()


def test_float32_under_autocast():
    head = basis_head("arcface")
    e, y = embeddings_with_cos(COS), torch.tensor(LABELS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(e.bfloat16(), y)
        assert head.cosine(e).dtype == torch.float32
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, head(e.bfloat16(), y))


@pytest.mark.parametrize("name", STATEFUL)
def test_state_saved_loaded_and_frozen_in_eval(name: str):
    head = basis_head(name).train()
    before = {k: v.clone() for k, v in head.named_buffers()}
    run(head, norms=[2.0, 3.0, 7.0, 11.0])
    trained = {k: v.clone() for k, v in head.named_buffers()}
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    head.eval()
    run(head, norms=[50.0, 1.0, 1.0, 1.0])
    assert all(torch.equal(v, trained[k]) for k, v in head.named_buffers())
    fresh = basis_head(name)
    assert set(fresh.state_dict()) == set(head.state_dict())
    fresh.load_state_dict(head.state_dict())
    assert all(torch.equal(v, trained[k]) for k, v in fresh.named_buffers())
    torch.testing.assert_close(run(fresh.eval(), norms=[2.0] * 4), run(head, norms=[2.0] * 4))


def test_factory_errors():
    with pytest.raises(ValueError, match="arcface.*curricularface"):
        build_margin_head("sphereface", D, C)
    with pytest.raises(ValueError, match="easy_margin"):
        build_margin_head("arcface", D, C, margin=0.3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        build_margin_head("subcenter_arcface", D, C, k=0)
    assert build_margin_head("subcenter_arcface", D, C).k == 3


@pytest.mark.parametrize("name", sorted(MARGIN_HEADS))
def test_class_weights_start_as_udon_lecun_uniform(name: str):
    """flax lecun_uniform on UDON's (D, C) kernel: fan_in = D, uniform on +-sqrt(3/D), std 1/sqrt(D)."""
    torch.manual_seed(0)
    dim, classes = 256, 2000
    kw = {"class_counts": list(range(1, classes + 1))} if name == "dynm_arcface" else {}
    head = build_margin_head(name, dim, classes, **kw)
    w = head.weight.detach().double()
    assert head.init == "lecun_uniform" and w.shape == (classes * head.k, dim)
    bound = math.sqrt(3 / dim)
    assert w.abs().max() <= bound and w.abs().max() > 0.999 * bound
    assert w.std().item() == pytest.approx(1 / math.sqrt(dim), rel=0.01)  # 512k+ draws: ~0.1% noise
    assert abs(w.mean().item()) < 1e-3
    assert 1 / math.sqrt(dim) == pytest.approx(0.0625)


def test_class_weight_init_option():
    torch.manual_seed(0)
    small = build_margin_head("arcface", 64, 3000, init="normal")
    assert small.weight.std().item() == pytest.approx(0.01, rel=0.01)
    udon = build_margin_head("arcface", 64, 3000, init="lecun_uniform")
    assert udon.weight.std().item() == pytest.approx(1 / 8, rel=0.01)
    assert udon.weight.abs().max().item() <= math.sqrt(3 / 64)
    with pytest.raises(ValueError, match="lecun_uniform"):
        build_margin_head("normface", D, C, init="xavier")
    # reset_parameters redraws with the head's own scheme
    before = small.weight.detach().clone()
    small.reset_parameters()
    assert not torch.equal(before, small.weight) and small.weight.std().item() == pytest.approx(0.01, rel=0.01)


# ---- two gloo ranks against one process on the union of their data ----


def _rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different data (batch sizes 3 and 5) per rank: near their class (target angles below pi/4, so the
    AdaCos median matters) with spread-out norms for AdaFace."""
    g = torch.Generator().manual_seed(100 + rank)
    n = 3 + 2 * rank
    y = torch.randint(0, C, (n,), generator=g)
    e = torch.eye(C, D)[y] + 0.3 * torch.randn(n, D, generator=g)
    return e * (1 + 20 * torch.rand(n, 1, generator=g)), y


def _seeded_head(name: str) -> torch.nn.Module:
    head = build(name).train()
    with torch.no_grad():
        head.weight.copy_(torch.eye(C, D))
    return head


def _buffers_after_step(name: str, e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    head = _seeded_head(name)
    head(e, y)
    return torch.stack([b.float() for b in head.buffers()])


def _dist_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        e, y = _rank_batch(rank)
        results = {}
        for name in STATEFUL:
            buffers = _buffers_after_step(name, e, y)
            gathered = [torch.empty_like(buffers) for _ in range(world_size)]
            dist.all_gather(gathered, buffers)
            assert all(torch.equal(g, gathered[0]) for g in gathered), (name, gathered)
            results[name] = buffers
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_match_union_batch(tmp_path: Path):
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    batches = [_rank_batch(r) for r in range(2)]
    e, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert len(y) % 2 == 0  # even global batch: AdaCos needs the averaged middle pair
    theta_y = torch.acos(F.normalize(e, dim=1)[torch.arange(len(y)), y])
    assert theta_y.sort().values[len(y) // 2] < math.pi / 4  # both middle angles below the pi/4 cap
    for name in STATEFUL:
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][name], _buffers_after_step(name, e, y), rtol=1e-5, atol=1e-6)
