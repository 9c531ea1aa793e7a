"""The screen's evaluation of a move through its group's producer and consumer on the moved units only
(neuralign._chain): exact against the whole network, refused wherever its assumptions fail."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from neuralign._chain import Chain
from neuralign.alignment import apply_permutation, identity_permutation, trace_spec
from neuralign.experiments.models import build_model
from tests.alignment.nets import DenseCatNet, ResCatNet, randomize_bn


class BNMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(12, 9), nn.BatchNorm1d(9)
        self.fc2, self.bn2 = nn.Linear(9, 7), nn.BatchNorm1d(7)
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.fc1(x)))
        h = torch.tanh(self.bn2(self.fc2(h)))
        return self.out(h)


class SeqMLP(nn.Module):
    """A transformer's MLP block on ``(batch, tokens, features)``: the units on the last dim, a residual around."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc1, self.fc2, self.head = nn.Linear(4, 6), nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))


class InPlace(nn.Module):
    """In-place activations after every layer (as torchvision's VGG and ResNet; the one after a consumer changed
    the identity's consumer output the chain had kept), an in-place addition (no chain through it) and a head the
    forward never calls (the identity's forward pass was given its parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.act = nn.ReLU(inplace=True)
        self.unused = nn.Linear(3, 2)

    def forward(self, x):
        h = self.act(self.b(self.act(self.a(x))))
        h = self.act(self.c(h))
        h += 1.0
        return self.d(h)


class TwoConsumers(nn.Module):
    """The first layer's output feeds two layers: a move's change reaches the output two ways."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(5, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + self.c(h)


class Between(nn.Module):
    """``layer`` between the producer and the consumer."""

    def __init__(self, layer: nn.Module, width: int = 5) -> None:
        super().__init__()
        self.a, self.mid, self.b = nn.Linear(6, width), layer, nn.Linear(width, 3)

    def forward(self, x):
        return self.b(self.mid(self.a(x)))


class Branching(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h.relu()
        return self.b(h)


def _bn_off(model: nn.Module) -> nn.Module:
    """Batch norm on each batch's statistics (as the screen runs it), in train mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model.train()


# model, its input's shape, and the groups with a chain (every other group must be refused)
MODELS = {
    "tinyten": (lambda: build_model("tinyten", 10, in_channels=3, generator=0), (3, 16, 16),
                {f"features.{i}.conv" for i in range(8)}),
    "rescat": (ResCatNet, (3, 8, 8), {"c1", "fc1"}),
    "densecat": (DenseCatNet, (1, 6, 6), {"fc"}),
    "bn_mlp": (BNMLP, (12,), {"fc1", "fc2"}),
    "seq_mlp": (SeqMLP, (5, 4), {"fc1"}),
    "inplace": (InPlace, (6,), {"a", "b"}),
}


def _moves(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A transposition, a 3-cycle (where n >= 3) and a random permutation of n units."""
    swap = torch.arange(n)
    swap[[0, n - 1]] = swap[[n - 1, 0]]
    out = [swap, torch.randperm(n, generator=gen)]
    if n >= 3:
        out.append(torch.tensor([1, 2, 0, *range(3, n)]))
    return out


def _chains(model: nn.Module, spec, names: list[str]) -> list[tuple[str, int, Chain]]:
    """Each group of ``spec`` that has a chain in ``model``: its name, size and chain."""
    found = [(g, n, Chain.find(model, spec, g, names)) for g, n in spec.sizes.items()]
    return [(g, n, chain) for g, n, chain in found if chain is not None]


def _float64_model(name: str) -> tuple[nn.Module, object, list[str]]:
    """Model ``name`` of MODELS (seeded, batch norm randomised), its spec, in float64 with batch norm on each batch's
    statistics, and its parameters' names."""
    make, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = make()
    randomize_bn(model, seed=1)
    spec = trace_spec(model.eval(), torch.randn(2, *shape))
    model = _bn_off(model.double())
    return model, spec, [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_chain_output_equals_the_whole_network_in_float64(name):
    """For every group with a chain, under a transposition, a 3-cycle and a random permutation, at t = 0.3 on a
    quadratic Bezier curve's point (A's and a random B's weights and a random control point), the chain's output
    equals the whole network's in float64 to 1e-10 (the same sums in another order: rounding of about 1e-15 of
    O(1) terms); the groups found are exactly the expected ones."""
    _, shape, expected = MODELS[name]
    model, spec, names = _float64_model(name)
    gen = torch.Generator().manual_seed(2)
    wa = {n: p.detach().clone() for n, p in model.named_parameters()}
    wb = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in wa.items()}
    theta = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in wa.items()}
    x = torch.randn(8, *shape, generator=gen, dtype=torch.float64)
    t = 0.3

    def point(pb):
        return {k: (1 - t) ** 2 * wa[k] + 2 * t * (1 - t) * theta[k] + t**2 * pb[k] for k in wa}

    identity = point(wb)
    params = spec.restrict(names)  # the running statistics are not parameters
    found = set()
    for g, n, chain in _chains(model, spec, names):
        found.add(g)
        values = chain.identity_values(identity, x)
        changed = 0.0
        for perm in _moves(n, gen):
            moved = apply_permutation(wb, params, {**identity_permutation(params), g: perm})
            w = point(moved)
            whole = functional_call(model, w, (x,))
            units = (perm != torch.arange(n)).nonzero().flatten()
            parts = chain.parts(values, lambda k, axis, w=w, u=units: w[k].index_select(axis, u), identity, units)
            out = chain.output(values, parts, {k: identity[k] for k in chain.tail_names})
            assert (out - whole).abs().max() < 1e-10, (g, perm)
            changed = max(changed, float((functional_call(model, identity, (x,)) - whole).abs().max()))
        assert changed > 1e-6, g  # the moves change the output (a move among dead units may not)
    assert found == expected


class InPlaceInput(nn.Module):
    """The producer's input is changed in place after the producer has read it (a skip path's in-place ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.e, self.a, self.b, self.h = nn.Linear(4, 6), nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.e(x)
        y = self.b(torch.relu(self.a(h)))
        return self.h(y + F.relu(h, inplace=True))


class InPlaceView(nn.Module):
    """The producer's input changed in place after the producer has read it, through a slice (an in-place ReLU
    on ``h[:, :]``) or a view (``h.view(...).mul_(2)``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.e, self.a, self.b, self.h = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 6), nn.Linear(6, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.e(x)
        y = self.b(torch.relu(self.a(h)))
        v = self.act(h[:, :]) if self.how == "slice" else h.view(-1, 6).mul_(2.0)
        return self.h(y + v)


@pytest.mark.parametrize("how", ["slice", "view"])
def test_chain_refused_where_its_input_changes_in_place_through_a_view(how):
    """No chain where the producer's input is changed in place through a slice or a view of it after the producer
    read it (the identity's values, read after the forward pass, would hold the changed input: the chain's output
    was 0.23 off the whole network's)."""
    model = InPlaceView(how).eval()
    spec = trace_spec(model, torch.randn(2, 4))
    assert Chain.find(model, spec, "a", [n for n, _ in model.named_parameters()]) is None


def test_chain_refused_where_its_inputs_change_in_place_or_its_parameters_are_not_all_given():
    """No chain where a value it reads from the identity's forward pass changes in place after it is made (the
    producer's input relu'd in place by a skip path); where ``names`` leaves out a parameter of the chain on the
    group's axis (the producer's bias); or where a batch norm between normalises with running statistics (eval
    mode: the chain normalises with the batch's, as the screen does)."""
    model = InPlaceInput().eval()
    spec = trace_spec(model, torch.randn(2, 4))
    names = [n for n, _ in model.named_parameters()]
    assert Chain.find(model, spec, "a", names) is None and Chain.find(model, spec, "e", names) is None
    mlp = BNMLP().train()
    spec = trace_spec(mlp.eval(), torch.randn(2, 12))
    names = [n for n, _ in mlp.named_parameters()]
    mlp.train()
    assert Chain.find(mlp, spec, "fc1", names) is not None
    assert Chain.find(mlp, spec, "fc1", [n for n in names if n != "fc1.bias"]) is None
    assert Chain.find(mlp.eval(), spec, "fc1", names) is None  # running statistics
    assert Chain.find(_bn_off(mlp).eval(), spec, "fc1", names) is not None  # none: the batch's statistics


@pytest.mark.parametrize(
    "model",
    [TwoConsumers(), Between(nn.LayerNorm(5)), Between(nn.Dropout(0.5)), Between(nn.Softmax(dim=1)), Branching()],
    ids=["two-consumers", "layernorm", "dropout", "softmax", "untraceable"],
)
def test_chain_refused_where_a_move_reaches_the_output_otherwise(model):
    """No chain where the producer's output reaches the output other than through channel-wise layers to one
    consumer (two consumers; a LayerNorm, dropout in train mode (its mask is drawn for every unit at once) or a
    softmax over the units between), or where fx cannot trace the model."""
    x = torch.randn(4, 6)
    model.eval()
    if isinstance(model, Branching):
        from neuralign.alignment import SpecBuilder

        spec = SpecBuilder().group("h", 5).add("a.weight", 0, "h").add("a.bias", 0, "h").add("b.weight", 1, "h").build()
    else:
        spec = trace_spec(model, x)
    names = [n for n, _ in model.named_parameters()]
    model.train()  # dropout on (the others are the same in both modes)
    assert all(Chain.find(model, spec, g, names) is None for g in spec.sizes if g.startswith("a")), spec.summary()


def test_chain_refused_for_grouped_convolutions_and_flatten_over_positions():
    """A grouped convolution's output channels depend on a part of its input channels only, and a flatten over
    several positions gives the consumer one column per channel and position: neither is a chain."""

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 1, groups=2), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            return self.c(self.b(self.a(x).relu()).relu()).mean((2, 3))

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 4, 3), nn.Linear(4 * 4 * 4, 3)

        def forward(self, x):
            return self.b(torch.flatten(self.a(x).relu(), 1))

    for model in (Grouped(), Flat()):
        spec = trace_spec(model.eval(), torch.randn(2, 2, 6, 6))
        names = [n for n, _ in model.named_parameters()]
        chains = {g: Chain.find(model, spec, g, names) for g in spec.sizes}
        assert all(c is None for g, c in chains.items() if g.startswith(("a", "b"))), chains


def _tinyten_context(seed: int, examples: int, batch_size: int, value_batches: int, value_ts: tuple[float, ...]):
    """A curve problem's verification context between two random float64 TinyTens on random 16x16 images (a control
    point near the midpoint), and its images and labels."""
    from neuralign.curves import Bezier
    from neuralign.curves.problem import CurvePermutationProblem
    from neuralign.verification.local import _Context

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(examples, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (examples,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    a = build_model("tinyten", 10, in_channels=3, generator=1).double()
    b = build_model("tinyten", 10, in_channels=3, generator=2).double()
    spec = trace_spec(a, x[:2])
    prob = CurvePermutationProblem(a, a.state_dict(), b.state_dict(), spec, loader, heldout_loader=loader,
                                   value_batches=value_batches, value_ts=value_ts)  # fmt: skip
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    mid = {k: ((v + pb[k]) / 2 + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)).detach()
           for k, v in pa.items()}  # fmt: skip
    curve = Bezier([{k: v.detach() for k, v in pa.items()}, mid, {k: v.detach() for k, v in pb.items()}])
    return _Context(prob, [prob.start_offset(curve)], spec), x, y


def test_screen_through_chains_equals_the_whole_network(tmp_path):
    """The neighbourhood check's screen (both its ways: one move at a time and a chunk under vmap) gives the same
    per-example changes with and without chains on every slice of the screening set, in float64, to 1e-9 (float64
    rounding of per-example cross-entropies of O(1))."""
    from neuralign.verification.local import _Screen, _swap

    ctx, x, y = _tinyten_context(3, 320, 64, 2, (0.5,))
    spec = ctx.spec
    batch = (x[128:], y[128:])
    with_chains, without = _Screen(ctx, batch, (0.25, 0.5)), _Screen(ctx, batch, (0.25, 0.5), chains=False)
    for g, n in spec.sizes.items():
        cands = [_swap(n, i, j) for i, j in [(0, 1), (2, n - 1), (n - 2, n - 1)]]
        for part in range(len(with_chains.slices)):
            whole = without._one_by_one(g, cands, part)
            assert (with_chains._one_by_one(g, cands, part) - whole).abs().max() < 1e-9, (g, part)
            assert (with_chains._batched(g, cands, part) - whole).abs().max() < 1e-9, (g, part)
            assert (without._batched(g, cands, part) - whole).abs().max() < 1e-9, (g, part)
        assert ctx.problem.chain(g) is not None


def test_the_batched_screen_does_not_pass_on_torchs_warning_of_a_missing_batching_rule():
    """TinyTen's last group reaches the classifier through ``adaptive_avg_pool2d``, which vmap cannot batch on a
    channels-last input (torch warns of a performance drop, once per process, and loops over the candidates for that
    operation): the screen, whose race times that loop, does not pass the warning on to the user."""
    import warnings

    from neuralign.verification.local import _Screen, _swap

    ctx, x, y = _tinyten_context(3, 192, 64, 1, (0.5,))
    g, n = list(ctx.spec.sizes.items())[-1]
    before = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch's once-per-process warnings every time, whatever ran before in this process
    try:
        with warnings.catch_warnings(record=True) as control:
            warnings.simplefilter("always")
            inputs = torch.randn(2, 4, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
            weights = torch.randn(3, 5, 4, 3, 3, dtype=torch.float64)  # 3 candidates' convolutions
            torch.func.vmap(lambda w: nn.functional.adaptive_avg_pool2d(nn.functional.conv2d(inputs, w), 1))(weights)
        if not any("batching rule" in str(w.message) for w in control):
            pytest.skip("this torch batches adaptive_avg_pool2d on channels-last inputs: no warning to pass on")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _Screen(ctx, (x[64:], y[64:]), (0.5,))._batched(g, [_swap(n, 0, 1), _swap(n, 2, 3)], 0)
    finally:
        torch.set_warn_always(before)
    assert ctx.problem.chain(g) is not None
    assert not [str(w.message) for w in caught if "batching rule" in str(w.message)]


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_chain_on_torchvision_models(arch):
    """Models we did not write (torchvision, random weights, 32x32 inputs): chains are found for exactly the groups
    whose producer reaches one consumer through batch norm, in-place ReLUs and pooling (each ResNet block's inner
    group; every VGG feature group, the last through its pooling to 1x1 and flatten into the classifier, and the
    classifier's group through its dropout switched off, as the curve problem runs it), every other group is
    refused (the residual streams), and the chain's output
    equals the whole network's in float64 for a transposition of each (1e-9 of the output's scale: float64
    rounding)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    if arch == "vgg11_bn":  # a small head (the 25,088 x 4,096 classifier costs seconds in float64), pooled to 1x1
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(nn.Linear(512, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    spec = trace_spec(model.eval(), x[:2].float())
    model = _bn_off(model.double())
    for m in model.modules():  # dropout switched off, as the curve problem runs it (its masks are random)
        if isinstance(m, nn.Dropout):
            m.eval()
    names = [n for n, _ in model.named_parameters()]
    identity = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(4)
    other = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) * p.std().clamp_min(1e-2)
             for n, p in identity.items()}  # fmt: skip
    params = spec.restrict(names)
    found = set()
    for g, n, chain in _chains(model, spec, names):
        found.add(g)
        perm = torch.arange(n)
        perm[[1, n - 1]] = perm[[n - 1, 1]]
        moved = apply_permutation(other, params, {**identity_permutation(params), g: perm})
        w = {k: 0.5 * identity[k] + 0.5 * moved[k] for k in identity}
        base = {k: 0.5 * identity[k] + 0.5 * other[k] for k in identity}
        values = chain.identity_values(base, x)
        units = torch.tensor([1, n - 1])
        parts = chain.parts(values, lambda k, axis, w=w, u=units: w[k].index_select(axis, u), base, units)
        out = chain.output(values, parts, {k: base[k] for k in chain.tail_names})
        whole = functional_call(model, w, (x,))
        assert (out - whole).abs().max() <= 1e-9 * whole.abs().max().clamp_min(1.0), g
    if arch == "resnet18":
        expected = {g for g in spec.sizes if g.endswith(".conv1")}
    else:
        expected = {g for g in spec.sizes if g.startswith("features.")} | {"classifier.0"}
    assert found == expected, sorted(found ^ expected)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_linearised_changes_equal_the_gradient_against_the_exact_consumer_change(name):
    """``Chain.linearised`` (every transposition at once, from the producer's outputs with A's and B's rows and the
    consumer's adjoint) equals, for each transposition checked (every one of a group of up to 9 units; of a larger
    group the first, the last and 38 drawn) and each example, the inner product of a random cotangent with the
    exact change of the consumer's output under it (``Chain.consumer_output``, itself exact against the whole
    network above), in float64 to 1e-10 of the products' scale (rounding of sums of O(100) terms of O(1));
    and the same with the pairs taken one unit row per block, and summed over the batch. On a curve point
    ``w + c (B - B_identity)`` with B's weight ``c = 0.3``: a transposition gives unit i B's entries of unit j."""
    shape = MODELS[name][1]
    model, spec, names = _float64_model(name)
    gen = torch.Generator().manual_seed(5)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    wb = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in w0.items()}
    x = torch.randn(8, *shape, generator=gen, dtype=torch.float64)
    c = 0.3
    params = spec.restrict(names)
    checked = 0
    for g, n, chain in _chains(model, spec, names):
        values = chain.identity_values(w0, x)
        out = values[chain.consumer_node]
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        est = chain.linearised(values, grad, w0, wb, c)
        rowwise = chain.linearised(values, grad, w0, wb, c, block=1)
        summed = chain.linearised(values, grad, w0, wb, c, per_example=False)
        assert est.shape == (8, n, n) and est.dtype == torch.float64 and summed.shape == (n, n)
        assert (est - rowwise).abs().max() < 1e-12
        assert (est.sum(0) - summed).abs().max() < 1e-10 * est.abs().sum(0).max()
        scale = 1.0
        pairs = torch.triu_indices(n, n, offset=1).t()
        if len(pairs) > 40:  # every pair of a small group; 40 drawn of a large one, the first and the last among them
            pairs = torch.cat([pairs[[0, -1]], pairs[torch.randperm(len(pairs), generator=gen)[:38]]])
        for i, j in pairs.tolist():
            perm = torch.arange(n)
            perm[[i, j]] = perm[[j, i]]
            moved = apply_permutation(wb, params, {**identity_permutation(params), g: perm})
            w = {k: w0[k] + c * (moved[k] - wb[k]) for k in w0}
            units = torch.tensor([i, j])
            parts = chain.parts(values, lambda k, axis, w=w, u=units: w[k].index_select(axis, u), w0, units)
            product = grad * (chain.consumer_output(values, parts) - out)
            exact = product.flatten(1).sum(1)
            scale = max(scale, float(product.abs().flatten(1).sum(1).max()))
            assert (est[:, i, j] - exact).abs().max() < 1e-10 * scale, (g, i, j)
            assert torch.equal(est[:, i, j], est[:, j, i])
        assert float(est.diagonal(dim1=1, dim2=2).abs().max()) == 0.0
        checked += 1
    assert checked == len(MODELS[name][2])


def test_heldout_scoring_through_chains_equals_the_whole_network():
    """``_Context.losses`` scores a move of one group with a chain through it (the held-out batches' identity
    values kept per group): per example the same data term as the whole network (the path it takes at other
    times) in float64 to 1e-12 (rounding of cross-entropies of O(1)), for a transposition and a 3-cycle of every
    group of TinyTen, on all held-out batches and on parts of them (the sequential test's looks; every other
    batch), with the same weight-decay term to 1e-12 of it (the chain's sums its change on the moved units)."""
    from neuralign.verification.local import _swap

    ctx, _, _ = _tinyten_context(6, 192, 48, 4, (0.25, 0.75))
    spec, prob = ctx.spec, ctx.problem
    for g, n in spec.sizes.items():
        cycle = torch.tensor([1, 2, 0, *range(3, n)])
        for move in ({g: _swap(n, 0, n - 1)}, {g: cycle}):
            for batches in (slice(None), slice(1, 3), slice(0, 4, 2)):
                chained, penalty = ctx.losses(move, batches=batches)
                whole, whole_penalty = ctx.losses(move, ts=prob.value_ts, batches=batches)  # no chain with ts given
                assert chained.shape == whole.shape and (chained - whole).abs().max() < 1e-12, (g, move, batches)
                assert whole_penalty > 0 and abs(penalty - whole_penalty) <= 1e-12 * whole_penalty
                assert (whole - ctx.losses({}, batches=batches)[0]).abs().max() > 1e-6  # the move changes it
        assert prob.chain(g) is not None


@pytest.mark.parametrize("decay", [0.0, 0.05])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_problem_move_values_through_chains_equal_the_whole_network(name, decay):
    """``CurvePermutationProblem.move_values`` (PAM's swap search scores its trial moves with it) evaluates a move
    of one group with a chain through it, any other move on the whole network: for every group, a transposition
    and a 3-cycle of a random current permutation, and a move of two groups at once, the same per-batch objective
    as ``batch_values`` with the moved permutations' matrices, in float64 to 1e-10 (the same sums in another order:
    rounding of about 1e-15 of the O(1) cross-entropies and weight-decay terms), at a random curve offset with
    weight decay on and off; the groups with a chain are exactly the expected ones."""
    from neuralign.curves.problem import CurvePermutationProblem
    from neuralign.optim import perm_to_matrix

    _, shape, expected = MODELS[name]
    model, spec, names = _float64_model(name)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(24, *shape, generator=gen, dtype=torch.float64)
    out = model(x[:2])
    y = torch.randint(0, out.shape[-1], (24, *out.shape[1:-1]), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    wb = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    prob = CurvePermutationProblem(model, dict(model.named_parameters()), wb, spec, loader, weight_decay=decay,
                                   value_batches=3, value_ts=(0.25, 0.75))  # fmt: skip
    offset = [0.1 * torch.randn(sum(prob.numels), generator=gen, dtype=torch.float64)]
    perms = {g: torch.randperm(n, generator=gen) for g, n in spec.sizes.items()}
    moves = []
    for g, n in spec.sizes.items():
        if n >= 3:
            moves += [{g: perms[g][torch.tensor([n - 1, *range(1, n - 1), 0])]},
                      {g: perms[g][torch.tensor([1, 2, 0, *range(3, n)])]}]  # fmt: skip
    first, second = list(spec.sizes)[:2]
    moves.append({first: perms[first].flip(0), second: perms[second].flip(0)})
    got = prob.move_values(offset, perms, moves)
    assert {g for g in spec.sizes if prob.chain(g) is not None} == expected
    for move, values in zip(moves, got):
        mats = {g: perm_to_matrix(p, dtype=torch.float64) for g, p in {**perms, **move}.items()}
        whole = prob.batch_values(offset, mats)
        assert values.shape == whole.shape == (3,) and (values - whole).abs().max() < 1e-10, move
        assert (whole - prob.batch_values(offset, {g: perm_to_matrix(p, dtype=torch.float64)
                                                  for g, p in perms.items()})).abs().max() > 1e-8  # it moves


def test_move_costs_keeps_the_values_it_scores_for_the_held_out_test():
    """``_Context.move_costs`` scores its move on the first held-out batch to time it and keeps that batch's data
    term for ``losses``, which uses it once: the move's data term on every batch is then the whole network's to
    1e-12 (float64, as above), and a second call (nothing kept) computes the same."""
    from neuralign.verification.local import _swap

    ctx, _, _ = _tinyten_context(7, 192, 48, 4, (0.25, 0.75))
    prob = ctx.problem
    for g, n in list(prob.spec.sizes.items())[:3]:
        move = {g: _swap(n, 1, n - 2)}
        first, later = ctx.move_costs(move)
        assert first >= later > 0 and len(ctx._kept) == 1
        kept, _ = ctx.losses(move)
        assert not ctx._kept
        whole, _ = ctx.losses(move, ts=prob.value_ts)
        assert (kept - whole).abs().max() < 1e-12 and torch.equal(kept, ctx.losses(move)[0])


@pytest.mark.parametrize("budget", [0, 1 << 40])
def test_screen_keeps_identity_values_of_other_groups_within_its_budget(monkeypatch, budget):
    """A screen keeps the identity's values up to a chain: those of the group last asked for always (its moves run
    slice after slice: none is recomputed within the group, even over the budget), other groups' while all kept
    values fit ``_KEPT_VALUES_BYTES`` (so that a later check finds them): with no budget every group's values are
    computed again on a second pass, with room for all none are; the values kept are the ones computed."""
    import neuralign.verification.local as local

    monkeypatch.setattr(local, "_KEPT_VALUES_BYTES", budget)
    calls = []
    original = Chain.identity_values
    monkeypatch.setattr(Chain, "identity_values", lambda self, *a: calls.append(1) or original(self, *a))
    ctx, _, _ = _tinyten_context(8, 96, 32, 3, (0.5,))
    prob = ctx.problem
    screen = local._Screen(ctx, list(prob.value_set), prob.value_ts)
    groups = list(prob.spec.sizes)
    first = {}
    for g in groups:
        for part in (0, 1, 2, 0, 1, 2):
            first.setdefault((g, part), screen._identity_values(prob.chain(g), g, part, 0))
    assert len(calls) == 3 * len(groups)  # each group's slices once
    for g in groups:
        for part in range(3):
            again = screen._identity_values(prob.chain(g), g, part, 0)
            assert all(torch.equal(again[n], first[(g, part)][n]) for n in again)
    assert len(calls) == 3 * len(groups) * (2 if budget == 0 else 1)


def _dropout_problem(weight_decay: float = 0.0):
    """A curve problem on a float64 MLP with dropout between its layers (two held-out batches)."""
    from neuralign.curves.problem import CurvePermutationProblem

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(0.5), nn.Linear(10, 8), nn.ReLU(),
                          nn.Dropout(0.5), nn.Linear(8, 3)).double()  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen)
    spec = trace_spec(model, x[:2])
    wb = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    prob = CurvePermutationProblem(model, dict(model.named_parameters()), wb, spec, loader, value_batches=2,
                                   weight_decay=weight_decay)  # fmt: skip
    return prob, [0.1 * torch.randn(sum(prob.numels), generator=gen, dtype=torch.float64)]


def test_problem_objective_is_deterministic_with_dropout_layers():
    """The problem switches its model's dropout layers off: the monitored value is the same whatever torch's
    global random state (it changed with it before), and a move through a chain equals the whole network's."""
    from neuralign.optim import perm_to_matrix

    prob, offset = _dropout_problem()
    perms = {g: torch.randperm(n, generator=torch.Generator().manual_seed(2)) for g, n in prob.spec.sizes.items()}
    mats = {g: perm_to_matrix(p, dtype=torch.float64) for g, p in perms.items()}
    values = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        values.append(prob.batch_values(offset, mats))
    assert torch.equal(values[0], values[1])
    g, n = next(iter(prob.spec.sizes.items()))
    move = {g: perms[g][torch.tensor([n - 1, *range(1, n - 1), 0])]}
    assert prob.chain(g) is not None  # the dropout between its layers switched off: the identity
    assert Chain.find(copy.deepcopy(prob.untracked_model).train(), prob.spec, g, prob.names) is None  # on: none
    whole = prob.batch_values(offset, {**mats, g: perm_to_matrix(move[g], dtype=torch.float64)})
    assert (prob.move_values(offset, perms, [move])[0] - whole).abs().max() < 1e-12


def test_problem_move_values_refuses_moves_that_are_not_permutations_of_its_groups():
    """Each move is checked as ``perms`` is, naming the move and the group, whichever way it would be scored."""
    prob, offset = _dropout_problem()
    perms = {g: torch.arange(n) for g, n in prob.spec.sizes.items()}
    g, n = next(iter(prob.spec.sizes.items()))
    with pytest.raises(ValueError, match=rf"`moves\[1\]` group `{g}` is not a permutation"):
        prob.move_values(offset, perms, [{}, {g: torch.zeros(n, dtype=torch.int64)}])
    with pytest.raises(ValueError, match=rf"`moves\[0\]` group `{g}` has length"):
        prob.move_values(offset, perms, [{g: torch.arange(n - 1)}])
    with pytest.raises(ValueError, match=r"`moves\[0\]` has groups \['nope'\]"):
        prob.move_values(offset, perms, [{"nope": torch.arange(2)}])
    with pytest.raises(TypeError, match=rf"`moves\[0\]` group `{g}`: expected an int64 tensor, got list"):
        prob.move_values(offset, perms, [{g: list(range(n))}])
    with pytest.raises(TypeError, match=r"`moves` must be a sequence of dicts"):
        prob.move_values(offset, perms, {g: torch.arange(n)})
    with pytest.raises(ValueError, match=rf"`perms` group `{g}` is not a permutation"):
        prob.move_values(offset, {**perms, g: torch.zeros(n, dtype=torch.int64)}, [])
