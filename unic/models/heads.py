"""Margin heads (SPEC section 5): embeddings (B, D) and labels (B,) -> scaled logits (B, C) for cross-entropy.

One base class computes the float32 cosine to the class weights (max over sub-centres) with autocast off;
each head only rewrites that cosine into logits. Every function of cos used here has a finite derivative
at cos = +-1: sines come from ``sqrt(clamp(1 - cos^2, min=eps))`` and every ``acos`` input is clamped
inside (-1, 1). Adaptive state (AdaCos scale, CurricularFace t, AdaFace norm statistics, DynM margins) lives
in registered buffers, changes only in training mode and is computed from statistics summed over ranks, so
every rank holds the same value and checkpoints carry it.

Each head writes its formula once, as ``margin_logits(cos_BC, targets, embeddings_BD)``, against a
:class:`Targets` that says where each row's target column is and how batch statistics are reduced. The same
formula thus serves the data-parallel head (every rank: all classes, its own rows) and Partial FC
(``unic.models.partial_fc``: every rank all rows of the global batch, a shard of the classes).
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unic import distributed

logger = logging.getLogger(__name__)

_SIN_EPS = 1e-12  # floor under 1 - cos^2 so d sin / d cos stays finite at cos = +-1
_ACOS_EPS = 1e-7  # acos inputs live in [-1 + eps, 1 - eps]: about one float32 step below 1


def safe_acos(cos: torch.Tensor) -> torch.Tensor:
    """acos with a finite gradient everywhere (zero gradient where cos is clamped)."""
    return torch.acos(cos.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))


def _cos_sin(m: torch.Tensor | float):
    """(cos m, sin m): Python numbers for a number (no tensor made on the device: a copy from the host would
    synchronise), tensors for a tensor (per-class margins)."""
    if isinstance(m, torch.Tensor):
        return torch.cos(m), torch.sin(m)
    return math.cos(m), math.sin(m)


def cos_add_angle(cos: torch.Tensor, m: torch.Tensor | float) -> torch.Tensor:
    """cos(theta + m) from cos(theta) without acos: cos*cos(m) - sin*sin(m), theta in [0, pi]."""
    if isinstance(m, torch.Tensor):
        m = m.to(cos.dtype)
    cos_m, sin_m = _cos_sin(m)
    sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=_SIN_EPS))
    return cos * cos_m - sin * sin_m


def arc_margin(cos_y: torch.Tensor, m: torch.Tensor | float, easy_margin: bool = False) -> torch.Tensor:
    """ArcFace target cosine: cos(theta + m) while theta + m < pi, else the linear fallback cos - m*sin(pi - m).

    The fallback keeps the target monotone in theta. ``easy_margin`` instead applies the margin only where
    cos > 0 and leaves the target at cos elsewhere.
    """
    if isinstance(m, torch.Tensor):
        m = m.to(cos_y.dtype)
    phi = cos_add_angle(cos_y, m)
    if easy_margin:
        return torch.where(cos_y > 0, phi, cos_y)
    cos_pm, sin_pm = _cos_sin(math.pi - m)
    return torch.where(cos_y > cos_pm, phi, cos_y - m * sin_pm)


def dynamic_margins(class_counts: Sequence[float] | torch.Tensor, m_min: float, m_max: float) -> torch.Tensor:
    """DynM-ArcFace per-class margins: the rarest class gets m_max, the most frequent m_min (all equal: m_max)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    span = counts.max() - counts.min()
    nhat = (counts - counts.min()) / span if span > 0 else torch.zeros_like(counts)
    return (m_min + (m_max - m_min) / 2 * (1 + torch.cos(math.pi * nhat))).float()


def _float64(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A scalar as a float64 tensor on ``device``; a Python number is filled in there (``torch.full``), not
    copied from the host, which would synchronise."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64)
    return torch.full((), float(value), dtype=torch.float64, device=device)


def _global_sums(*values: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """Stack scalars in float64 on ``device`` and sum them over ranks in one all-reduce."""
    return distributed.all_reduce_sum(torch.stack([_float64(v, device) for v in values]))


@dataclass(frozen=True)
class Targets:
    """Each row's target as one call of a head sees it, and how its batch statistics are reduced.

    ``labels_B``: global class ids (per-class margins are looked up with them). ``col_B``: the target's column
    in this call's cosines, -1 where another rank holds it. ``cos_y_B``: every row's target cosine, carrying
    the gradient where ``col_B >= 0`` (elsewhere a detached copy, used only for statistics and thresholds).
    ``rows_split``: True for the data-parallel head (each rank has its own rows and every class), False for
    Partial FC (each rank has every row of the global batch and a shard of the classes).
    """

    labels_B: torch.Tensor
    col_B: torch.Tensor
    cos_y_B: torch.Tensor
    rows_split: bool = True

    @classmethod
    def local(cls, cos_BC: torch.Tensor, labels_B: torch.Tensor) -> Targets:
        """All classes are columns of ``cos_BC``: the data-parallel case."""
        return cls(labels_B, labels_B, cos_BC.gather(1, labels_B[:, None]).squeeze(1), rows_split=True)

    @property
    def held_B(self) -> torch.Tensor:
        """Rows whose target column is in this call's cosines."""
        return self.col_B >= 0

    def target_mask(self, x_BC: torch.Tensor) -> torch.Tensor:
        """Boolean (B, C), True at each held target column."""
        mask = torch.zeros(x_BC.shape, dtype=torch.bool, device=x_BC.device)
        if x_BC.shape[1] == 0:
            return mask
        return mask.scatter(1, self.col_B.clamp(min=0)[:, None], self.held_B[:, None])

    def with_target(self, x_BC: torch.Tensor, target_B: torch.Tensor) -> torch.Tensor:
        """``x`` with each held target column replaced by ``target`` (out of place, so autograd sees both)."""
        if x_BC.shape[1] == 0:
            return x_BC
        if self.rows_split:  # every target is held: the plain scatter
            return x_BC.scatter(1, self.col_B[:, None], target_B[:, None])
        col_B1 = self.col_B.clamp(min=0)[:, None]
        value_B1 = torch.where(self.held_B[:, None], target_B[:, None].to(x_BC.dtype), x_BC.gather(1, col_B1))
        return x_BC.scatter(1, col_B1, value_B1)

    def global_sums(self, cells: Sequence[torch.Tensor | float] = (), rows: Sequence[torch.Tensor | float] = (),
                    ) -> tuple[torch.Tensor, ...]:
        """float64 sums over the whole job: ``cells`` are sums over this call's (row, column) cells, ``rows``
        per-row sums (counts, row statistics). One all-reduce; in Partial FC the rows are already global."""
        values = [*cells, *rows]
        if not values:
            return ()
        device = self.cos_y_B.device
        if self.rows_split:
            return tuple(_global_sums(*values, device=device).unbind())
        sums = [_float64(v, device) for v in values]
        if cells:
            reduced = distributed.all_reduce_sum(torch.stack(sums[: len(cells)])).unbind()
            sums[: len(cells)] = reduced
        return tuple(sums)

    def gather_rows(self, x_B: torch.Tensor) -> torch.Tensor:
        """A per-row quantity over the global batch."""
        return distributed.all_gather_cat(x_B) if self.rows_split else x_B


def class_cosine(embeddings_BD: torch.Tensor, weight_KD: torch.Tensor, k: int = 1) -> torch.Tensor:
    """float32 cos(e, W_c) to the classes of ``weight`` (rows c*k..c*k+k-1 are class c's sub-centres, max taken)."""
    with torch.autocast(device_type=embeddings_BD.device.type, enabled=False):
        e_BD = F.normalize(embeddings_BD.float(), dim=-1)
        w_KD = F.normalize(weight_KD.float(), dim=-1)
        cos_BK = e_BD @ w_KD.T
    if k == 1:
        return cos_BK
    return cos_BK.view(cos_BK.shape[0], cos_BK.shape[1] // k, k).amax(dim=-1)  # explicit: a shard may be empty


_ALLOCATE_WEIGHTS = contextvars.ContextVar("unic_heads_allocate_weights", default=True)


@contextlib.contextmanager
def _without_class_weights() -> Iterator[None]:
    token = _ALLOCATE_WEIGHTS.set(False)
    try:
        yield
    finally:
        _ALLOCATE_WEIGHTS.reset(token)


WEIGHT_INITS = ("lecun_uniform", "normal")


def init_class_weights_(weight: torch.Tensor, init: str = "lecun_uniform") -> torch.Tensor:
    """Initialise class weights (C*k, D) in place.

    ``lecun_uniform`` (default): UDON's flax ``nn.initializers.lecun_uniform()`` on its (D, C) Dense kernel,
    i.e. fan_in = D: uniform on +-sqrt(3/D), std 1/sqrt(D). ``normal``: N(0, 0.01), the insightface / Unicom
    convention. Only the direction of each row enters the cosine, but the scale sets the effective angular
    step of Adam (about lr / |w_ij| per step), so the two are not interchangeable.
    """
    if init == "lecun_uniform":
        bound = math.sqrt(3.0 / weight.shape[1])
        return nn.init.uniform_(weight, -bound, bound)
    if init == "normal":
        return nn.init.normal_(weight, std=0.01)
    raise ValueError(f"unknown class-weight init {init!r}; choose one of {list(WEIGHT_INITS)}")


class MarginHead(nn.Module, abc.ABC):
    """Base head: class weights (C*k, D) and the float32 cosine to each class (max over its k sub-centres).

    Weights start as UDON's ``lecun_uniform`` (``init``, see :func:`init_class_weights_`). Subclasses
    implement ``margin_logits(cos, targets, embeddings)``. A head built by :func:`build_margin_formula` has
    no weights (``weight`` is None): Partial FC keeps the class centres itself, sharded over ranks.
    """

    def __init__(self, embed_dim: int, num_classes: int, s: float, k: int = 1, init: str = "lecun_uniform") -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"number of sub-centres k must be >= 1, got {k}")
        self.embed_dim, self.num_classes, self.k, self.s, self.init = embed_dim, num_classes, k, s, init
        if init not in WEIGHT_INITS:
            raise ValueError(f"unknown class-weight init {init!r}; choose one of {list(WEIGHT_INITS)}")
        if _ALLOCATE_WEIGHTS.get():
            self.weight = nn.Parameter(torch.empty(num_classes * k, embed_dim))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            init_class_weights_(self.weight.data, self.init)

    def cosine(self, embeddings_BD: torch.Tensor) -> torch.Tensor:
        """cos(e, W_c) in float32, rows c*k..c*k+k-1 of W are class c's sub-centres (max taken)."""
        return class_cosine(embeddings_BD, self.weight, self.k)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, return_cosine: bool = False):
        """Scaled logits (B, C) for cross-entropy; with ``return_cosine`` also the float32 cosines (B, C)."""
        # The whole margin computation stays in float32: acos/sqrt near +-1 are hopeless in half precision.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos_BC = self.cosine(embeddings)
            logits = self._logits(cos_BC, labels, embeddings)
        return (logits, cos_BC) if return_cosine else logits

    def _logits(self, cos_BC: torch.Tensor, labels_B: torch.Tensor, embeddings_BD: torch.Tensor) -> torch.Tensor:
        """Scaled logits from the cosines to every class (the data-parallel head)."""
        return self.margin_logits(cos_BC, Targets.local(cos_BC, labels_B), embeddings_BD)

    @abc.abstractmethod
    def margin_logits(self, cos_BC: torch.Tensor, targets: Targets, embeddings_BD: torch.Tensor) -> torch.Tensor:
        """Scaled logits from float32 cosines to some classes (each head's formula); the margin acts on the
        target columns ``targets`` holds, every other column is a non-target."""

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, k={self.k}, s={self.s}, init={self.init}"


class NormFace(MarginHead):
    """s * cos, no margin."""

    def __init__(self, embed_dim: int, num_classes: int, *, s: float = 16.0, k: int = 1,
                 init: str = "lecun_uniform") -> None:
        super().__init__(embed_dim, num_classes, s, k, init)

    def margin_logits(self, cos_BC, targets, embeddings_BD):
        return self.s * cos_BC


class CosFace(MarginHead):
    """Additive cosine margin: target s*(cos_y - m)."""

    def __init__(self, embed_dim: int, num_classes: int, *, s: float = 30.0, m: float = 0.35, k: int = 1,
                 init: str = "lecun_uniform") -> None:
        super().__init__(embed_dim, num_classes, s, k, init)
        self.m = m

    def margin_logits(self, cos_BC, targets, embeddings_BD):
        return self.s * targets.with_target(cos_BC, targets.cos_y_B - self.m)


class ArcFace(MarginHead):
    """Additive angular margin: target s*cos(theta_y + m) with the fallback of ``arc_margin``."""

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        s: float = 30.0,
        m: float = 0.5,
        easy_margin: bool = False,
        k: int = 1,
        init: str = "lecun_uniform",
    ) -> None:
        super().__init__(embed_dim, num_classes, s, k, init)
        self.m, self.easy_margin = m, easy_margin

    def margins(self, labels_B: torch.Tensor) -> torch.Tensor | float:
        return self.m

    def margin_logits(self, cos_BC, targets, embeddings_BD):
        target = arc_margin(targets.cos_y_B, self.margins(targets.labels_B), self.easy_margin)
        return self.s * targets.with_target(cos_BC, target)


class SubCenterArcFace(ArcFace):
    """ArcFace on the max cosine over k sub-centres per class (default k=3)."""

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        s: float = 30.0,
        m: float = 0.5,
        easy_margin: bool = False,
        k: int = 3,
        init: str = "lecun_uniform",
    ) -> None:
        super().__init__(embed_dim, num_classes, s=s, m=m, easy_margin=easy_margin, k=k, init=init)


class DynMArcFace(ArcFace):
    """ArcFace with per-class margins from class frequencies (``dynamic_margins``), kept as buffers."""

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        class_counts: Sequence[float] | torch.Tensor | None = None,
        s: float = 30.0,
        m_min: float = 0.2,
        m_max: float = 0.5,
        easy_margin: bool = False,
        k: int = 1,
        init: str = "lecun_uniform",
    ) -> None:
        super().__init__(embed_dim, num_classes, s=s, m=m_max, easy_margin=easy_margin, k=k, init=init)
        if class_counts is None:
            raise ValueError("dynm_arcface needs class_counts (one count per class)")
        counts = torch.as_tensor(class_counts, dtype=torch.float32).flatten()
        if counts.numel() != num_classes:
            raise ValueError(f"class_counts has {counts.numel()} entries, expected num_classes={num_classes}")
        self.m_min, self.m_max = m_min, m_max
        self.register_buffer("class_counts", counts)
        self.register_buffer("class_margins", dynamic_margins(counts, m_min, m_max))
        logger.debug("dynm_arcface margins in [%.3f, %.3f]", self.class_margins.min(), self.class_margins.max())

    def margins(self, labels_B: torch.Tensor) -> torch.Tensor:
        return self.class_margins[labels_B]


class AdaCos(MarginHead):
    """s*cos with s re-estimated from each training batch (before scaling it), no margin, no gradient through s.

    B_avg (mean over samples of the non-target sum of exp(s_old*cos)) uses sums and counts all-reduced over
    ranks; the median target angle is the true median of the gathered global batch. Under Partial FC the
    non-target sum runs over the classes of the softmax actually computed (every class at rate 1).
    """

    def __init__(self, embed_dim: int, num_classes: int, *, k: int = 1, init: str = "lecun_uniform") -> None:
        if num_classes < 3:
            raise ValueError(f"adacos needs num_classes >= 3 (s0 = sqrt(2)*log(C-1)), got {num_classes}")
        super().__init__(embed_dim, num_classes, math.sqrt(2) * math.log(num_classes - 1), k, init)
        self.register_buffer("scale", torch.tensor(self.s, dtype=torch.float32))

    @torch.no_grad()
    def _update_scale(self, cos_BC: torch.Tensor, targets: Targets) -> None:
        not_target_BC = ~targets.target_mask(cos_BC)
        # float64: exp(s*cos) overflows float32 once s grows past ~88
        exp_BC = torch.exp(self.scale.double() * cos_BC.double()) * not_target_BC
        exp_sum, count = targets.global_sums(cells=[exp_BC.sum()], rows=[cos_BC.shape[0]])
        theta_y = safe_acos(targets.cos_y_B).double()
        theta_sorted = targets.gather_rows(theta_y).sort().values
        n = theta_sorted.numel()
        theta_med = (theta_sorted[(n - 1) // 2] + theta_sorted[n // 2]) / 2  # true median, even n included
        new_scale = torch.log(exp_sum / count) / torch.cos(theta_med.clamp(max=math.pi / 4))
        self.scale.copy_(new_scale)

    def margin_logits(self, cos_BC, targets, embeddings_BD):
        if self.training:
            self._update_scale(cos_BC, targets)
        return self.scale * cos_BC

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, k={self.k}, s0={self.s:.4f}, "
                f"init={self.init}")


class LiArcFace(MarginHead):
    """Linear-in-angle logits s*(pi - 2*(theta + m*[j=y]))/pi for every class."""

    def __init__(self, embed_dim: int, num_classes: int, *, s: float = 64.0, m: float = 0.45, k: int = 1,
                 init: str = "lecun_uniform") -> None:
        super().__init__(embed_dim, num_classes, s, k, init)
        self.m = m

    def margin_logits(self, cos_BC, targets, embeddings_BD):
        theta_BC = targets.with_target(safe_acos(cos_BC), safe_acos(targets.cos_y_B) + self.m)
        return self.s * (math.pi - 2 * theta_BC) / math.pi


class CurricularFace(MarginHead):
    """ArcFace target; hard non-targets (cos > cos(theta_y + m)) become cos*(t + cos), t an EMA of mean cos_y.

    Under Partial FC, t is still the mean over the whole global batch; the hard non-targets are those among
    the sampled classes (every class at rate 1).
    """

    def __init__(self, embed_dim: int, num_classes: int, *, s: float = 64.0, m: float = 0.5, k: int = 1,
                 init: str = "lecun_uniform") -> None:
        super().__init__(embed_dim, num_classes, s, k, init)
        self.m = m
        self.register_buffer("t", torch.zeros(()))

    def margin_logits(self, cos_BC, targets, embeddings_BD):
        cos_y = targets.cos_y_B
        if self.training:
            with torch.no_grad():
                cos_sum, count = targets.global_sums(rows=[cos_y.sum(), cos_y.numel()])
                self.t.copy_(0.99 * self.t.double() + 0.01 * cos_sum / count)
        phi_y = cos_add_angle(cos_y, self.m)  # margin-added target cos, the hardness threshold
        hard_BC = (cos_BC > phi_y.detach()[:, None]) & ~targets.target_mask(cos_BC)
        cos_BC = torch.where(hard_BC, cos_BC * (self.t + cos_BC), cos_BC)
        return self.s * targets.with_target(cos_BC, arc_margin(cos_y, self.m))


class AdaFace(MarginHead):
    """Margin adapted to image quality through the embedding norm (Kim et al., 2022).

    ms = clip(h*(||e|| - mu)/(sigma + eps), -1, 1) with mu, sigma the (EMA of the) global batch mean and
    unbiased std of the clipped, detached norms; target cos(clip(theta_y - m*ms, eps, pi-eps)) - (m + m*ms).
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        eps: float = 1e-3,
        alpha: float = 1.0,
        k: int = 1,
        init: str = "lecun_uniform",
    ) -> None:
        super().__init__(embed_dim, num_classes, s, k, init)
        self.m, self.h, self.eps, self.alpha = m, h, eps, alpha
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    @torch.no_grad()
    def _update_norm_stats(self, norms_B: torch.Tensor, targets: Targets) -> None:
        norm_sum, norm_sq_sum, count = targets.global_sums(
            rows=[norms_B.double().sum(), norms_B.double().square().sum(), norms_B.numel()])
        mean = norm_sum / count
        self.batch_mean.copy_(self.alpha * mean + (1 - self.alpha) * self.batch_mean.double())
        # a one-sample global batch has no unbiased std: keep the previous sigma (torch.where: no host sync)
        std = torch.sqrt(torch.clamp(norm_sq_sum - count * mean * mean, min=0) / (count - 1).clamp_min(1))
        updated = self.alpha * std + (1 - self.alpha) * self.batch_std.double()
        self.batch_std.copy_(torch.where(count > 1, updated, self.batch_std.double()))

    def margin_logits(self, cos_BC, targets, embeddings_BD):
        cos_BC = cos_BC.clamp(-1 + self.eps, 1 - self.eps)
        norms_B = embeddings_BD.detach().float().norm(dim=-1).clamp(0.001, 100)
        if self.training:
            self._update_norm_stats(norms_B, targets)
        ms_B = (self.h * (norms_B - self.batch_mean) / (self.batch_std + self.eps)).clamp(-1, 1)
        cos_y = targets.cos_y_B.clamp(-1 + self.eps, 1 - self.eps)
        theta_y = torch.acos(cos_y)  # finite: |cos| <= 1 - eps
        theta_y = (theta_y - self.m * ms_B).clamp(self.eps, math.pi - self.eps)
        target = torch.cos(theta_y) - (self.m + self.m * ms_B)
        return self.s * targets.with_target(cos_BC, target)


MARGIN_HEADS: dict[str, type[MarginHead]] = {
    "normface": NormFace,
    "cosface": CosFace,
    "arcface": ArcFace,
    "subcenter_arcface": SubCenterArcFace,
    "dynm_arcface": DynMArcFace,
    "adacos": AdaCos,
    "liarcface": LiArcFace,
    "curricularface": CurricularFace,
    "adaface": AdaFace,
}


def head_kwargs(name: str) -> list[str]:
    """The keyword arguments head ``name`` accepts (besides embed_dim and num_classes)."""
    params = inspect.signature(MARGIN_HEADS[name]).parameters
    return [p for p in params if p not in ("embed_dim", "num_classes")]


def build_margin_head(name: str, embed_dim: int, num_classes: int, **kw) -> MarginHead:
    """Build margin head ``name``; unknown names or keyword arguments fail listing the valid ones."""
    if name not in MARGIN_HEADS:
        raise ValueError(f"unknown margin head {name!r}; choose one of {sorted(MARGIN_HEADS)}")
    valid = head_kwargs(name)
    unknown = sorted(set(kw) - set(valid))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for margin head {name!r}; valid: {valid}")
    head = MARGIN_HEADS[name](embed_dim, num_classes, **kw)
    logger.debug("built margin head %s: %s", name, head.extra_repr())
    return head


def build_margin_formula(name: str, embed_dim: int, num_classes: int, **kw) -> MarginHead:
    """Head ``name`` without class weights (``weight`` is None): only its formula and state, for callers that
    keep the class centres themselves (Partial FC shards them over ranks)."""
    with _without_class_weights():
        return build_margin_head(name, embed_dim, num_classes, **kw)
