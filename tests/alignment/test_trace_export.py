"""The torch.export front end of the tracer (issue 21): models torch.fx cannot trace (control flow on shapes) are
exported on the example input and proven by the same default-deny rules.

Every traced spec is checked by ``check_equivalence`` in float64 (train and eval mode, random permutations); the
same spec with its permuted groups ignored would leave the check nothing to fail on, so each test also asserts which
groups were found.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralign.alignment import apply_permutation, invert_permutation, random_permutation, trace_spec
from neuralign.alignment.align import align
from neuralign.errors import SpecError
from neuralign.verification import check_equivalence
from tests.alignment.nets import ResCatNet, randomize_bn


class SamePadNet(nn.Module):
    """TensorFlow-style "same" padding computed from ``x.shape`` and a branch on a spatial size (timm's
    ``Conv2dSame`` pattern): torch.fx cannot trace either."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, groups=3)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)
        self.out = nn.Linear(4, 2)

    @staticmethod
    def pad_same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])

    def forward(self, x):
        h = F.silu(self.bn1(self.c1(self.pad_same(x, 3, 2))))
        if h.shape[-1] > 3:  # control flow on a shape
            h = h[:, :, 1:, 1:]
        h = F.relu(h + self.bn2(self.c2(self.pad_same(h, 3, 1))))
        return self.out(torch.tanh(self.fc(h.mean((2, 3)))))


class ShapeAttention(nn.Module):
    """Hand-written multi-head attention with fused qkv whose number of heads is read from the input's width."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)
        self.heads = heads

    def forward(self, x):
        h = self.embed(x)
        b, n, d = h.shape
        heads = self.heads if d % self.heads == 0 else 1  # a Python branch on a traced size
        q, k, v = self.qkv(self.norm(h)).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1) @ v
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, d))
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))


class UnmappedOpNet(nn.Module):
    """An operation torch.export writes as an ATen op the tracer has no mapping for (``special_erfcx``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc1(x)
        if h.shape[0] > 0:
            h = torch.special.erfcx(h)
        return self.fc2(h)


def wrapped_attention(x, qkv_weight, proj_weight, proj_bias, heads: int):
    """Multi-head attention in one function that torch.fx keeps as a leaf (``torch.fx.wrap``, as torchvision does
    with ``shifted_window_attention``): the rules do not know it, torch.export records what it does."""
    b, n, d = x.shape
    q, k, v = F.linear(x, qkv_weight).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    a = F.scaled_dot_product_attention(q, k, v)
    return F.linear(a.transpose(1, 2).reshape(b, n, d), proj_weight, proj_bias)


torch.fx.wrap("wrapped_attention")


class LeafAttention(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + wrapped_attention(h, self.qkv.weight, self.proj.weight, self.proj.bias, 4)
        return self.head(F.relu(self.fc(h)).mean(1))


class UnfoldNet(nn.Module):
    """MobileViT's unfolding of a feature map into patches (channels merged between the batch axis and the patch
    rows, then moved last), a linear layer over the channels of every patch, and the folding back."""

    def __init__(self, c: int = 6, patch: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.mix = nn.Linear(c, c)
        self.out = nn.Conv2d(c, 4, 1)
        self.patch = patch

    def forward(self, x):
        h = F.relu(self.conv(x))
        b, c, hh, ww = h.shape
        p, nh, nw = self.patch, hh // self.patch, ww // self.patch
        u = h.reshape(b * c * nh, p, nw, p).transpose(1, 2)
        u = u.reshape(b, c, nh * nw, p * p).transpose(1, 3).reshape(b * p * p, nh * nw, c)
        u = F.gelu(self.mix(u))
        f = u.reshape(b, p * p, nh * nw, c).transpose(1, 3).reshape(b * c * nh, nw, p, p)
        f = f.transpose(1, 2).reshape(b, c, hh, ww)
        return self.out(f + h).mean((2, 3))


def _image(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 12, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _assert_exact(model: nn.Module, spec, x, seed: int) -> None:
    """Random permutations keep the function, in float64, in train and eval mode (batch statistics included)."""
    res = check_equivalence(model, spec, x, trials=2, generator=seed)
    assert res.verdict == "pass", res.message
    assert res.max_diff_train is not None and res.max_diff_eval is not None


def test_fx_cannot_trace_control_flow_on_shapes():
    model = SamePadNet().double()
    with pytest.raises(SpecError, match=r"torch\.fx could not trace SamePadNet"):
        trace_spec(model, _image(0), tracer="fx")


@pytest.mark.parametrize("tracer", ["auto", "export"])
def test_same_padding_and_shape_branch_traced_through_export_exactly(tracer):
    torch.manual_seed(0)
    model = randomize_bn(SamePadNet().double(), seed=1)
    x = _image(2)
    spec = trace_spec(model, x, tracer=tracer)
    # c1's 6 channels move as 3 blocks of 2 (the grouped c2 reads them in blocks), tied to c2's output by the
    # residual addition; fc's 4 units are free; the output stays put
    assert spec.sizes == {"c1": 3, "fc": 4}
    assert ("c2.weight", 0) in spec.perm_to_axes["c1"] and ("bn2.running_var", 0) in spec.perm_to_axes["c1"]
    for seed in (3, 4):
        _assert_exact(model, spec, x, seed)


def test_attention_heads_traced_through_export_exactly():
    torch.manual_seed(0)
    model = ShapeAttention().double()
    x = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(SpecError, match="torch.fx could not trace"):
        trace_spec(model, x, tracer="fx")
    spec = trace_spec(model, x)
    heads = {g: (h.count, h.size) for g, h in spec.heads.items()}
    assert sorted(heads.values()) == [(4, 4), (4, 4)]  # query/key and value/output rows: 4 heads of 4
    assert len({h.heads for h in spec.heads.values()}) == 1  # one head permutation shared by both
    assert spec.sizes["embed"] == 16 and spec.sizes["fc1"] == 32
    for seed in (5, 6):
        _assert_exact(model, spec, x, seed)


def test_fx_leaf_is_traced_inside_through_export():
    torch.manual_seed(0)
    model = LeafAttention().double()
    x = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(SpecError, match=r"fx node `wrapped_attention` .* not a known permutation-equivariant"):
        trace_spec(model, x, tracer="fx")
    spec = trace_spec(model, x)  # auto: the fx graph is refused at the leaf, the exported one is proven
    assert sorted((h.count, h.size) for h in spec.heads.values()) == [(4, 4), (4, 4)]
    assert spec.sizes["embed"] == 16 and spec.sizes["fc"] == 8
    assert all(t.node.startswith("export_") for ts in spec.taps.values() for t in ts)
    for seed in (7, 8):
        _assert_exact(model, spec, x, seed)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_channels_unfolded_with_the_batch_axis_are_traced_exactly(tracer):
    torch.manual_seed(0)
    model = UnfoldNet().double()
    x = _image(9, batch=3)[:, :, :8, :8]
    spec = trace_spec(model, x, tracer=tracer)
    # the conv's 6 channels ride through the unfolding into the linear layer's input and back (tied by the residual
    # addition to the mix's output, so one group); the output conv's channels reach the output
    assert spec.sizes == {"conv": 6}
    assert ("mix.weight", 0) in spec.perm_to_axes["conv"] and ("mix.weight", 1) in spec.perm_to_axes["conv"]
    for seed in (10, 11):
        _assert_exact(model, spec, x, seed)


@pytest.mark.parametrize(
    "build,shape",
    [(lambda: randomize_bn(ResCatNet(), seed=0), (2, 3, 8, 8)), (lambda: ShapeAttention(heads=2), (2, 6, 5))],
    ids=["ResCatNet", "attention"],
)
def test_fx_traceable_models_give_the_same_spec_either_way(build, shape):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    try:
        fx = trace_spec(model, x, tracer="fx")
    except SpecError:  # ShapeAttention branches on a size: fx cannot trace it, so compare a fixed-head copy
        model.forward = _fixed_heads(model)
        fx = trace_spec(model, x, tracer="fx")
    ex = trace_spec(model, x, tracer="export")
    assert fx.sizes == ex.sizes and fx.heads == ex.heads
    assert {g: sorted(a) for g, a in fx.perm_to_axes.items()} == {g: sorted(a) for g, a in ex.perm_to_axes.items()}
    kinds = lambda s: {g: sorted((t.axis, t.kind) for t in ts) for g, ts in s.taps.items()}  # noqa: E731
    assert kinds(fx) == kinds(ex)  # the same activations are read (node names differ between the graphs)


def _fixed_heads(model: ShapeAttention):
    class Fixed(ShapeAttention):
        def forward(self, x):
            h = self.embed(x)
            b, n, d = h.shape
            q, k, v = self.qkv(self.norm(h)).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
            a = torch.softmax(q @ k.transpose(-2, -1) * 8**-0.5, dim=-1) @ v
            h = h + self.proj(a.transpose(1, 2).reshape(b, n, d))
            h = h + self.fc2(F.gelu(self.fc1(h)))
            return self.head(h.mean(1))

    model.__class__ = Fixed
    return model.forward


class PositionScaled(nn.Module):
    """Hidden units scaled per position by ``base ** (-position / n)``, computed in ``forward`` (RoPE's frequencies
    are computed so): a number raised to a tensor power."""

    def __init__(self, base: float) -> None:
        super().__init__()
        self.base, self.fc1, self.fc2 = base, nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x):  # (B, N, 4)
        n = x.shape[1]
        scale = self.base ** (-torch.arange(n, dtype=x.dtype) / n)
        return self.fc2(torch.relu(self.fc1(x)) * scale[:, None])


@pytest.mark.parametrize("base", [10000, 2.0])
def test_a_number_raised_to_a_tensor_power_is_traced_through_export(base):
    # a new-user trial: ``10000 ** t`` (aten.pow.Scalar) was rewritten as a method of the number, and the exported
    # graph failed to compile with a message that blamed torch.export
    model = PositionScaled(base).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fx, ex = trace_spec(model, x, tracer="fx"), trace_spec(model, x, tracer="export")
    assert fx.sizes == ex.sizes == {"fc1": 16}
    for seed in (0, 1):
        _assert_exact(model, ex, x, seed)


def test_aten_operation_without_a_mapping_is_refused_naming_it():
    model = UnmappedOpNet()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SpecError, match=r"node `export_special_erfcx` .*`aten\.special_erfcx\.default` .* has no rule"):
        trace_spec(model, x)
    spec = trace_spec(model, x, on_unsupported="fix")  # the group it touches stays unpermuted
    assert spec.groups == []


def test_unknown_tracer_is_refused():
    with pytest.raises(ValueError, match=r"unknown tracer 'jit'; expected one of \['auto', 'fx', 'export'\]"):
        trace_spec(nn.Linear(2, 2), torch.zeros(1, 2), tracer="jit")


@pytest.mark.parametrize("name,given", [("same_pad", True), ("leaf", True), ("leaf", False)])
def test_planted_permutation_recovered_through_the_exported_graph(name, given):
    """Activation alignment reads the exported graph's nodes, on batches of other sizes than the example's, whether
    the spec is given or traced by ``align``; B is A under a random permutation of the spec, recovered exactly."""
    torch.manual_seed(0)
    a = (randomize_bn(SamePadNet(), seed=1) if name == "same_pad" else LeafAttention()).eval()
    g = torch.Generator().manual_seed(2)
    shape = (3, 12, 12) if name == "same_pad" else (6, 5)
    loader = [(torch.randn(n, *shape, generator=g), torch.zeros(n, dtype=torch.long)) for n in (64, 64, 7)]
    spec = trace_spec(a, loader[0][0][:2])
    assert all(t.node.startswith("export_") for ts in spec.taps.values() for t in ts)
    p = random_permutation(spec, generator=3)
    b = copy.deepcopy(a)
    b.load_state_dict(apply_permutation(a.state_dict(), spec, p))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*have no activation tap")  # SamePadNet's c1 moves in blocks
        res = align(a, b, loader, spec=spec if given else None, generator=0)
    inverse = invert_permutation(p)
    assert [g for g in spec.groups if not torch.equal(res.perms[g], inverse[g])] == []
    assert "fc" in res.correlation_after  # matched on its activations


TIMM = [("tf_efficientnetv2_b0", 64), ("tiny_vit_5m_224", 224), ("mobilevit_xxs", 64)]


def _redraw_constants(model: nn.Module) -> nn.Module:
    """Zero biases, unit norms and zero-initialised bias tables would hide a misplaced permutation: every parameter
    whose entries are all equal gets seeded noise added (in place, on this test's model)."""
    for p in model.parameters():
        if p.unique().numel() == 1:
            g = torch.Generator().manual_seed(p.numel())
            p.data.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name,side", TIMM, ids=[t[0] for t in TIMM])
def test_timm_models_fx_cannot_trace_are_exact_through_export(name, side, monkeypatch):
    timm = pytest.importorskip("timm")
    from timm.models import tiny_vit

    # tiny_vit caches its indexed bias table in eval mode outside the state dict (stale after loading permuted
    # weights, see docs/transformer_coverage.md): index it at every call
    monkeypatch.setattr(tiny_vit.Attention, "get_attention_biases",
                        lambda self, device: self.attention_biases[:, self.attention_bias_idxs])  # fmt: skip
    torch.manual_seed(0)
    model = _redraw_constants(timm.create_model(name, num_classes=10).double())
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(SpecError, match="torch.fx could not trace"):
        trace_spec(model, x, tracer="fx")
    spec = trace_spec(model, x)
    assert len(spec.groups) >= 30
    res = check_equivalence(model, spec, x, trials=1, generator=0, tol=1e-9)
    assert res.verdict == "pass", res.message


@pytest.mark.slow
def test_swin_t_shifted_window_attention_is_traced_inside_through_export():
    """torchvision keeps ``shifted_window_attention`` an fx leaf; torch.export records the window partition, the
    cyclic shift, the relative-position bias and the attention inside it, and the same rules prove them."""
    import torchvision

    torch.manual_seed(0)
    model = _redraw_constants(torchvision.models.swin_t(weights=None, num_classes=10).double())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spec = trace_spec(model, x)
    assert len(spec.heads) == 24  # 12 attentions: query/key and value/output rows split into heads
    res = check_equivalence(model, spec, x, trials=1, generator=0, tol=1e-9)
    assert res.verdict == "pass", res.message


def test_a_shape_branch_the_example_does_not_take_is_named_by_a_warning():
    """torch.export records only the branch of the example's shapes: a layer used on another branch (here batch size
    1) is not in the graph, so the spec is proven for the example's shapes only; the warning names its parameters.
    A model whose exported graph uses every parameter warns nothing."""

    class BatchBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.d = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            if x.shape[0] > 1:
                return self.c(torch.relu(self.b(h)))
            return self.d(h)

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"does not use the parameters `d.weight`, `d.bias`"):
        trace_spec(BatchBranch(), torch.randn(2, 4))

    class Always(BatchBranch):
        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(h))) + self.d(h) if x.shape[0] > 1 else self.d(h)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trace_spec(Always(), torch.randn(2, 4))
