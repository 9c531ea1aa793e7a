import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralign.alignment import (
    apply_permutation,
    invert_permutation,
    random_permutation,
    trace_spec,
)
from neuralign.alignment.align import align, weight_similarity
from neuralign.alignment.stats import activation_moments
from neuralign.errors import NonFiniteError, ShapeMismatchError
from neuralign.experiments.models import build_model
from tests.alignment.nets import calibrate_bn, randomize_bn
from tests.conftest import shared_data


def _batches(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.zeros(shape[0], dtype=torch.long)) for _ in range(n)]


def _planted(name, shape, seed=0, **kw):
    a = calibrate_bn(randomize_bn(build_model(name, 10, generator=seed, **kw), seed=seed), _batches(shape, n=2))
    spec = trace_spec(a, torch.randn(*shape))
    p = random_permutation(spec, generator=seed + 1)
    b = build_model(name, 10, generator=seed + 5, **kw)
    b.load_state_dict(apply_permutation(a.state_dict(), spec, p))
    return a, b, spec, p


@pytest.mark.parametrize(
    "name,shape,kw",
    [
        ("mlp", (64, 1, 8, 8), {"in_features": 64, "hidden": (32, 24), "batch_norm": True}),
        ("tinyten", (16, 3, 32, 32), {}),
        ("resnet20", (16, 3, 32, 32), {}),
    ],
)
@pytest.mark.parametrize("method", ["correlation", "l2", "weight"])
def test_planted_permutation_is_recovered_exactly(name, shape, kw, method):
    a, b, spec, p = _planted(name, shape, **kw)
    loader = _batches(shape, n=2)
    res = align(a, b, loader, method=method)
    inverse = invert_permutation(p)
    for g in spec.groups:
        assert torch.equal(res.perms[g], inverse[g]), g
        assert res.correlation_after[g] == pytest.approx(1.0, abs=1e-3), g
        assert res.correlation_before[g] < 0.9
    assert res.fun == pytest.approx(sum(res.objective_after.values()))
    aligned = apply_permutation(b.state_dict(), spec, res.perms)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(aligned[k], v, rtol=0, atol=0)


def test_correlation_matches_direct_computation():
    a = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    b = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    batches = _batches((5, 2, 4, 4), n=4)
    _, moments = activation_moments(a, b, batches)
    (m,) = moments["0"]
    with torch.no_grad():
        xa = torch.cat([F.relu(a[0](x)) for x, _ in batches]).permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
        xb = torch.cat([F.relu(b[0](x)) for x, _ in batches]).permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    za = (xa - xa.mean(0)) / (xa.std(0) + 1e-5)
    zb = (xb - xb.mean(0)) / (xb.std(0) + 1e-5)
    expected = za.T @ zb / xa.shape[0]
    assert m.count == 5 * 4 * 16
    # The activations are float32 and each batch's 80 observations are summed in float32: relative rounding up to
    # gamma_80 = 80 * 2**-24 ~ 4.8e-6 per sum, amplified for the centred moments by E[a^2] / var(a) (~1-2 here), so
    # a correlation (|C| <= 1) is within ~3e-5 of the float64 value; a real error (ddof=1, a missing eps, a wrong
    # mean) is 1e-2 or more. The cross moments of ReLU outputs are sums of non-negative terms: no cancellation.
    np.testing.assert_allclose(m.correlation().numpy(), expected, rtol=0, atol=5e-5)
    np.testing.assert_allclose(m.cross.numpy(), xa.T @ xb / xa.shape[0], rtol=5e-6, atol=0)


def test_moments_survive_a_mean_that_dwarfs_the_spread():
    a = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    b = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        a[0].bias.fill_(1000.0)
        b[0].bias.fill_(3000.0)
    batches = _batches((256, 3), n=4)
    _, moments = activation_moments(a, b, batches)
    (m,) = moments["0"]
    with torch.no_grad():
        xa = torch.cat([F.relu(a[0](x)) for x, _ in batches]).double().numpy()
        xb = torch.cat([F.relu(b[0](x)) for x, _ in batches]).double().numpy()
    expected = np.corrcoef(xa.T, xb.T)[:4, 4:]
    np.testing.assert_allclose(m.correlation().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_tied_groups_sum_the_correlations_of_all_their_activations():
    a = randomize_bn(build_model("resnet20", 10, generator=0))
    b = randomize_bn(build_model("resnet20", 10, generator=1), seed=1)
    batches = _batches((8, 3, 32, 32), n=1)
    spec, moments = activation_moments(a, b, batches)
    assert len(moments["conv1"]) == 4  # the stem and the three block outputs of stage 1
    assert len(moments["layer1.0.conv1"]) == 1
    res = align(a, b, batches, spec=spec)
    torch.testing.assert_close(res.similarity["conv1"], sum(m.correlation() for m in moments["conv1"]))


def test_weight_matching_objective_improves_and_is_consistent():
    a = build_model("tinyten", 10, generator=0)
    b = build_model("tinyten", 10, generator=1)
    res = align(a, b, method="weight", example_input=torch.randn(2, 3, 32, 32), generator=0, tol=0.0)
    assert res.converged and res.status == 0 and res.n_iter >= 2
    for g in res.spec.groups:
        assert res.objective_after[g] >= res.objective_before[g] - 1e-9
    # at convergence every group's assignment is optimal given the others (a coordinate-wise optimum)
    sa, sb = a.state_dict(), b.state_dict()
    for g in res.spec.groups:
        S = weight_similarity(sa, sb, res.spec, res.perms, g, keys={k for k, _ in a.named_parameters()})
        best = align.__globals__["_solve"](S, g)
        chosen = float(S[torch.arange(S.shape[0]), res.perms[g]].sum())
        optimum = float(S[torch.arange(S.shape[0]), best].sum())
        assert chosen == pytest.approx(optimum, rel=1e-9, abs=1e-9)


def test_bad_input_is_rejected_with_clear_messages():
    a = build_model("mlp", 10, in_features=64, hidden=(16,))
    c = build_model("mlp", 10, in_features=64, hidden=(12,))
    batches = _batches((4, 1, 8, 8))
    with pytest.raises(ShapeMismatchError, match=r"`model_b` has parameter `hidden.0.fc.weight` of shape \(12, 64\)"):
        align(a, c, batches)
    b = build_model("mlp", 10, in_features=64, hidden=(16,))
    with pytest.raises(ValueError, match="`loader` yielded no batches"):
        align(a, b, [])
    with pytest.raises(ValueError, match="unknown method 'hungarian'; expected one of"):
        align(a, b, batches, method="hungarian")
    with pytest.raises(ValueError, match="method 'correlation' needs a `loader`"):
        align(a, b)
    with pytest.raises(ValueError, match="needs `spec` or `example_input`"):
        align(a, b, method="weight")
    with pytest.raises(ValueError, match="unknown activation kind 'mid'"):
        align(a, b, batches, activations="mid")
    broken = build_model("mlp", 10, in_features=64, hidden=(16,))
    with torch.no_grad():
        broken.hidden[0].fc.weight[3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="activations of layer `hidden_0_relu` in `model_b` contain NaN"):
        align(a, broken, batches)


def test_models_are_not_modified():
    a = randomize_bn(build_model("resnet20", 10, generator=0))
    b = randomize_bn(build_model("resnet20", 10, generator=1), seed=2)
    a.train()
    before = {k: v.clone() for k, v in b.state_dict().items()}
    align(a, b, _batches((4, 3, 32, 32), n=1))
    assert a.training
    for k, v in b.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def _mnist_mlp(x, y, seed):
    torch.manual_seed(seed)
    model = build_model("mlp", 10, in_features=784, hidden=(128, 128), generator=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _midpoint_loss(a, b_state, x, y):
    mid = {k: (v + b_state[k]) / 2 for k, v in a.state_dict().items()}
    with torch.no_grad():
        return float(F.cross_entropy(torch.func.functional_call(a, mid, (x,)), y))


def test_alignment_lowers_the_midpoint_loss_on_real_mnist():
    data = np.load(shared_data("mnist.npz"))
    x = torch.from_numpy(data["x_train"][:10000]).float().div(255).sub(0.1307).div(0.3081).unsqueeze(1)
    y = torch.from_numpy(data["y_train"][:10000]).long()
    xt = torch.from_numpy(data["x_test"][:2000]).float().div(255).sub(0.1307).div(0.3081).unsqueeze(1)
    yt = torch.from_numpy(data["y_test"][:2000]).long()
    a, b = _mnist_mlp(x, y, 1), _mnist_mlp(x, y, 2)
    loader = [(x[i : i + 500], y[i : i + 500]) for i in range(0, 5000, 500)]
    res = align(a, b, loader)
    aligned = apply_permutation(b.state_dict(), res.spec, res.perms)
    before = _midpoint_loss(a, b.state_dict(), xt, yt)
    after = _midpoint_loss(a, aligned, xt, yt)
    assert after < before
    for g in res.spec.groups:
        assert res.correlation_after[g] > res.correlation_before[g] + 0.2


def test_adversarial_inputs_correlate_each_models_activations_on_its_own_attack():
    from neuralign.attacks import PGD

    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    b = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(5, 2, 4, 4, generator=g), torch.randint(0, 2, (5,), generator=g)) for _ in range(4)]
    pgd = PGD(eps=0.2, alpha=0.1, steps=2, random_start=False)  # deterministic: the replay below is exact
    gen = torch.Generator().manual_seed(3)
    _, moments = activation_moments(a, b, batches, adversarial=pgd, generator=gen)
    (m,) = moments["0"]
    with torch.no_grad():
        xa, xb = (
            torch.cat([F.relu(net[0](pgd.attack(net, x, y, train=False))) for x, y in batches])
            .permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
            for net in (a, b)
        )  # fmt: skip
        clean_a = torch.cat([F.relu(a[0](x)) for x, _ in batches]).permute(0, 2, 3, 1).reshape(-1, 3).double()
    assert not np.allclose(clean_a.numpy(), xa)  # the attack moved A's activations
    # as in the test above, plus an absolute 1e-9 for entries that are exactly 0 in float64 (units that never fire
    # together) and come out at ~1e-12 from the accumulator's rescaled float32 sums
    np.testing.assert_allclose(m.cross.numpy(), xa.T @ xb / xa.shape[0], rtol=5e-6, atol=1e-9)
    with pytest.raises(ValueError, match="unknown inputs 'noisy'"):
        align(a, b, batches, inputs="noisy")
    with pytest.raises(ValueError, match="`adversarial` is given but inputs='clean'"):
        align(a, b, batches, adversarial=pgd)


def test_adversarial_alignment_recovers_a_planted_permutation():
    from neuralign.attacks import PGD

    a, b, spec, p = _planted("mlp", (64, 1, 8, 8), in_features=64, hidden=(32, 24), batch_norm=True)
    g = torch.Generator().manual_seed(1)
    loader = [(torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(2)]
    # with random starts the two models see different examples; B computes A's function, so its attack is A's
    res = align(a, b, loader, inputs="adversarial", adversarial=PGD(eps=0.1, alpha=0.05, steps=2), generator=0)
    inverse = invert_permutation(p)
    for group in spec.groups:
        assert torch.equal(res.perms[group], inverse[group]), group
