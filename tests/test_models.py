"""Student taps, ladder of projectors and the frozen teacher glue."""

import torch

from unic.models.ladder import Ladder, UnicModel
from unic.models.student import build_student, student_taps
from unic.models.teacher import FrozenTeacher

TINY = {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


def test_taps_are_block_outputs_and_last_is_normed():
    model = build_student("vit_tiny_patch16_224", 32, 0.0, TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    taps, cls = student_taps(model, x)
    assert len(taps) == 3
    for tap_cls, patch in taps:
        assert tap_cls.shape == (2, 32) and patch.shape == (2, 16, 32)
    final = model.forward_features(x)
    torch.testing.assert_close(taps[-1][0], final[:, 0])
    torch.testing.assert_close(taps[-1][1], final[:, 1:])
    torch.testing.assert_close(cls, final[:, 0])


def test_raw_last_tap_is_the_last_block_output_before_the_final_norm():
    """UNIC's code feeds the raw last block output to the last projector; the cls output stays normed."""
    model = build_student("vit_tiny_patch16_224", 32, 0.0, TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    taps, cls = student_taps(model, x, last_tap="raw")
    tokens = model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(x))))
    torch.testing.assert_close(taps[-1][0], tokens[:, 0])
    torch.testing.assert_close(taps[-1][1], tokens[:, 1:])
    torch.testing.assert_close(cls, model.norm(tokens)[:, 0])
    normed, _ = student_taps(model, x, last_tap="normed")
    assert not torch.allclose(normed[-1][0], taps[-1][0])


def test_taps_skip_register_tokens():
    model = build_student("vit_tiny_patch16_224", 32, 0.0, {**TINY, "reg_tokens": 4, "no_embed_class": True}).eval()
    cls, patch = student_taps(model, torch.randn(1, 3, 32, 32))[0][0]
    assert patch.shape == (1, 16, 32)


def test_ladder_shapes_widths_and_gradient_to_every_parameter():
    backbone = build_student("vit_tiny_patch16_224", 32, 0.1, TINY)
    ladder = Ladder(32, 3, {"x": 12, "y": 7}, blocks=None, hidden_dim=16, last_hidden_dim=40)
    assert [p[0].out_features for p in ladder.projectors["x"]["cls"]] == [16, 16, 40]
    model = UnicModel(backbone, ladder, torch.nn.Linear(32, 5)).train()
    full = model(torch.randn(4, 3, 32, 32))
    assert full["universal_raw"].shape == (4, 5) and full["cls"].shape == (4, 32)
    out = full["preds"]
    assert out["x"]["cls"].shape == (4, 12) and out["x"]["patch"].shape == (4, 16, 12)
    assert out["y"]["cls"].shape == (4, 7) and out["y"]["patch"].shape == (4, 16, 7)
    loss = sum(v.square().mean() for t in out.values() for v in t.values()) + full["universal_raw"].sum()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert zero == [], zero


def test_ladder_block_selection_and_init():
    ladder = Ladder(32, 4, {"x": 8}, blocks=[1, -1], hidden_dim=16, last_hidden_dim=24)
    assert ladder.blocks == [1, 3]
    proj = ladder.projectors["x"]["patch"][0]
    assert torch.all(proj[0].bias == 0) and torch.all(proj[2].bias == 0)
    assert proj[0].weight.abs().max() <= 0.04 + 1e-6  # trunc-normal(0.02) is cut at 2 std
    taps = [(torch.randn(2, 32), torch.randn(2, 5, 32)) for _ in range(4)]
    out = ladder(taps)
    p = ladder.projectors["x"]["cls"]
    torch.testing.assert_close(out["x"]["cls"], p[0](taps[1][0]) + p[1](taps[3][0]))


def test_frozen_teacher_resizes_renormalises_and_resamples_grid():
    teacher = FrozenTeacher("toy_vit_p14_d48", "random", "")
    teacher.train()
    assert not teacher.training and not teacher.tokens.training
    assert all(not p.requires_grad for p in teacher.parameters())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = (torch.rand(2, 3, 64, 64) - mean) / std
    out = teacher(images, mean, std, (8, 8))
    assert out["cls"].shape == (2, 48) and out["patch"].shape == (2, 64, 48)
    # same grid: no resampling, tokens are the teacher's own
    native = teacher(images, mean, std, (5, 5))
    x = torch.nn.functional.interpolate(images * std + mean, size=(70, 70), mode="bicubic", antialias=True).clamp(0, 1)
    cls, patch = teacher.tokens((x - teacher.mean) / teacher.std)
    torch.testing.assert_close(native["patch"], patch)
    torch.testing.assert_close(native["cls"], cls)
    # resampled grid is the bilinear interpolation of the native grid
    grid = patch.transpose(1, 2).reshape(2, 48, 5, 5)
    expected = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bilinear").flatten(2).transpose(1, 2)
    torch.testing.assert_close(out["patch"], expected)


def _count_linear_kernels(fn) -> int:
    """aten matmul calls (addmm / mm / bmm / linear decompositions) made by ``fn``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.addmm, torch.ops.aten.mm, torch.ops.aten.bmm):
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def test_grouped_ladder_equals_the_per_projector_loop_in_values_gradients_and_kernel_count():
    torch.manual_seed(0)
    teacher_dims = {"a": 12, "b": 7, "c": 12}
    ladder = Ladder(16, 4, teacher_dims, blocks=[0, 2, -1], hidden_dim=8, last_hidden_dim=20).double()
    for p in ladder.parameters():  # non-zero biases, so that their sum over blocks is checked too
        torch.nn.init.normal_(p, std=0.3)
    taps = [(torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64))
            for _ in range(4)]

    def run(batched: bool):
        ladder.batched = batched
        ladder.zero_grad()
        out = ladder(taps)
        loss = sum((out[n][t] * torch.linspace(-1, 1, out[n][t].shape[-1], dtype=torch.float64)).sum()
                   for n in out for t in out[n])
        loss.backward()
        return out, {k: p.grad.clone() for k, p in ladder.named_parameters()}

    loop_out, loop_grads = run(False)
    grouped_out, grouped_grads = run(True)
    for name in teacher_dims:
        for ttype in ("cls", "patch"):
            torch.testing.assert_close(grouped_out[name][ttype], loop_out[name][ttype], rtol=1e-12, atol=1e-12)
    assert grouped_grads.keys() == loop_grads.keys()
    for key in loop_grads:
        torch.testing.assert_close(grouped_grads[key], loop_grads[key], rtol=1e-12, atol=1e-12)
    # 2 token types x (3 blocks + 3 teachers) matmuls, against 2 x 3 x 3 projectors x 2 layers
    ladder.batched = True
    assert _count_linear_kernels(lambda: ladder(taps)) == 2 * (3 + 3)
    ladder.batched = False
    assert _count_linear_kernels(lambda: ladder(taps)) == 2 * 3 * 3 * 2
    ladder.batched = True
    # float32 agrees to float tolerance; the state dict is the per-projector one (exports unchanged)
    ladder32 = ladder.float()
    taps32 = [(c.float(), p.float()) for c, p in taps]
    grouped = ladder32(taps32)
    ladder32.batched = False
    torch.testing.assert_close(grouped["a"]["patch"], ladder32(taps32)["a"]["patch"], rtol=1e-5, atol=1e-5)
    assert "projectors.a.cls.0.0.weight" in ladder32.state_dict()
