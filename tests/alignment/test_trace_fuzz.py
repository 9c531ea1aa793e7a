"""Differential fuzz test of the tracer: every operation either traces to a spec that passes a float64 equivalence
check (in eval and train mode) or is refused with SpecError; a spec with one tensor left out always fails the check.

Each case is a small generated module that applies one operation to a tensor whose channel axis carries a group
("after": conv -> batch norm -> ReLU -> op -> flatten -> linear head) or to the network input ("before": op ->
flatten -> linear -> ReLU -> linear). The expected outcome is pinned ("ok" must trace with a group and pass;
"refuse" must raise), so that a rule that silently widens or narrows is a failing test.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from neuralign.alignment import PermutationSpec, trace_spec
from neuralign.errors import SpecError
from neuralign.verification import check_equivalence
from tests.alignment.test_trace_cases import _Tied

C, L = 8, 6  # channels of the permuted layer, positions


class _Params(nn.Module):
    """Extra per-unit parameters the operations may read (values drawn so that every one matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.vec = nn.Parameter(torch.randn(C))
        self.lo = nn.Parameter(torch.randn(C) * 0.3 - 0.2)
        self.hi = nn.Parameter(torch.rand(C) + 0.2)
        self.mat = nn.Parameter(torch.randn(C, L))
        self.w = nn.Parameter(torch.randn(C, 5))
        self.ln_w = nn.Parameter(torch.rand(C) + 0.5)
        self.ln_b = nn.Parameter(torch.randn(C))
        self.mha = nn.MultiheadAttention(C, 2, batch_first=True)
        self.shuffle = nn.ChannelShuffle(2)
        self.drop2d = nn.Dropout2d(0.3)
        self.depth = torchvision.ops.StochasticDepth(0.5, "row")
        self.register_buffer("rm", torch.randn(C))
        self.register_buffer("rv", torch.rand(C) + 0.5)
        # functional layers (the forms torch.export writes every layer in)
        self.conv1 = nn.Parameter(torch.randn(5, C, 3) * 0.3)
        self.gconv = nn.Parameter(torch.randn(4, C // 2, 3) * 0.3)
        self.conv2 = nn.Parameter(torch.randn(5, C, 1, 2) * 0.3)
        self.conv3 = nn.Parameter(torch.randn(5, C, 1, 1, 1) * 0.3)
        self.convt1 = nn.Parameter(torch.randn(C, 5, 3) * 0.3)
        self.convt2 = nn.Parameter(torch.randn(C, 3, 1, 2) * 0.3)
        self.convt3 = nn.Parameter(torch.randn(C, 2, 1, 1, 1) * 0.3)
        self.conv_b = nn.Parameter(torch.randn(5))
        self.emb = nn.Parameter(torch.randn(L, C))


# (name, op(h, p, training), expectation on "after", expectation on "before"): "ok" traces with a group and passes
# the check, "fixed" traces but leaves the layer unpermuted (and passes), "refuse" raises SpecError
OPS = [
    ("data", lambda h, p, t: h.data, "ok", "ok"),
    ("mT", lambda h, p, t: h.mT, "ok", "ok"),
    ("transpose", lambda h, p, t: h.transpose(1, 2), "ok", "ok"),
    ("permute_kw", lambda h, p, t: h.permute(dims=(0, 2, 1)), "ok", "ok"),
    ("movedim", lambda h, p, t: h.movedim(1, -1), "ok", "ok"),
    ("swapaxes", lambda h, p, t: torch.swapaxes(h, 1, 2), "ok", "ok"),
    ("view_roundtrip", lambda h, p, t: h.view(h.shape[0], -1).view(h.shape), "ok", "ok"),
    ("flatten", lambda h, p, t: torch.flatten(h, 1), "ok", "ok"),
    ("channels_last_flatten", lambda h, p, t: h.transpose(1, 2).reshape(h.shape[0], -1), "ok", "ok"),
    ("unflatten_positions", lambda h, p, t: h.unflatten(2, (2, L // 2)), "ok", "ok"),
    ("unflatten_channels", lambda h, p, t: h.unflatten(1, (2, C // 2)), "ok", "ok"),
    ("squeeze_unsqueeze", lambda h, p, t: h.unsqueeze(2).squeeze(2), "ok", "ok"),
    ("einsum_self_contract", lambda h, p, t: torch.einsum("ncl,ncl->nl", h, h), "ok", "ok"),
    ("einsum_transpose", lambda h, p, t: torch.einsum("ncl->nlc", h), "ok", "ok"),
    ("einsum_param", lambda h, p, t: torch.einsum("ncl,c->nl", h, p.vec), "ok", "ok"),
    ("matmul_param", lambda h, p, t: h.transpose(1, 2) @ p.w, "ok", "ok"),
    ("matmul_gram", lambda h, p, t: h @ h.transpose(1, 2), "refuse", "ok"),  # flattens two permuted axes
    ("matmul_gram_trace", lambda h, p, t: torch.diagonal(h @ h.transpose(1, 2), dim1=1, dim2=2), "refuse", "ok"),
    ("matmul_gram_reduced", lambda h, p, t: (h @ h.transpose(1, 2)).sum(2), "ok", "ok"),
    ("linear_functional", lambda h, p, t: F.linear(h.transpose(1, 2), p.w.T), "ok", "ok"),
    ("chunk_first", lambda h, p, t: h.chunk(2, dim=1)[0], "ok", "ok"),
    ("split_sizes", lambda h, p, t: h.split([3, 5], dim=1)[1], "ok", "ok"),
    ("swap_halves", lambda h, p, t: torch.cat(h.chunk(2, dim=1)[::-1], dim=1), "ok", "ok"),
    ("chunk_positions", lambda h, p, t: h.chunk(2, dim=2)[0], "ok", "ok"),
    ("slice_units", lambda h, p, t: h[:, :4], "ok", "ok"),
    ("index_unit", lambda h, p, t: h[:, 1], "ok", "ok"),
    ("index_position", lambda h, p, t: h[:, :, 0], "ok", "ok"),
    ("ellipsis_slice", lambda h, p, t: h[..., 1:], "ok", "ok"),
    ("strided_units", lambda h, p, t: h[:, ::2], "refuse", "ok"),
    ("fancy_units", lambda h, p, t: h[:, [0, 2]], "refuse", "ok"),
    ("narrow_units", lambda h, p, t: h.narrow(1, 2, 3), "ok", "ok"),
    ("select_unit", lambda h, p, t: h.select(1, 3), "ok", "ok"),
    ("expand", lambda h, p, t: h[:, :, None].expand(-1, -1, 2, -1), "ok", "ok"),
    ("repeat_units", lambda h, p, t: h.repeat(1, 2, 1), "ok", "ok"),
    ("repeat_interleave", lambda h, p, t: h.repeat_interleave(2, dim=1), "ok", "ok"),
    ("roll_units", lambda h, p, t: h.roll(1, dims=1), "refuse", "ok"),
    ("roll_positions", lambda h, p, t: h.roll(1, 2), "ok", "ok"),
    ("flip_units", lambda h, p, t: h.flip(1), "refuse", "ok"),
    ("flip_positions", lambda h, p, t: h.flip(2), "ok", "ok"),
    ("gather_positions", lambda h, p, t: torch.gather(h, 2, torch.zeros_like(h, dtype=torch.long)), "refuse", "ok"),
    ("index_select_positions", lambda h, p, t: h.index_select(2, torch.tensor([0, 2])), "ok", "ok"),
    ("index_select_units", lambda h, p, t: h.index_select(1, torch.tensor([0, 2])), "refuse", "ok"),
    ("masked_fill", lambda h, p, t: h.masked_fill(h > 0.5, 0.25), "ok", "ok"),
    ("where_param", lambda h, p, t: torch.where(h > 0.1, h, p.vec[:, None]), "ok", "ok"),
    ("clamp_tensor_bounds", lambda h, p, t: torch.clamp(h, min=p.lo[:, None], max=p.hi[:, None]), "ok", "ok"),
    ("clamp_method", lambda h, p, t: h.clamp(p.lo[:, None]), "ok", "ok"),
    ("scale_param", lambda h, p, t: h * p.vec[:, None] + p.mat, "ok", "ok"),
    ("maximum_param", lambda h, p, t: torch.maximum(h, p.mat), "ok", "ok"),
    ("normalize_units", lambda h, p, t: F.normalize(h, dim=1), "ok", "ok"),
    ("norm_over_units", lambda h, p, t: h.norm(dim=1), "ok", "ok"),
    ("vector_norm_positions", lambda h, p, t: torch.linalg.vector_norm(h, dim=2), "ok", "ok"),
    ("layer_norm_channels_last",
     lambda h, p, t: F.layer_norm(h.transpose(1, 2), (C,), p.ln_w, p.ln_b).transpose(1, 2), "ok", "ok"),
    ("group_norm", lambda h, p, t: F.group_norm(h, 2, p.ln_w, p.ln_b), "ok", "ok"),
    ("instance_norm", lambda h, p, t: F.instance_norm(h), "ok", "ok"),
    ("sum_units", lambda h, p, t: h.sum(1), "ok", "ok"),
    ("mean_positions", lambda h, p, t: h.mean(2), "ok", "ok"),
    ("amax_keepdim", lambda h, p, t: h.amax(1, keepdim=True) * h, "ok", "ok"),
    ("max_values", lambda h, p, t: h.max(dim=1).values, "ok", "ok"),
    ("max_indices_units", lambda h, p, t: h.max(dim=1).indices.to(h.dtype), "refuse", "ok"),
    ("argmax_units", lambda h, p, t: h.argmax(1).to(h.dtype), "refuse", "ok"),
    ("argmax_positions", lambda h, p, t: h.argmax(2).to(h.dtype), "ok", "ok"),
    ("std_units", lambda h, p, t: h.std(1), "ok", "ok"),
    ("logsumexp_positions", lambda h, p, t: h.logsumexp(2), "ok", "ok"),
    ("softmax_units", lambda h, p, t: h.softmax(1), "ok", "ok"),
    ("log_softmax_positions", lambda h, p, t: F.log_softmax(h, 2), "ok", "ok"),
    ("cumsum_units", lambda h, p, t: h.cumsum(1), "refuse", "ok"),
    ("cumsum_positions", lambda h, p, t: h.cumsum(2), "ok", "ok"),
    ("sort_units_values", lambda h, p, t: h.sort(1).values, "ok", "ok"),
    ("sort_units_indices", lambda h, p, t: h.sort(1).indices.to(h.dtype), "refuse", "ok"),
    ("topk_units", lambda h, p, t: h.topk(3, dim=1).values, "ok", "ok"),
    ("topk_positions", lambda h, p, t: h.topk(2, dim=2).values, "ok", "ok"),
    ("argsort_positions", lambda h, p, t: h.argsort(2).to(h.dtype), "ok", "ok"),
    ("pad_positions", lambda h, p, t: F.pad(h, (1, 2)), "ok", "ok"),
    ("pad_units", lambda h, p, t: F.pad(h, (0, 0, 1, 1)), "refuse", "ok"),
    ("interpolate", lambda h, p, t: F.interpolate(h, scale_factor=2), "ok", "ok"),
    ("interpolate_size_from_shape", lambda h, p, t: F.interpolate(h[..., ::2], size=h.shape[-1:]), "ok", "ok"),
    ("pixel_shuffle_units", lambda h, p, t: F.pixel_shuffle(h.view(h.shape[0], C, 2, L // 2), 2), "refuse", "ok"),
    ("channel_shuffle_view",
     lambda h, p, t: h.view(h.shape[0], 2, C // 2, L).transpose(1, 2).reshape(h.shape[0], C, L), "ok", "ok"),
    ("channel_shuffle_module", lambda h, p, t: p.shuffle(h[..., None])[..., 0], "ok", "ok"),
    ("stack_new_axis", lambda h, p, t: torch.stack([h, 2 * h], dim=1), "ok", "ok"),
    ("unbind_positions", lambda h, p, t: h.unbind(2)[0], "ok", "ok"),
    ("unbind_units", lambda h, p, t: h.unbind(1)[0], "refuse", "ok"),
    ("dropout_functional", lambda h, p, t: F.dropout(h, 0.5, training=t), "ok", "ok"),
    ("dropout_always_on", lambda h, p, t: F.dropout(h, 0.5), "ok", "ok"),
    ("dropout2d_module", lambda h, p, t: p.drop2d(h), "ok", "ok"),
    ("stochastic_depth", lambda h, p, t: torchvision.ops.stochastic_depth(h, 0.5, "row", training=t), "ok", "ok"),
    ("noise", lambda h, p, t: h + 0.1 * torch.randn_like(h), "ok", "ok"),
    ("zeros_like", lambda h, p, t: h + torch.zeros_like(h), "ok", "ok"),
    ("new_zeros", lambda h, p, t: h + h.new_zeros(h.shape), "fixed", "ok"),  # a constant of unknown layout
    ("cast_roundtrip", lambda h, p, t: h.to(h.dtype).type_as(h).contiguous(), "ok", "ok"),
    ("sdpa", lambda h, p, t: F.scaled_dot_product_attention(*(h.transpose(1, 2)[:, None],) * 3)[:, 0], "ok", "ok"),
    ("multihead_attention", lambda h, p, t: p.mha(*(h.transpose(1, 2),) * 3)[0], "ok", "ok"),
    ("setitem", lambda h, p, t: h.clone().index_fill_(1, torch.tensor([0]), 0.0), "refuse", "ok"),
    # attention heads split from the channels (2 heads of 4): per-head attention over positions, merged back
    ("heads_attention", lambda h, p, t: ((lambda q: ((q @ q.transpose(-2, -1)).softmax(-1) @ q).transpose(2, 3)
                                          .reshape(h.shape))(h.view(h.shape[0], 2, C // 2, L).transpose(2, 3))),
     "ok", "ok"),
    ("heads_sdpa", lambda h, p, t: ((lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True)
                                     .transpose(2, 3).reshape(h.shape))(h.view(h.shape[0], 2, C // 2, L)
                                                                        .transpose(2, 3))), "ok", "ok"),
    ("heads_summed", lambda h, p, t: h.view(h.shape[0], 2, C // 2, L).sum(1), "ok", "ok"),
    ("conv1d_functional", lambda h, p, t: F.conv1d(h, p.conv1, p.conv_b, padding=1), "ok", "ok"),
    ("conv1d_grouped", lambda h, p, t: F.conv1d(h, p.gconv, groups=2), "ok", "ok"),
    ("conv2d_functional", lambda h, p, t: F.conv2d(h[:, :, None], p.conv2, p.conv_b)[:, :, 0], "ok", "ok"),
    ("conv3d_functional", lambda h, p, t: F.conv3d(h[:, :, None, None], p.conv3)[:, :, 0, 0], "ok", "ok"),
    ("conv_transpose1d_functional", lambda h, p, t: F.conv_transpose1d(h, p.convt1, p.conv_b), "ok", "ok"),
    ("conv_transpose2d_functional", lambda h, p, t: F.conv_transpose2d(h[:, :, None], p.convt2)[:, :, 0], "ok",
     "ok"),
    ("conv_transpose3d_functional", lambda h, p, t: F.conv_transpose3d(h[:, :, None, None], p.convt3)[:, :, 0, 0],
     "ok", "ok"),
    ("embedding_functional", lambda h, p, t: h + F.embedding(torch.arange(L), p.emb).T, "ok", "ok"),
    ("units_merged_with_batch",  # MobileViT's unfolding: channels between the batch and the positions, and back
     lambda h, p, t: h.reshape(h.shape[0] * C * 2, L // 2).reshape(h.shape), "ok", "ok"),
    ("rms_norm_channels_last", lambda h, p, t: F.rms_norm(h.transpose(1, 2), (C,), p.ln_w).transpose(1, 2), "ok",
     "ok"),
]  # fmt: skip


# Every other entry of the tracer's table, generated: elementwise functions of one, two and three operands (the
# extra operands are per-unit parameters, so the rule must tie them to the units), in-place forms, casts, and the
# remaining axis, reduction, scan, selection, pooling and contraction rules. All must trace with the layer's group
# and pass the check.
_POS = {"log", "log2", "sqrt", "rsqrt", "reciprocal", "pow"}  # need positive inputs
_UNARY = ["exp", "expm1", "log", "log1p", "log2", "abs", "neg", "negative", "square", "sqrt", "rsqrt", "sin", "cos",
          "erf", "reciprocal", "sign", "floor", "ceil", "round", "trunc", "nan_to_num", "sigmoid", "tanh", "relu",
          "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardtanh", "hardswish",
          "hardsigmoid", "softplus", "softsign", "logsigmoid", "tanhshrink", "hardshrink", "softshrink",
          "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout3d", "zeros_like", "ones_like",
          "rand_like"]  # fmt: skip
_BINARY = ["add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "maximum", "minimum", "fmax",
           "fmin", "atan2", "hypot", "pow"]  # fmt: skip
_COMPARE = ["eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or"]
_INPLACE = ["add_", "sub_", "mul_", "div_", "relu_", "sigmoid_", "tanh_", "clamp_", "masked_fill_", "elu_",
            "hardtanh_", "leaky_relu_"]


def _fn(name):
    import operator

    return getattr(F, name, None) or getattr(torch, name, None) or getattr(operator, name)


def _generated():
    import operator

    ops = []
    for name in _UNARY:
        f = _fn(name)
        pos = name in _POS
        ops.append((name, lambda h, p, t, f=f, pos=pos: f(h.abs() + 0.5 if pos else h)))
    for name in _BINARY:
        f = _fn(name)
        pos = name in _POS
        ops.append((name, lambda h, p, t, f=f, pos=pos: f(h.abs() + 0.5 if pos else h, p.mat.abs() + 0.5)))
    for name in _COMPARE:
        f = _fn(name)
        ops.append((name, lambda h, p, t, f=f: h * f(h, p.mat).to(h.dtype)))
    for name in _INPLACE:
        arg = {"masked_fill_": lambda h, p: (h > p.mat, 0.5), "clamp_": lambda h, p: (p.lo[:, None],)}.get(
            name, lambda h, p, binary=name in ("add_", "sub_", "mul_", "div_"): (p.mat.abs() + 0.5,) if binary else ())
        method = name not in ("elu_", "hardtanh_", "leaky_relu_")
        ops.append((name, lambda h, p, t, name=name, arg=arg, method=method:
                    getattr(h.clone(), name)(*arg(h, p)) if method else getattr(F, name)(h.clone())))
    for name in ("truediv", "floordiv", "mod"):
        f = getattr(operator, name)
        ops.append((name, lambda h, p, t, f=f: h * f(h.abs() + 1, p.mat.abs() + 1)))
    ops += [
        ("pos", lambda h, p, t: +h),
        ("threshold", lambda h, p, t: F.threshold(h, 0.1, -1.0)),
        ("clamp_min_max", lambda h, p, t: h.clamp_min(p.lo[:, None]).clamp_max(p.hi[:, None]).clip(-2, 2)),
        ("isnan_isfinite", lambda h, p, t: h * torch.isfinite(h) * ~torch.isnan(h) * torch.logical_not(h == 9)),
        ("where", lambda h, p, t: torch.where(h > p.lo[:, None], p.mat, h)),
        ("lerp_addcmul_addcdiv", lambda h, p, t: torch.addcdiv(torch.addcmul(torch.lerp(h, p.mat, 0.3), h, p.mat),
                                                              h, p.mat.abs() + 1)),
        ("full_like_randn_like", lambda h, p, t: h * torch.full_like(h, 2.0) + torch.randn_like(h)),
        ("casts", lambda h, p, t: h.double().float().to(h.dtype).type(h.dtype).cpu().detach().requires_grad_(False)
         .clone()),
        ("softmin", lambda h, p, t: F.softmin(h, 1)),
        ("t_T_H_mH", lambda h, p, t: h.mean(2).t().t().T.T.H.H[:, :, None] * h.mH.mH),
        ("as_shapes", lambda h, p, t: h.view_as(h).reshape_as(h) * p.vec[:, None].expand_as(h)),
        ("prod_var", lambda h, p, t: h.prod(2, keepdim=True) + h.var(1, keepdim=True) + h.amin(2, keepdim=True)),
        ("all_any", lambda h, p, t: h * h.gt(0).all(2, keepdim=True) + h * h.lt(0).any(2, keepdim=True)),
        ("nansum_nanmean", lambda h, p, t: h.nansum(1, keepdim=True) * h + h.nanmean(2, keepdim=True)),
        ("cummax_cummin", lambda h, p, t: h.cummax(2).values + h.cummin(2)[0] + torch.logcumsumexp(h, 2)),
        ("diff", lambda h, p, t: torch.diff(h, dim=2) + h.cumprod(2)[..., 1:]),
        ("min_argmin_positions", lambda h, p, t: h.min(dim=2).values + h.argmin(2) + h.min(2)[1]),
        ("moveaxis_swapdims", lambda h, p, t: h.moveaxis(1, -1).swapdims(1, 2)),
        ("stochastic_depth_module", lambda h, p, t: p.depth(h)),
        ("pixel_shuffle_whole_units",
         lambda h, p, t: F.pixel_shuffle(h.repeat_interleave(4, dim=1).reshape(h.shape[0], 4 * C, 2, 3), 2)),
        ("pooling_2d", lambda h, p, t: torch.cat([
            f(h.reshape(h.shape[0], C, 2, 3), 1).flatten(2) for f in (
                F.max_pool2d, F.avg_pool2d, lambda x, k: F.lp_pool2d(x.abs() + 0.1, 2, k), F.adaptive_avg_pool2d,
                F.adaptive_max_pool2d, lambda x, k: F.max_pool2d_with_indices(x, k)[0])], dim=2)),
        ("pooling_3d", lambda h, p, t: torch.cat([
            f(h.reshape(h.shape[0], C, 1, 2, 3), 1).flatten(2) for f in (
                F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d,
                lambda x, k: F.max_pool3d_with_indices(x, k)[0])], dim=2)),
        ("kthvalue_msort", lambda h, p, t: h.kthvalue(2, dim=1).values + torch.msort(h).sum(1)),
        ("take_along_positions", lambda h, p, t: torch.take_along_dim(h.mean(1), torch.zeros(1, L, dtype=torch.long),
                                                                      dim=1) * h.sum(1)),
        ("concat_concatenate", lambda h, p, t: torch.concatenate([torch.concat([h, h], dim=2), h], dim=2)),
        ("tensor_split", lambda h, p, t: torch.tensor_split(h, [3], dim=1)[1]),
        ("pooling_functions", lambda h, p, t: torch.cat([F.lp_pool1d(h.abs() + 0.1, 2, 2), F.avg_pool1d(h, 2),
                                                         F.max_pool1d(h, 2), F.adaptive_avg_pool1d(h, 3),
                                                         F.adaptive_max_pool1d(h, 3)], dim=2)),
        ("max_pool_indices", lambda h, p, t: F.max_pool1d(h, 2, return_indices=True)[0]),
        ("pixel_unshuffle", lambda h, p, t: F.pixel_unshuffle(h[..., :4].reshape(h.shape[0], C, 2, 2), 2)),
        ("channel_shuffle_functional", lambda h, p, t: F.channel_shuffle(h[..., None], 2)[..., 0]),
        ("native_channel_shuffle", lambda h, p, t: torch.native_channel_shuffle(h[..., None], 4)[..., 0]),
        ("mm_bmm", lambda h, p, t: torch.mm(h.mean(2), p.w)[:, :, None] + torch.bmm(h.transpose(1, 2), h)[:, :5]),
        ("batch_norm_functional", lambda h, p, t: F.batch_norm(h, p.rm, p.rv, p.ln_w, p.ln_b, training=False)),
        ("layer_norm_instance_group", lambda h, p, t: F.group_norm(F.instance_norm(h), 4)),
        ("size_numel", lambda h, p, t: h * (h.size(1) + h.numel() + h.dim() + h.ndim)),
        ("new_ones", lambda h, p, t: h.new_ones(1) * h + h.new_full((1,), 2.0)),
        ("bernoulli_dropout_module", lambda h, p, t: nn.functional.dropout2d(h[..., None], 0.2, t)[..., 0]),
    ]  # fmt: skip
    return ops


GENERATED = _generated()


@pytest.mark.parametrize("name,op", GENERATED, ids=[g[0] for g in GENERATED])
def test_every_rule_of_the_table_is_proven(name, op):
    for position in ("after", "before"):
        model, x = _build(position, op, seed=len(name))
        spec = trace_spec(model, x)
        assert bool(spec.groups), f"{name} ({position}) traced to an empty spec"
        res = check_equivalence(model, spec, x, trials=2, generator=0)
        assert res.passed, f"{name} ({position}): {res.message}"


def test_the_fuzz_family_exercises_every_rule_of_the_table():
    from neuralign.alignment.trace import _KIND, _trace_graph

    used: set[str] = set()
    for _, op, *_ in OPS + GENERATED:
        for position in ("after", "before"):
            try:
                _, gm = _trace_graph(*_build(position, op, seed=0))
            except SpecError:
                continue
            used |= gm.meta["rules_used"]
    # metadata reads return no tensor; new_* give an unpermuted tensor whatever their operand (x.new_ones is run)
    untested = sorted(set(_KIND) - used - {"_assert", "stride", "is_contiguous", "is_floating_point", "element_size",
                                           "new_tensor", "new_zeros", "new_empty"})  # fmt: skip
    assert not untested, f"rules no generated module applies: {untested}"


def _head(shape: torch.Size) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.Size(shape[1:]).numel()), 3))


class _After(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv1d(3, C, 3, padding=1)
        self.bn = nn.BatchNorm1d(C)
        self.p = _Params()
        with torch.no_grad():
            self.head = _head(self.body(torch.zeros(4, 3, L)).shape)

    def body(self, x):
        return self.op(F.relu(self.bn(self.conv(x))), self.p, self.training)

    def forward(self, x):
        return self.head(self.body(x))


class _Before(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.p = _Params()
        with torch.no_grad():
            shape = self.op(torch.zeros(4, C, L), self.p, False).shape
        self.fc1 = nn.Linear(int(torch.Size(shape[1:]).numel()), 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(self.op(x, self.p, self.training), 1))))


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5 + (1.0 if name.endswith("running_var") else 0.0))
                if name.endswith("running_var"):
                    t.abs_().add_(0.1)
    return model


def _build(position: str, op, seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = _randomize(_After(op) if position == "after" else _Before(op), seed)
    x = torch.randn(5, 3 if position == "after" else C, L, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def _without(spec: PermutationSpec, key: str) -> PermutationSpec:
    return PermutationSpec(spec.sizes, {k: v for k, v in spec.axes.items() if k != key})


@pytest.mark.parametrize("position", ["after", "before"])
@pytest.mark.parametrize("name,op,after,before", OPS, ids=[o[0] for o in OPS])
def test_every_operation_is_proven_or_refused(name, op, after, before, position):
    expected = after if position == "after" else before
    model, x = _build(position, op, seed=len(name))
    try:
        spec = trace_spec(model, x)
    except SpecError as exc:
        assert expected == "refuse", f"{name} ({position}) was refused: {exc}"
        assert "fx node" in str(exc) and "\n" not in str(exc)
        return
    assert expected != "refuse", f"{name} ({position}) traced although it must be refused: {spec.summary()}"
    assert bool(spec.groups) == (expected == "ok"), f"{name} ({position}): groups {spec.sizes}"
    res = check_equivalence(model, spec, x, trials=2, generator=0)
    assert res.passed, f"{name} ({position}): {res.message}"


# Operations after which a tensor left out of the spec cannot change the function, so no check can notice: a
# single unit is read (the other units are dead ends), or an argmax over positions (invariant to a positive
# per-channel scale such as the running variance).
_INSENSITIVE = {"index_unit": "*", "select_unit": "*", "argmax_positions": "bn.running_var"}
_MISSING = [(o[0], o[1]) for o in OPS if o[2] == "ok"]


@pytest.mark.parametrize("name,op", _MISSING, ids=[o[0] for o in _MISSING])
def test_a_spec_missing_any_tensor_fails_the_check_even_with_tiny_outputs(name, op):
    """The check must catch every incomplete spec of the family, also when the outputs are ~1e-6."""
    model, x = _build("after", op, seed=len(name))
    with torch.no_grad():
        model.head[1].weight.mul_(1e-6)
        model.head[1].bias.mul_(1e-6)
    spec = trace_spec(model, x)
    for key in spec.axes:
        if _INSENSITIVE.get(name) in (key, "*"):
            continue
        res = check_equivalence(model, _without(spec, key), x, trials=2, generator=0)
        assert not res.passed, f"{name}: leaving `{key}` unpermuted went unnoticed ({res.message})"
        # decades above the default tolerance (1e-6): a wrong spec is no rounding error
        assert max(res.max_diff_eval, res.max_diff_train) > 1e-3, f"{name}/{key}: {res.message}"


# ------------------------------------------------------------------------------ structure of the network itself
class _Outputs(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        y = self.b(h)
        if self.kind == "dict":
            return {"logits": y}
        if self.kind == "namedtuple":
            return _NT(y, h.sum(1))
        if self.kind == "nested":
            return [y, {"feat": (h,)}]
        return y, h.max(dim=1).indices  # indices into a permuted axis reach the output


_NT = collections.namedtuple("_NT", "logits score")


@pytest.mark.parametrize("kind,groups", [("dict", {"a": 8}), ("namedtuple", {"a": 8}), ("nested", {})])
def test_structured_outputs_fix_what_reaches_them(kind, groups):
    model = _randomize(_Outputs(kind), 0)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    spec = trace_spec(model, x)
    assert spec.sizes == groups  # the output layer is never permuted; a hidden layer returned as-is neither
    assert check_equivalence(model, spec, x, generator=0).passed


def test_indices_into_a_permuted_axis_cannot_be_returned():
    model = _Outputs("indices")
    with pytest.raises(SpecError, match="indices into a permuted axis"):
        trace_spec(model, torch.randn(5, 4))


class _Modes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(16, 3)
        self.calib = nn.Parameter(torch.randn(16))
        self.train_scale = nn.Parameter(torch.randn(16))

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h * (self.train_scale if self.training else self.calib)  # each mode reads a different parameter
        return self.b(F.dropout(h, 0.5, training=self.training))


def test_branches_of_both_modes_are_traced():
    model = _randomize(_Modes(), 0)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    spec = trace_spec(model, x)
    assert ("calib", 0) in spec.perm_to_axes["a"] and ("train_scale", 0) in spec.perm_to_axes["a"]
    assert check_equivalence(model, spec, x, generator=0).passed


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.block(self.block(F.relu(self.inp(x))))  # the same module twice
        return self.out(h)


@pytest.mark.parametrize(
    "cls,x",
    [(_Tied, torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(0))),
     (_Shared, torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))],
)  # fmt: skip
def test_tied_and_shared_modules(cls, x):
    model = _randomize(cls(), 0)
    spec = trace_spec(model, x)
    assert spec.groups
    assert check_equivalence(model, spec, x, generator=0).passed
    if cls is _Tied:  # both names of the shared tensor are permuted alike
        assert spec.axes["emb.weight"] == spec.axes["head.weight"]
