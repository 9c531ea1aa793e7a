"""REPAIR (Jordan et al. 2023) against closed forms: a linear -> batch-norm chain and a BN-free MLP in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralign.curves import RepairStatistics, repair, repair_points, repair_statistics


def random_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in model.state_dict().items()
            if v.is_floating_point()} | {k: v for k, v in model.state_dict().items() if not v.is_floating_point()}


def data(n: int = 40, d: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 + 0.5


def test_points_follow_batch_norm_and_skip_the_output_layer() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(5, 2))  # fmt: skip
    assert repair_points(net) == ("1", "3")


def test_linear_bn_chain_closed_form() -> None:
    # h = W x + b, z = BN(h), output layer after ReLU. The REPAIR point is the BN output; in train mode its channel
    # mean is beta and its std |gamma| (v / (v + eps_bn))^(1/2) with v the population variance of h. REPAIR sets
    # beta' = (1-t) beta_A + t beta_B, gamma' = gamma_t * sigma* / sigma_t, then re-estimates the running stats.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).double()
    sa, sb = random_state(model, 1), random_state(model, 2)
    sb["1.weight"] = -sb["1.weight"].abs()  # negative gammas: the std is |gamma|, the sign is kept
    x = data()
    t = 0.3
    eps_bn = model[1].eps
    stats_a, stats_b = (repair_statistics(model, s, [x]) for s in (sa, sb))
    params = {k: v for k, v in sa.items() if k in dict(model.named_parameters())}
    point = {k: (1 - t) * sa[k] + t * sb[k] for k in params}
    out = repair(model, point, stats_a, stats_b, [x], t=t, eps=0.0)

    def bn_out_std(s):
        h = x @ s["0.weight"].T + s["0.bias"]
        v = h.var(0, unbiased=False)
        return s["1.weight"].abs() * (v / (v + eps_bn)).sqrt(), h

    std_a, _ = bn_out_std(sa)
    std_b, _ = bn_out_std(sb)
    torch.testing.assert_close(stats_a.mean["1"], sa["1.bias"], rtol=0, atol=1e-12)
    torch.testing.assert_close(stats_a.std["1"], std_a, rtol=1e-12, atol=0)
    std_t, h_t = bn_out_std(point)
    target_std = (1 - t) * std_a + t * std_b
    torch.testing.assert_close(out["1.bias"], (1 - t) * sa["1.bias"] + t * sb["1.bias"], rtol=0, atol=1e-12)
    torch.testing.assert_close(out["1.weight"], point["1.weight"] * target_std / std_t, rtol=1e-10, atol=0)
    torch.testing.assert_close(out["1.running_mean"], h_t.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(out["1.running_var"], h_t.var(0, unbiased=True), rtol=1e-12, atol=0)
    for k in ("0.weight", "0.bias", "3.weight", "3.bias"):
        torch.testing.assert_close(out[k], point[k], rtol=0, atol=0)
    # in eval mode the repaired BN output has the interpolated mean on the data, and the interpolated std up to
    # the running variance being the unbiased one (n / (n - 1)), as batch norm stores it
    z = model[1].eval()
    with torch.no_grad():
        y = torch.func.functional_call(z, {k[2:]: v for k, v in out.items() if k.startswith("1.")}, (h_t,))
    torch.testing.assert_close(y.mean(0), out["1.bias"], rtol=0, atol=1e-10)
    v_t = h_t.var(0, unbiased=False)
    n = x.shape[0]
    expected = target_std * ((v_t + eps_bn) / (v_t * n / (n - 1) + eps_bn)).sqrt()
    torch.testing.assert_close(y.std(0, unbiased=False), expected, rtol=1e-10, atol=0)


def test_bn_free_mlp_gets_the_interpolated_statistics_at_every_hidden_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    assert repair_points(model) == ("0", "2")
    sa, sb = random_state(model, 3), random_state(model, 4)
    x = data()
    stats_a, stats_b = (repair_statistics(model, s, [x]) for s in (sa, sb))
    t = 0.5
    point = {k: (sa[k] + sb[k]) / 2 for k in sa}
    out = repair(model, point, stats_a, stats_b, [x], t=t, eps=0.0)
    h0 = x @ out["0.weight"].T + out["0.bias"]
    h2 = torch.relu(h0) @ out["2.weight"].T + out["2.bias"]
    for name, h in (("0", h0), ("2", h2)):
        torch.testing.assert_close(h.mean(0), (stats_a.mean[name] + stats_b.mean[name]) / 2, rtol=0, atol=1e-10)
        torch.testing.assert_close(h.std(0, unbiased=False), (stats_a.std[name] + stats_b.std[name]) / 2,
                                   rtol=1e-10, atol=0)  # fmt: skip
    torch.testing.assert_close(out["4.weight"], point["4.weight"], rtol=0, atol=0)


def test_repair_between_a_network_and_itself_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    sa = random_state(model, 5)
    x = data()
    stats = repair_statistics(model, sa, [x[:25], x[25:]])  # two batches: the pooled statistics are exact
    assert stats.batches == 2 and stats.count == 40
    out = repair(model, sa, stats, stats, [x], t=0.7, eps=0.0)
    for k in sa:
        torch.testing.assert_close(out[k], sa[k], rtol=1e-12, atol=1e-12)


def test_errors() -> None:
    model = nn.Sequential(nn.Linear(3, 6, bias=False), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(8, 3)
    state = dict(model.named_parameters())
    stats = repair_statistics(model, state, [x])
    with pytest.raises(ValueError, match="bias of `0`, which has none"):
        repair(model, state, stats, stats, [x], t=0.5)
    with pytest.raises(ValueError, match="`t` must be a finite number in \\[0, 1\\]"):
        repair(model, state, stats, stats, [x], t=1.5)
    with pytest.raises(TypeError, match="`statistics_b` must be RepairStatistics"):
        repair(model, state, stats, {}, [x], t=0.5)
    empty = RepairStatistics(mean={}, std={}, count=0, batches=0)
    with pytest.raises(ValueError, match="`statistics_a` has no statistics for the REPAIR point `0`"):
        repair(model, state, empty, stats, [x], t=0.5)
    with pytest.raises(ValueError, match="`loader` yielded no batch"):
        repair_statistics(model, state, [])
    shared = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="`0` is called 2 times"):
        repair_points(nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(3, 2)))


def test_conv_net_channels_get_the_interpolated_statistics_over_positions() -> None:
    # per channel over (N, H, W), as batch norm would: conv -> ReLU -> conv -> ReLU -> pool -> linear head
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).double()  # fmt: skip
    assert repair_points(model) == ("0", "2")
    sa, sb = random_state(model, 8), random_state(model, 9)
    x = torch.randn(6, 2, 7, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stats_a, stats_b = (repair_statistics(model, s, [x]) for s in (sa, sb))
    assert stats_a.count == 6 * 5 * 5
    t = 0.25
    point = {k: (1 - t) * sa[k] + t * sb[k] for k in sa}
    out = repair(model, point, stats_a, stats_b, [x], t=t, eps=0.0)
    h0 = nn.functional.conv2d(x, out["0.weight"], out["0.bias"])
    h2 = nn.functional.conv2d(torch.relu(h0), out["2.weight"], out["2.bias"], padding=1)
    for name, h in (("0", h0), ("2", h2)):
        target_mean = (1 - t) * stats_a.mean[name] + t * stats_b.mean[name]
        target_std = (1 - t) * stats_a.std[name] + t * stats_b.std[name]
        torch.testing.assert_close(h.mean((0, 2, 3)), target_mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(h.std((0, 2, 3), unbiased=False), target_std, rtol=1e-10, atol=0)
