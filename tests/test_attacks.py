"""L-infinity PGD: feasibility, the analytic worst case of a linear classifier, attacks at given weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from neuralign.attacks import PGD, pgd_attack


def _conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


@pytest.mark.parametrize("train", [True, False])
def test_result_stays_in_the_eps_ball_and_in_the_unit_box(train):
    net = _conv_net()
    x, y = torch.rand(16, 1, 6, 6), torch.randint(0, 3, (16,))
    x[:4] = 0.0  # inputs on the box's faces: the ball must be cut by [0, 1]
    x[4:8] = 1.0
    eps = 8 / 255
    adv = pgd_attack(net, x, y, eps=eps, alpha=2 / 255, steps=5, train=train, generator=0)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    # the projection is computed as min(max(z, x - eps), x + eps): one rounding of x +- eps in float32
    assert float((adv - x).abs().max()) <= eps * (1 + 1e-6)
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float((adv - x).abs().max()) > eps / 2  # it moved


def test_eps_zero_returns_the_clean_inputs():
    net = _conv_net()
    x, y = torch.rand(8, 1, 6, 6), torch.randint(0, 3, (8,))
    for random_start in (True, False):
        adv = PGD(eps=0.0, alpha=0.1, steps=3, random_start=random_start).attack(net, x, y, train=True)
        assert torch.equal(adv, x)


@pytest.mark.parametrize("random_start, alpha_over_eps", [(False, 1.0), (True, 2.0)])
def test_one_step_on_a_linear_binary_classifier_is_the_analytic_worst_case(random_start, alpha_over_eps):
    # logits (w0 . x + b0, w1 . x + b1): the cross-entropy of class y grows fastest along -y_pm sign(w1 - w0), with
    # y_pm = +1 for class 1 and -1 for class 0, whatever the point; so one signed step of size >= eps (from any
    # start in the ball when alpha >= 2 eps) lands on the ball's worst corner x - eps y_pm sign(v), clamped to [0, 1]
    gen = torch.Generator().manual_seed(3)
    net = nn.Linear(12, 2).double()
    with torch.no_grad():
        net.weight.copy_(torch.randn(2, 12, generator=gen, dtype=torch.float64) * 0.3)
    x = torch.rand(32, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (32,), generator=gen)
    eps = 0.1
    adv = pgd_attack(
        net, x, y, eps=eps, alpha=alpha_over_eps * eps, steps=1, random_start=random_start, train=False, generator=1
    )
    v = (net.weight[1] - net.weight[0]).detach()
    y_pm = (2 * y - 1).to(torch.float64)[:, None]
    expected = (x - eps * y_pm * v.sign()).clamp(0.0, 1.0)
    torch.testing.assert_close(adv, expected, rtol=0.0, atol=1e-15)  # a few float64 roundings of x +- eps


def _train_small(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def test_raises_the_loss_of_a_trained_network():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(256, 10, generator=gen)
    y = (x[:, :5].sum(1) > x[:, 5:].sum(1)).long()
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    _train_small(net, x, y)
    net.eval()
    adv = PGD(eps=0.1, alpha=0.025, steps=10).attack(net, x, y, train=False, generator=0)
    random = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * 0.1).clamp(0, 1)
    with torch.no_grad():
        clean, robust, noisy = (float(nn.functional.cross_entropy(net(v), y)) for v in (x, adv, random))
    assert clean < 0.35  # trained
    assert robust > 2 * clean and robust > 2 * noisy  # worse than random noise of the same size


def test_attacks_the_given_weights_not_the_modules_own():
    net = _conv_net()
    other = _conv_net()
    params = {k: v.detach().clone() for k, v in other.named_parameters()}
    buffers = {k: v.clone() for k, v in other.named_buffers()}
    before = copy.deepcopy(net.state_dict())
    x, y = torch.rand(8, 1, 6, 6), torch.randint(0, 3, (8,))
    at_params = pgd_attack(net, x, y, train=True, params=params, buffers=buffers, generator=0)
    at_other = pgd_attack(other, x, y, train=True, generator=0)
    at_own = pgd_attack(net, x, y, train=True, generator=0)
    assert torch.equal(at_params, at_other)
    assert not torch.equal(at_params, at_own)
    # neither the module nor the given buffers changed (train-mode batch norm would write running statistics)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in other.named_buffers():
        assert torch.equal(buffers[k], v), k
    assert all(p.grad is None for p in net.parameters())
    assert net.training  # mode restored (it was in train mode)
    net.eval()
    pgd_attack(net, x, y, train=True, generator=0)
    assert not any(m.training for m in net.modules())


def test_mode_changes_the_attack_and_a_seed_fixes_it():
    net = _conv_net()
    x, y = torch.rand(8, 1, 6, 6), torch.randint(0, 3, (8,))
    a = pgd_attack(net, x, y, train=True, generator=5)
    assert torch.equal(a, pgd_attack(net, x, y, train=True, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(a, pgd_attack(net, x, y, train=False, generator=5))
    assert not torch.equal(a, pgd_attack(net, x, y, train=True, generator=6))


def test_bad_inputs_are_refused():
    net = nn.Linear(3, 2)
    x, y = torch.rand(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"`x` must lie in \[0, 1\].*normalisation inside the model"):
        pgd_attack(net, x * 3 - 1, y, train=False)
    with pytest.raises(ValueError, match=r"^`eps` must be a finite number >= 0, got -0.1$"):
        PGD(eps=-0.1)
    with pytest.raises(ValueError, match=r"^`alpha` must be a finite number > 0, got 0$"):
        PGD(alpha=0)
    with pytest.raises(TypeError, match=r"^`steps` must be an int >= 0, got float 1.5$"):
        PGD(steps=1.5)
    with pytest.raises(ValueError, match=r"^`eps` must be a finite number >= 0, got nan$"):
        PGD(eps=float("nan"))
    with pytest.raises(TypeError, match="`train` must be a bool"):
        pgd_attack(net, x, y, train=None)
    with pytest.raises(ValueError, match="`x` has 4 examples but `y` has 3"):
        pgd_attack(net, x, y[:3], train=False)
    with pytest.raises(TypeError, match="`y` must be an integer Tensor"):
        pgd_attack(net, x, y.float(), train=False)


def test_agrees_with_torchattacks():
    torchattacks = pytest.importorskip(
        "torchattacks",
        reason="torchattacks (the field's reference PGD) is not installed; it pins requests~=2.25.1, so it is not "
        "a dependency of neuralign: `pip install --no-deps torchattacks` to run this cross-check",
    )
    # float64, no random start (torchattacks draws its start from the global RNG with another formula): the two
    # implementations differ only in how they round the projection, a few ulp of 1.0
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 5)).double()
    x = torch.rand(16, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (16,))
    ours = pgd_attack(net, x, y, eps=8 / 255, alpha=2 / 255, steps=7, random_start=False, train=False)
    ref = torchattacks.PGD(net, eps=8 / 255, alpha=2 / 255, steps=7, random_start=False)(x, y)
    torch.testing.assert_close(ours, ref, rtol=0.0, atol=1e-12)


def _dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def test_train_mode_dropout_repeats_with_the_seed_and_leaves_the_global_rng_alone():
    net = _dropout_mlp()
    x, y = torch.rand(8, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    torch.manual_seed(3)
    a = pgd_attack(net, x, y, eps=0.2, alpha=0.05, steps=4, train=True, generator=7)
    after_a = torch.get_rng_state()
    torch.manual_seed(4)  # another global state: the attack must not depend on it
    b = pgd_attack(net, x, y, eps=0.2, alpha=0.05, steps=4, train=True, generator=7)
    torch.testing.assert_close(a, b, rtol=0.0, atol=0.0)
    torch.manual_seed(3)
    assert torch.equal(after_a, torch.get_rng_state())  # the global RNG did not advance
    # without a random start the generator still seeds the dropout masks
    c = pgd_attack(net, x, y, eps=0.2, alpha=0.05, steps=4, random_start=False, train=True, generator=7)
    d = pgd_attack(net, x, y, eps=0.2, alpha=0.05, steps=4, random_start=False, train=True, generator=7)
    torch.testing.assert_close(c, d, rtol=0.0, atol=0.0)
    assert not torch.equal(c, pgd_attack(net, x, y, eps=0.2, alpha=0.05, steps=4, random_start=False, train=True,
                                         generator=8))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_label_dtype_is_used_as_int64(dtype):
    net = nn.Linear(3, 2)
    x, y = torch.rand(4, 3), torch.tensor([0, 1, 1, 0])
    ref = pgd_attack(net, x, y, eps=0.1, alpha=0.05, steps=2, train=False, generator=0)
    torch.testing.assert_close(
        pgd_attack(net, x, y.to(dtype), eps=0.1, alpha=0.05, steps=2, train=False, generator=0), ref, rtol=0, atol=0
    )


def test_bool_labels_and_non_finite_inputs_are_refused():
    net = nn.Linear(3, 2)
    x, y = torch.rand(4, 3), torch.tensor([0, 1, 1, 0])
    with pytest.raises(TypeError, match="`y` must be an integer Tensor of class labels, got torch.bool"):
        pgd_attack(net, x, y.bool(), train=False)
    for bad in (float("nan"), float("inf")):
        x_bad = x.clone()
        x_bad[1, 2] = bad
        with pytest.raises(ValueError, match="`x` must be finite inputs in \\[0, 1\\], got NaN or infinite values"):
            pgd_attack(net, x_bad, y, train=False)


def test_torchvision_normalize_in_front_of_the_model_is_attacked_on_raw_images():
    transforms = pytest.importorskip("torchvision.transforms", reason="torchvision is not installed")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    net = nn.Sequential(transforms.Normalize(mean, std), body)
    x, y = torch.rand(6, 3, 5, 5, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 0, 1, 2])
    adv = pgd_attack(net, x, y, eps=0.1, alpha=0.05, steps=3, train=False, generator=0)
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6 and float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    # the same attack on the bare body with the standardisation written out: identical up to rounding
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    class Standardise(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return (z - m) / s

    ref = pgd_attack(nn.Sequential(Standardise(), body), x, y, eps=0.1, alpha=0.05, steps=3, train=False,
                     generator=0)  # fmt: skip
    torch.testing.assert_close(adv, ref, rtol=0.0, atol=1e-6)
    with pytest.raises(ValueError, match=r"nn.Sequential\(torchvision.transforms.Normalize\(mean, std\), model\)"):
        pgd_attack(net, transforms.Normalize(mean, std)(x), y, train=False)
