"""fit_curve: the gradient it follows, real-data improvement over the line, exact resume, and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, TensorDataset

from neuralign._utils import stable_seed
from neuralign.curves import Bezier, Line, PolyChain, evaluate_curve, fit_curve, paper_lr_factor
from neuralign.errors import CheckpointError, NonFiniteError, ShapeMismatchError
from neuralign.status import Status
from tests.conftest import shared_data


def small_net(seed: int, in_features: int = 6, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(in_features, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, classes)
    )


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def toy_batches(n_batches: int, seed: int = 0, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n_batches)]


# ---------------------------------------------------------------------------------------------------------------
# the step is the gradient step of the stated objective
def reference_fit(model, points, trainable, coefficient, data, ts, lr, wd, mu):
    """Plain autograd over per-parameter dicts: sum_j c_j(t) p_j, CE + wd/2 ||w||^2 + ||theta - theta0||^2/(2mu)."""
    thetas = [{k: v.clone().requires_grad_(tr) for k, v in p.items()} for p, tr in zip(points, trainable)]
    anchor = [{k: v.clone() for k, v in p.items()} for p in points]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.train()
    for (x, y), t in zip(data, ts):
        c = coefficient(t)
        w = {k: sum(cj * th[k] for cj, th in zip(c, thetas)) for k in points[0]}
        loss = nn.functional.cross_entropy(functional_call(model, (w, buffers), (x,)), y)
        loss = loss + 0.5 * wd * sum(v.pow(2).sum() for v in w.values())
        if mu is not None:
            loss = loss + sum(
                (th[k] - an[k]).pow(2).sum() for th, an, tr in zip(thetas, anchor, trainable) if tr for k in th
            ) / (2 * mu)
        grads = torch.autograd.grad(loss, [th[k] for th, tr in zip(thetas, trainable) if tr for k in th])
        it = iter(grads)
        with torch.no_grad():
            for th, tr in zip(thetas, trainable):
                if tr:
                    for k in th:
                        th[k] -= lr * next(it)
    return [{k: v.detach() for k, v in th.items()} for th in thetas]


@pytest.mark.parametrize(
    "make, mu",
    [
        (lambda a, b: Bezier.between(a, b), None),
        (lambda a, b: Bezier.between(a, b, degree=3, free_ends=True), 0.5),
        (lambda a, b: PolyChain.between(a, b, bends=2), 2.0),
    ],
    ids=["bezier2", "bezier3-free-ends-prox", "chain2-prox"],
)
def test_step_is_sgd_on_the_stated_objective(make, mu) -> None:
    model = small_net(0)
    a, b = params_of(model), params_of(small_net(1))
    start = make(a, b)
    data = toy_batches(3)
    g = torch.Generator().manual_seed(7)
    ts = [float(torch.rand((), dtype=torch.float64, generator=g)) for _ in data]
    result = fit_curve(
        model, a, b, data, curve=start, epochs=1, generator=7, weight_decay=0.01, proximal=mu,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
    )
    expected = reference_fit(model, start.points, start.trainable, start._coefficient_list, data, ts, 0.05, 0.01, mu)
    for got, want in zip(result.curve.points, expected):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)  # float32, 3 steps
    moved = [not torch.equal(p["0.weight"], q["0.weight"]) for p, q in zip(result.curve.points, start.points)]
    assert moved == list(start.trainable)


def test_model_and_inputs_are_untouched_and_history_is_recorded() -> None:
    model = small_net(0)
    model.eval()
    model[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = params_of(model), params_of(small_net(1))
    a_before = {k: v.clone() for k, v in a.items()}
    records = []
    result = fit_curve(model, a, b, toy_batches(4), epochs=3, generator=0, callback=records.append)
    assert not model.training and not any(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k in a:
        assert torch.equal(a[k], a_before[k])
    assert result.status == 0 and result.converged and result.n_iter == 3 and "completed 3 epochs" in result.message
    assert [r["epoch"] for r in result.history] == [0, 1, 2] and records == list(result.history)
    for r in result.history:
        assert r["lr"] == pytest.approx(0.1 * paper_lr_factor(r["epoch"]))
        assert r["batches"] == 4 and 0.0 <= r["accuracy"] <= 1.0 and r["objective"] > r["loss"] > 0.0
    assert result.fun == result.history[-1]["objective"]
    assert isinstance(result.curve, Bezier)
    for k in a:
        assert torch.equal(result.curve(0.0)[k], a[k]) and torch.equal(result.curve(1.0)[k], b[k])


def test_callback_can_stop_and_max_batches_limits_epochs() -> None:
    model = small_net(0)
    a, b = params_of(model), params_of(small_net(1))
    result = fit_curve(
        model, a, b, toy_batches(5), epochs=10, generator=0, max_batches=2,
        callback=lambda r: r["epoch"] == 1,
    )
    assert result.status == Status.CALLBACK == 2 and not result.converged and result.n_iter == 2
    assert "stopped by the callback after epoch 1" in result.message
    assert all(r["batches"] == 2 for r in result.history)


def test_a_fitted_curve_can_be_continued_from_its_points() -> None:
    model = small_net(0)
    a, b = params_of(model), params_of(small_net(1))
    first = fit_curve(model, a, b, toy_batches(4), epochs=1, generator=0)
    second = fit_curve(model, a, b, toy_batches(4), curve=first.curve, epochs=1, generator=1)
    assert not torch.equal(second.curve.points[1]["0.weight"], first.curve.points[1]["0.weight"])
    assert torch.equal(second.curve.points[0]["0.weight"], a["0.weight"])


# ---------------------------------------------------------------------------------------------------------------
# exact resume
class NoisyDataset(Dataset):
    """Augmentation drawn from the global CPU RNG, as torchvision transforms do."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(self.x.shape[1]), self.y[i]


def shuffled_loader() -> DataLoader:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    return DataLoader(NoisyDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(11))


def test_interrupted_and_resumed_fit_equals_uninterrupted_bit_for_bit(tmp_path) -> None:
    model = small_net(0)
    a, b = params_of(model), params_of(small_net(1))
    kwargs = {"epochs": 5, "generator": 123, "curve": "bezier"}

    torch.manual_seed(42)
    full = fit_curve(model, a, b, shuffled_loader(), checkpoint=tmp_path / "full.pt", **kwargs)

    def interrupt(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    path = tmp_path / "interrupted.pt"
    torch.manual_seed(42)
    with pytest.raises(KeyboardInterrupt):
        fit_curve(model, a, b, shuffled_loader(), checkpoint=path, callback=interrupt, **kwargs)
    assert path.exists() and not list(tmp_path.glob(".*.tmp"))  # no half-written file left behind
    torch.manual_seed(999)  # a new process: the global RNG and the loader's generator start elsewhere
    resumed = fit_curve(model, a, b, shuffled_loader(), checkpoint=path, **kwargs)

    assert resumed.n_iter == full.n_iter == 5
    for got, want in zip(resumed.curve.points, full.curve.points):
        for k in want:
            assert torch.equal(got[k], want[k]), k
    strip = [{k: v for k, v in r.items() if k != "time"} for r in full.history]
    assert [{k: v for k, v in r.items() if k != "time"} for r in resumed.history] == strip
    # a finished checkpoint resumes to the same result without training
    again = fit_curve(model, a, b, shuffled_loader(), checkpoint=path, **kwargs)
    assert torch.equal(again.curve.points[1]["0.weight"], full.curve.points[1]["0.weight"])


def test_checkpoint_of_another_fit_is_refused(tmp_path) -> None:
    model = small_net(0)
    a, b = params_of(model), params_of(small_net(1))
    path = tmp_path / "fit.pt"
    fit_curve(model, a, b, toy_batches(2), epochs=1, generator=0, checkpoint=path)
    other_b = params_of(small_net(2))
    with pytest.raises(CheckpointError, match="belongs to another run: its end points entry differs from this run's"):
        fit_curve(model, a, other_b, toy_batches(2), epochs=2, checkpoint=path)
    with pytest.raises(CheckpointError, match="belongs to another run: its weight_decay is 0.0005"):
        fit_curve(model, a, b, toy_batches(2), epochs=2, weight_decay=0.0, checkpoint=path)
    with pytest.raises(CheckpointError, match="belongs to another run: its family is 'bezier'"):
        fit_curve(model, a, b, toy_batches(2), epochs=2, curve="polychain", checkpoint=path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        fit_curve(model, a, b, toy_batches(2), epochs=2, checkpoint=path)


# ---------------------------------------------------------------------------------------------------------------
# errors
def test_errors_are_named() -> None:
    model = small_net(0)
    a, b = params_of(model), params_of(small_net(1))
    data = toy_batches(2)
    with pytest.raises(ValueError, match="a Line with no trainable point has nothing to fit"):
        fit_curve(model, a, b, data, curve="line", epochs=1)
    with pytest.raises(ValueError, match="a Line with no trainable point has nothing to fit"):
        fit_curve(model, a, b, data, curve=Line.between(a, b), epochs=1)
    with pytest.raises(ValueError, match=r"unknown curve 'spline'; expected one of \['bezier', 'line', 'polychain'\]"):
        fit_curve(model, a, b, data, curve="spline", epochs=1)
    other = Bezier.between(a, params_of(small_net(2)))
    with pytest.raises(ValueError, match=r"`curve` was fitted for other end points: its last point differs from "
                                         r"`point_b` \(first in `0.weight`\)"):
        fit_curve(model, a, b, data, curve=other, epochs=1)
    with pytest.raises(ShapeMismatchError, match=r"`point_b` has parameter `3.weight` of shape \(8, 9\) but `model`"):
        fit_curve(model, a, {**b, "3.weight": torch.zeros(8, 9)}, data, epochs=1)
    with pytest.raises(ShapeMismatchError, match="`point_a` has no parameter `5.bias`"):
        fit_curve(model, {k: v for k, v in a.items() if k != "5.bias"}, b, data, epochs=1)
    wrong = [(torch.randn(16, 7), torch.zeros(16, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"`train_loader` yielded inputs of shape \(16, 7\).*first layer `0`.*"
                                         r"expects 6 features per sample"):
        fit_curve(model, a, b, wrong, epochs=1)
    with pytest.raises(ValueError, match="`train_loader` yielded no batch"):
        fit_curve(model, a, b, [], epochs=1)
    with pytest.raises(ValueError, match="`epochs` must be an int >= 0, got -1"):
        fit_curve(model, a, b, data, epochs=-1)
    with pytest.raises(ValueError, match="`proximal` must be None or a finite number > 0, got 0"):
        fit_curve(model, a, b, data, epochs=1, proximal=0)
    with pytest.raises(ValueError, match="`weight_decay` must be a finite number >= 0, got -1"):
        fit_curve(model, a, b, data, epochs=1, weight_decay=-1)
    with pytest.raises(TypeError, match="`optimizer` must return a torch.optim.Optimizer, got list"):
        fit_curve(model, a, b, data, epochs=1, optimizer=lambda p: p)
    with pytest.raises(NonFiniteError, match="training loss became nan .* during epoch 0"):
        fit_curve(model, a, b, data, epochs=1, loss_fn=lambda out, y: out.sum() * math.nan)


# ---------------------------------------------------------------------------------------------------------------
# real data: a fitted curve beats the straight line at its midpoint
def mnist_loaders(n_train: int = 6000, n_test: int = 2000):
    data = np.load(shared_data("mnist.npz"))
    x = torch.from_numpy(data["x_train"][:n_train]).float().div_(255.0).sub_(0.1307).div_(0.3081)
    y = torch.from_numpy(data["y_train"][:n_train].astype(np.int64))
    xt = torch.from_numpy(data["x_test"][:n_test]).float().div_(255.0).sub_(0.1307).div_(0.3081)
    yt = torch.from_numpy(data["y_test"][:n_test].astype(np.int64))
    train = DataLoader(TensorDataset(x[:, None], y), batch_size=128, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    test = DataLoader(TensorDataset(xt[:, None], yt), batch_size=500)
    return train, test


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10),
    )


def train_endpoint(seed: int, loader: DataLoader, epochs: int = 2) -> nn.Module:
    model = mlp(seed).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def test_fitted_curve_has_lower_midpoint_loss_than_the_line_on_mnist() -> None:
    train, test = mnist_loaders()
    model_a, model_b = train_endpoint(1, train), train_endpoint(2, train)
    a, b = params_of(model_a), params_of(model_b)
    result = fit_curve(model_a, a, b, train, epochs=3, generator=0)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    line = evaluate_curve(model_a, Line.between(a, b), train, test, num_points=3)
    curve = evaluate_curve(model_a, result.curve, train, test, num_points=3)
    assert curve.mid_t == line.mid_t == 0.5
    # endpoints reach ~0.26 test loss (0.91 accuracy); the unaligned linear midpoint ~0.67, the fitted one ~0.27
    assert line.test_loss[0] < 0.4 and line.test_loss[2] < 0.4
    assert curve.mid_loss < line.mid_loss - 0.1, (curve.mid_loss, line.mid_loss)
    assert curve.mid_accuracy > line.mid_accuracy


class WithAux(nn.Module):
    """Returns (logits, aux) in train mode and logits in eval mode, like GoogLeNet."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.body(x))
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


def test_auxiliary_heads_enter_the_training_loss() -> None:
    torch.manual_seed(0)
    model = WithAux()
    a = params_of(model)
    b = {k: v + 0.3 * torch.randn_like(v) for k, v in a.items()}
    data = toy_batches(2)
    with_aux = fit_curve(model, a, b, data, epochs=1, generator=0, weight_decay=0.0)
    main_only = fit_curve(model, a, b, data, epochs=1, generator=0, weight_decay=0.0,
                          loss_fn=lambda out, y: nn.functional.cross_entropy(out[0], y))
    assert with_aux.history[0]["loss"] > main_only.history[0]["loss"] * 1.2  # + 0.3 CE(aux) on a similar scale
    start = Bezier.between(a, b).points[1]["aux.weight"]
    assert torch.equal(main_only.curve.points[1]["aux.weight"], start)  # no loss term reaches the aux head
    assert not torch.equal(with_aux.curve.points[1]["aux.weight"], start)


# ---------------------------------------------------------------------------------------------------------------
# robust curves
class UnitBoxDataset(NoisyDataset):
    """Inputs in [0, 1] (as an attack needs), augmented from the global CPU RNG."""

    def __getitem__(self, i: int):
        return (self.x[i] + 0.05 * torch.randn(self.x.shape[1])).clamp(0.0, 1.0), self.y[i]


def unit_box_loader() -> DataLoader:
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    return DataLoader(UnitBoxDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(11))


def test_robust_fit_takes_the_loss_on_attacks_against_w_t() -> None:
    from neuralign.attacks import PGD

    model = small_net(0)
    a, b = params_of(model), params_of(small_net(1))
    pgd = PGD(eps=0.2, alpha=0.1, steps=3)
    x, y = next(iter(unit_box_loader()))
    res = fit_curve(model, a, b, [(x, y)], epochs=1, generator=123, adversarial=pgd)
    # replay the batch: the attack's seed, then one t from the generator; the attack's own generator seeded from
    # (seed, rank 0, epoch 0)
    g = torch.Generator().manual_seed(123)
    attack_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    t = float(torch.rand((), dtype=torch.float64, generator=g))
    w = Bezier.between(a, b)(t)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    attack_gen = torch.Generator().manual_seed(stable_seed("fit_curve attack", attack_seed, 0, 0))
    adv = pgd.attack(model, x, y, train=True, params=w, buffers=buffers, generator=attack_gen)
    model.train()
    with torch.no_grad():
        want = float(nn.functional.cross_entropy(functional_call(model, (w, buffers), (adv,)), y))
        clean = float(nn.functional.cross_entropy(functional_call(model, (w, buffers), (x,)), y))
    assert res.history[0]["loss"] == pytest.approx(want, rel=1e-6)  # w(t) by one matrix-vector product: rounding
    assert want > clean + 0.01  # and the attack changed it


def test_interrupted_robust_fit_resumes_bit_for_bit(tmp_path) -> None:
    from neuralign.attacks import PGD

    model = small_net(0)
    a, b = params_of(model), params_of(small_net(1))
    kwargs = {"epochs": 3, "generator": 123, "adversarial": PGD(eps=0.1, alpha=0.05, steps=2)}
    torch.manual_seed(42)
    full = fit_curve(model, a, b, unit_box_loader(), **kwargs)

    def interrupt(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    path = tmp_path / "robust.pt"
    torch.manual_seed(42)
    with pytest.raises(KeyboardInterrupt):
        fit_curve(model, a, b, unit_box_loader(), checkpoint=path, callback=interrupt, **kwargs)
    torch.manual_seed(999)
    resumed = fit_curve(model, a, b, unit_box_loader(), checkpoint=path, **kwargs)
    for got, want in zip(resumed.curve.points, full.curve.points):
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    with pytest.raises(CheckpointError, match="belongs to another run: its adversarial is .*'eps': 0.1"):
        fit_curve(model, a, b, unit_box_loader(), checkpoint=path, epochs=3, generator=123)
