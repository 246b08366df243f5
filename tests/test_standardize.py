"""Teacher-feature standardisation against a direct computation (SPEC section 3)."""


import pytest
import torch

from unic.train.standardize import TeacherStandardizer, std_momentum


def _feats(seed, B=6, N=5):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": {"cls": torch.randn(B, 3, generator=g) * 2 + 1, "patch": torch.randn(B, N, 3, generator=g) - 4},
        "b": {"cls": torch.randn(B, 4, generator=g) * 5, "patch": torch.randn(B, N, 4, generator=g) * 0.1},
    }


def _direct(x):
    flat = x.reshape(-1, x.shape[-1]).double()
    return flat.mean(0), flat.std(0, unbiased=True)


def test_momentum_schedule():
    assert std_momentum(0, 100) == pytest.approx(1.0)
    assert std_momentum(99, 100) == pytest.approx(0.001)
    assert std_momentum(50, 101) == pytest.approx(0.001 + 0.5 * 0.999)


def test_running_statistics_match_direct_computation():
    std = TeacherStandardizer({"a": 3, "b": 4}).train()
    batches = [_feats(s) for s in range(3)]
    momenta = [1.0, 0.3, 0.1]
    run = {}
    for step, (feats, m) in enumerate(zip(batches, momenta)):
        out = std(feats, momentum=m)
        for name in ("a", "b"):
            for ttype in ("cls", "patch"):
                mean, sd = _direct(feats[name][ttype])
                if step == 0:  # step 0 normalises with the first batch's own statistics
                    prev = (mean, sd)
                else:
                    prev = run[(name, ttype)]
                expected = (feats[name][ttype].double() - prev[0]) / (prev[1] + 1e-6)
                torch.testing.assert_close(out[name][ttype].double(), expected, rtol=1e-5, atol=1e-5)
                run[(name, ttype)] = (
                    prev[0] * (1 - m) + mean * m if step else mean,
                    prev[1] * (1 - m) + sd * m if step else sd,
                )
    for (name, ttype), (mean, sd) in run.items():
        got_mean, got_std = std.running(name, ttype)
        torch.testing.assert_close(got_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_std.double(), sd, rtol=1e-5, atol=1e-6)


def test_first_step_output_is_standardised():
    std = TeacherStandardizer({"a": 3, "b": 4}).train()
    out = std(_feats(0), momentum=1.0)
    flat = out["a"]["patch"].reshape(-1, 3)
    torch.testing.assert_close(flat.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(0), torch.ones(3), atol=1e-4, rtol=0)


def test_eval_mode_uses_running_values_and_never_updates():
    std = TeacherStandardizer({"a": 3, "b": 4}).train()
    std(_feats(0), momentum=1.0)
    before = {k: v.clone() for k, v in std.state_dict().items()}
    std.eval()
    feats = _feats(1)
    out = std(feats, momentum=0.5)
    for k, v in std.state_dict().items():
        assert torch.equal(v, before[k])
    mean, sd = std.running("b", "cls")
    torch.testing.assert_close(out["b"]["cls"], (feats["b"]["cls"] - mean) / (sd + 1e-6))


def test_state_dict_round_trip():
    std = TeacherStandardizer({"a": 3, "b": 4}).train()
    std(_feats(0), momentum=1.0)
    std(_feats(1), momentum=0.5)
    other = TeacherStandardizer({"a": 3, "b": 4})
    other.load_state_dict(std.state_dict())
    for k, v in std.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    assert bool(other.initialized)
