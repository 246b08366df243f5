"""The UNIC loss and teacher dropping against hand-computed values (SPEC section 4)."""

import math

import pytest
import torch

from unic.losses import distillation_loss
from unic.losses.distill import teacher_coefficients, token_loss


def _out(cls, patch):
    return {"cls": torch.tensor(cls, dtype=torch.float32), "patch": torch.tensor(patch, dtype=torch.float32)}


def _smooth_l1(d):
    d = abs(d)
    return 0.5 * d * d if d < 1 else d - 0.5


def _l(a, b, lam_cos=0.5, lam_sl1=0.5):
    dot = sum(x * y for x, y in zip(a, b))
    cos = dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    sl1 = sum(_smooth_l1(x - y) for x, y in zip(a, b)) / len(a)
    return lam_cos * (1 - cos) + lam_sl1 * sl1


def test_token_loss_hand_computed():
    a, b = [1.0, 2.0, -1.0], [0.5, 2.0, 2.0]
    got = token_loss(torch.tensor([a]), torch.tensor([b]), 0.5, 0.5)
    assert got.item() == pytest.approx(_l(a, b), rel=1e-6)
    got = token_loss(torch.tensor([a]), torch.tensor([b]), 0.2, 0.9)
    assert got.item() == pytest.approx(_l(a, b, 0.2, 0.9), rel=1e-6)


def _two_teacher_batch():
    # 2 images, teacher "a" (dim 2) and "b" (dim 3), 2 patches each
    student = {
        "a": _out([[1, 0], [0, 1]], [[[1, 1], [0, 2]], [[3, 0], [1, 1]]]),
        "b": _out([[1, 2, 3], [0, 0, 1]], [[[1, 0, 0], [0, 1, 0]], [[0, 0, 1], [1, 1, 1]]]),
    }
    teacher = {
        "a": _out([[0.5, 0.5], [-1, 1]], [[[1, 0], [0, 1]], [[2, 2], [1, -1]]]),
        "b": _out([[3, 2, 1], [0, 1, 0]], [[[1, 0, 0], [0, 0, 3]], [[1, 0, 0], [1, 1, 2]]]),
    }
    per_image = {}
    for t in ("a", "b"):
        per_image[t] = []
        for i in range(2):
            cls = _l(student[t]["cls"][i].tolist(), teacher[t]["cls"][i].tolist())
            patch = sum(_l(student[t]["patch"][i, n].tolist(), teacher[t]["patch"][i, n].tolist()) for n in range(2)) / 2
            per_image[t].append(0.5 * (cls + patch))
    return student, teacher, per_image


def test_no_dropping_is_plain_mean():
    student, teacher, per_image = _two_teacher_batch()
    loss, kept = distillation_loss(student, teacher, drop_prob=0.0)
    expected = sum(per_image["a"] + per_image["b"]) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert kept["a"].item() == 1.0 and kept["b"].item() == 1.0


def test_drop_prob_one_keeps_only_hardest_teacher():
    student, teacher, per_image = _two_teacher_batch()
    loss, kept = distillation_loss(student, teacher, drop_prob=1.0)
    hardest = [max(per_image["a"][i], per_image["b"][i]) for i in range(2)]
    assert loss.item() == pytest.approx(sum(hardest) / 2, rel=1e-6)
    n_a = sum(per_image["a"][i] >= per_image["b"][i] for i in range(2))
    assert kept["a"].item() == pytest.approx(n_a / 2)
    assert kept["b"].item() == pytest.approx(1 - n_a / 2)


def test_ties_keep_lowest_sorted_name():
    losses = torch.tensor([[1.0, 2.0], [1.0, 3.0]])  # image 0 tied
    coef = teacher_coefficients(losses, drop_prob=1.0)
    assert coef.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_dropping_normalises_by_kept_coefficients_and_is_seeded():
    torch.manual_seed(0)
    T, B, N, D = 3, 64, 4, 5
    student = {f"t{t}": {"cls": torch.randn(B, D), "patch": torch.randn(B, N, D)} for t in range(T)}
    teacher = {f"t{t}": {"cls": torch.randn(B, D), "patch": torch.randn(B, N, D)} for t in range(T)}
    gen = torch.Generator().manual_seed(3)
    loss, kept = distillation_loss(student, teacher, drop_prob=0.5, generator=gen)
    # recompute the same draws by hand
    per = torch.stack([
        0.5 * (token_loss(student[t]["cls"], teacher[t]["cls"], 0.5, 0.5)
               + token_loss(student[t]["patch"], teacher[t]["patch"], 0.5, 0.5).mean(-1))
        for t in sorted(student)
    ])
    draws = torch.rand((T, B), generator=torch.Generator().manual_seed(3))
    coef = (draws >= 0.5).float()
    coef[per.argmax(0), torch.arange(B)] = 1.0
    assert loss.item() == pytest.approx(((coef * per).sum() / coef.sum()).item(), rel=1e-6)
    for t, name in enumerate(sorted(student)):
        assert kept[name].item() == pytest.approx(coef[t].mean().item())
    # every image keeps at least one teacher; about half of the others are dropped
    assert (coef.sum(0) >= 1).all()
    assert 0.55 < coef.mean().item() < 0.8


def test_gradient_flows_only_through_student():
    student, teacher, _ = _two_teacher_batch()
    for t in student.values():
        for v in t.values():
            v.requires_grad_(True)
    loss, _ = distillation_loss(student, teacher, drop_prob=0.5, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for t in student.values() for v in t.values())


def test_mismatched_teachers_rejected():
    student, teacher, _ = _two_teacher_batch()
    del student["b"]
    with pytest.raises(KeyError, match="different teachers"):
        distillation_loss(student, teacher)
