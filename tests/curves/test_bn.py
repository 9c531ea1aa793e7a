"""Batch-norm re-estimation: the exact (sample-weighted) average of per-batch statistics, model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralign.curves import reestimate_bn
from neuralign.errors import ShapeMismatchError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, momentum=0.3)
        self.fc = nn.Linear(4, 6)
        self.bn1 = nn.BatchNorm1d(6)  # default momentum 0.1
        self.bn_plain = nn.BatchNorm1d(6, track_running_stats=False)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = self.bn1(self.fc(h.mean(dim=(2, 3))))
        return self.out(torch.relu(self.bn_plain(h)))


def random_params(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.5 + (1.0 if k.endswith("bn.weight") else 0.0)
            for k, v in model.named_parameters()}


def batches(sizes: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 5, 5, generator=g) * 2 + 1, torch.zeros(n, dtype=torch.long)) for n in sizes]


def by_hand(params: dict[str, torch.Tensor], data) -> dict[str, torch.Tensor]:
    """Per-batch statistics computed directly from the layers' inputs, averaged with weights |B_k|."""
    means0, vars0, means1, vars1, sizes = [], [], [], [], []
    for x, _ in data:
        z = nn.functional.conv2d(x, params["conv.weight"], params["conv.bias"], padding=1)
        flat = z.transpose(0, 1).reshape(4, -1)
        means0.append(flat.mean(1))
        vars0.append(flat.var(1, unbiased=True))
        mu, var = flat.mean(1, keepdim=True), flat.var(1, unbiased=False, keepdim=True)
        h = (flat - mu) / torch.sqrt(var + 1e-5)
        h = h * params["bn.weight"][:, None] + params["bn.bias"][:, None]
        h = torch.relu(h).reshape(4, x.shape[0], -1).mean(2).t()
        u = h @ params["fc.weight"].t() + params["fc.bias"]
        means1.append(u.mean(0))
        vars1.append(u.var(0, unbiased=True))
        sizes.append(x.shape[0])
    w = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)

    def avg(rows):
        return (torch.stack(rows) * w[:, None]).sum(0)

    return {"bn.running_mean": avg(means0), "bn.running_var": avg(vars0),
            "bn1.running_mean": avg(means1), "bn1.running_var": avg(vars1)}


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "momenta": [getattr(m, "momentum", None) for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modes"] == before["modes"] and after["momenta"] == before["momenta"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


@pytest.mark.parametrize("training", [True, False])
def test_equals_exact_average_of_batch_statistics_and_model_is_untouched(training: bool) -> None:
    torch.manual_seed(0)
    model = Net().train(training)
    model.bn.running_mean.fill_(3.0)  # stale statistics that must be discarded, not blended
    before = snapshot(model)
    params = random_params(model, 1)
    data = batches([16, 16, 16, 5])  # a short last batch: the average is weighted by batch size
    buffers = reestimate_bn(model, params, data)
    expected = by_hand(params, data)
    for k, v in expected.items():
        torch.testing.assert_close(buffers[k], v, rtol=1e-4, atol=1e-5)  # float32 running sums over 4 batches
    assert int(buffers["bn.num_batches_tracked"]) == 4
    assert set(buffers) == {k for k, _ in model.named_buffers()}
    assert_unchanged(model, before)


def test_max_batches_uses_only_the_first_batches() -> None:
    model = Net()
    params = random_params(model, 2)
    data = batches([8, 8, 8, 8])
    buffers = reestimate_bn(model, params, data, max_batches=2)
    expected = by_hand(params, data[:2])
    torch.testing.assert_close(buffers["bn1.running_var"], expected["bn1.running_var"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="`max_batches` must be None or an int >= 1, got 0"):
        reestimate_bn(model, params, data, max_batches=0)


def test_accepts_a_full_state_dict_and_returns_buffers_on_the_parameters_device() -> None:
    model = Net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = reestimate_bn(model, state, batches([4, 4]))
    assert buffers["bn.running_mean"].device == state["conv.weight"].device


def test_model_without_batch_norm_needs_no_data() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    model.register_buffer("scale", torch.tensor(2.0))

    def never():
        raise AssertionError("the loader must not be read")
        yield

    buffers = reestimate_bn(model, dict(model.named_parameters()), never())
    assert torch.equal(buffers["scale"], torch.tensor(2.0)) and buffers["scale"] is not model.scale


def test_errors() -> None:
    model = Net()
    params = random_params(model, 0)
    with pytest.raises(ValueError, match="`loader` yielded no batch"):
        reestimate_bn(model, params, [])
    with pytest.raises(ShapeMismatchError, match="`params` has no parameter `out.bias`"):
        reestimate_bn(model, {k: v for k, v in params.items() if k != "out.bias"}, batches([4]))
    with pytest.raises(ShapeMismatchError, match=r"`params` has parameter `fc.weight` of shape \(6, 5\)"):
        reestimate_bn(model, {**params, "fc.weight": torch.zeros(6, 5)}, batches([4]))
    with pytest.raises(ShapeMismatchError, match="`params` has an entry `nope` that is not a parameter"):
        reestimate_bn(model, {**params, "nope": torch.zeros(1)}, batches([4]))
    wrong = [(torch.zeros(4, 1, 5, 5), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"`loader` yielded inputs of shape \(4, 1, 5, 5\).*first layer `conv`.*"
                                         r"expects inputs of shape \(N, 3, H, W\)"):
        reestimate_bn(model, params, wrong)
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        reestimate_bn(params, params, batches([4]))


def test_cumulative_momentum_layers_and_momentum_zero() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None))
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs = [torch.randn(n, 3) * 3 + 2 for n in (7, 7, 3)]
    buffers = reestimate_bn(model, params, xs)
    h = [model[0](x).detach() for x in xs]
    torch.testing.assert_close(buffers["1.running_mean"], torch.cat(h).mean(0), rtol=1e-5, atol=1e-5)
    expected_var = sum(len(x) * v.var(0) for x, v in zip(xs, h)) / 17
    torch.testing.assert_close(buffers["1.running_var"], expected_var, rtol=1e-5, atol=1e-5)
    assert model[1].momentum is None and int(buffers["1.num_batches_tracked"]) == 3
    frozen = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.0))
    with pytest.raises(ValueError, match="batch norm `1` has momentum 0"):
        reestimate_bn(frozen, dict(frozen.named_parameters()), xs)
