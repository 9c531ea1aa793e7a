"""Attention heads in the tracer: every attention form traces to a spec with head structure that passes the float64
equivalence check (random head, inside-head and residual permutations, eval and train mode), a flat permutation
that ignores the heads fails the same check, and forms the tracer cannot prove are refused naming the node."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from neuralign.alignment import (
    Heads,
    PermutationSpec,
    SpecBuilder,
    random_permutation,
    trace_spec,
    validate_permutation,
)
from neuralign.errors import SpecError
from neuralign.experiments.models.lm import TinyLM
from neuralign.experiments.models.vit import ViT
from neuralign.verification import check_equivalence

D, H, N = 16, 4, 6  # model width, heads, sequence length


class _Hand(nn.Module):
    """Embedding -> pre-norm attention written by hand (timm's form) -> residual -> pooled head."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.emb = nn.Linear(5, D)
        self.norm = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.head_scale = nn.Parameter(torch.rand(H, 1, 1) + 0.5)  # a per-head parameter moves with the heads
        self.fc = nn.Linear(D, 3)
        keep = torch.ones(2, 1, 1, N, dtype=torch.bool)
        keep[1, ..., -1] = False  # the last position of the second sequence is padding
        self.register_buffer("keep", keep, persistent=False)
        self.register_buffer("causal", torch.ones(N, N, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, x):
        x = self.emb(x)
        b, n, d = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, H, d // H).permute(2, 0, 3, 1, 4)
        if self.form == "index":
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q, k, v = qkv.unbind(0)
        if self.form == "sdpa_causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.form == "sdpa_padding":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep)
        elif self.form == "einsum":
            a = torch.einsum("bhnd,bhmd->bhnm", q, k).softmax(-1) * self.head_scale
            o = torch.einsum("bhnm,bhmd->bhnd", a, v)
        else:
            a = (q @ k.transpose(-2, -1) * (d // H) ** -0.5).masked_fill(self.causal, float("-inf"))
            o = F.dropout(a.softmax(-1), 0.0, self.training) @ v
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, d))
        return self.fc(x.mean(1))


class _MHA(nn.Module):
    def __init__(self, batch_first: bool, per_head: bool) -> None:
        super().__init__()
        self.batch_first, self.per_head = batch_first, per_head
        self.emb = nn.Linear(5, D)
        self.mha = nn.MultiheadAttention(D, H, batch_first=batch_first)
        self.fc = nn.Linear(D, 3)
        self.wfc = nn.Linear(N, 3)

    def forward(self, x):
        h = self.emb(x if self.batch_first else x.transpose(0, 1))
        a, w = self.mha(h, h, h, need_weights=True, average_attn_weights=not self.per_head)
        a = a if self.batch_first else a.transpose(0, 1)
        if self.per_head:  # (B, H, N, N): the heads reach a reduction, not the output
            w = w.mean(1)
        return self.fc((a + (h if self.batch_first else h.transpose(0, 1))).mean(1)) + self.wfc(w.mean(1))


def _double(model: nn.Module, seed: int) -> nn.Module:
    """float64 with every parameter drawn at random (zero-initialised heads would hide a wrong spec)."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return model


def _flat(spec: PermutationSpec) -> PermutationSpec:
    """The same spec without its head structure: random permutations then move units between heads."""
    return PermutationSpec(spec.sizes, spec.axes)


def _assert_exact(model, spec, x):
    # float64: a correct spec reorders sums only (~1e-15); the default tolerance 1e-6 is nine decades above
    res = check_equivalence(model, spec, x, trials=3, generator=0)
    assert res.passed, res.message


FORMS = ["unbind", "index", "sdpa_causal", "sdpa_padding", "einsum"]


@pytest.mark.parametrize("form", FORMS)
def test_hand_written_attention_has_heads_and_is_exact(form):
    torch.manual_seed(0)
    model = _double(_Hand(form), seed=1)
    x = torch.randn(2, N, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    spec = trace_spec(model, x)
    assert len(spec.heads) == 2, spec.heads  # one group for the query/key units, one for the value units
    qk, vo = (spec.heads[g] for g in spec.heads)
    assert qk.heads == vo.heads and qk.inner != vo.inner  # one head permutation, two inside permutations
    assert (qk.count, qk.size, vo.count, vo.size) == (H, D // H, H, D // H)
    vo_group = [g for g in spec.heads if ("proj.weight", 1) in spec.perm_to_axes[g]]
    assert len(vo_group) == 1  # the output projection reads the value units
    if form == "einsum":
        assert ("head_scale", 0) in spec.perm_to_axes[qk.heads]
    _assert_exact(model, spec, x)
    assert not check_equivalence(model, _flat(spec), x, trials=3, generator=0).passed


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("per_head", [False, True])
def test_multihead_attention_rows_are_heads(batch_first, per_head):
    torch.manual_seed(0)
    model = _double(_MHA(batch_first, per_head), seed=3)
    x = torch.randn(2, N, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    spec = trace_spec(model, x)
    assert set(spec.heads) == {"mha.qk", "mha.vo"}
    assert spec.heads["mha.qk"] == Heads(H, D // H, "mha.heads", "mha.qk.inner")
    assert spec.heads["mha.vo"] == Heads(H, D // H, "mha.heads", "mha.vo.inner")
    assert ("mha.out_proj.weight", 1) in spec.perm_to_axes["mha.vo"]
    _assert_exact(model, spec, x)
    assert not check_equivalence(model, _flat(spec), x, trials=3, generator=0).passed


def test_per_head_weights_returned_fix_the_heads():
    class Returns(_MHA):
        def forward(self, x):
            h = self.emb(x)
            a, w = self.mha(h, h, h, average_attn_weights=False)
            return self.fc(a), w  # (B, H, N, N): the heads' order is visible

    model = _double(Returns(True, True), seed=5)
    x = torch.randn(2, N, 5, dtype=torch.float64)
    spec = trace_spec(model, x)
    assert "mha.heads" not in spec.sizes and spec.heads["mha.vo"].heads is None
    _assert_exact(model, spec, x)


def test_torchvision_vision_transformer():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                               hidden_dim=64, mlp_dim=128, num_classes=10)  # fmt: skip
    vit = _double(vit, seed=6)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    spec = trace_spec(vit, x)
    assert len(spec.heads) == 4 and all(h.count == 4 and h.size == 16 for h in spec.heads.values())
    stream = spec.perm_to_axes["conv_proj"]  # the residual stream: embeddings, every LayerNorm, the class token
    for key in ("class_token", "encoder.pos_embedding", "encoder.ln.weight", "heads.head.weight"):
        assert any(k == key for k, _ in stream), key
    _assert_exact(vit, spec, x)
    assert not check_equivalence(vit, _flat(spec), x, trials=2, generator=0).passed


def test_zoo_vit_is_exact():
    model = _double(ViT(10, width=32, depth=2, heads=4, mlp_dim=48), seed=8)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    spec = trace_spec(model, x)
    assert len(spec.heads) == 4
    assert {k for k, _ in spec.perm_to_axes["patch_embed"]} >= {"cls_token", "pos_embed", "norm.weight"}
    _assert_exact(model, spec, x)


def test_llm_style_decoder_rope_and_grouped_query_attention():
    model = _double(TinyLM(50, width=32, depth=2, heads=4, kv_heads=2, hidden=48), seed=10)
    x = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(11))
    spec = trace_spec(model, x)
    for b in range(2):
        pre = f"blocks.{b}.attn"
        # RoPE: keys move only as whole heads (a head group acting on their rows), queries as whole heads of a flat
        # group without inside permutations; GQA: the two query heads of a key/value head may swap (within)
        heads = next(g for g, pairs in spec.perm_to_axes.items() if (f"{pre}.k.weight", 0) in pairs)
        q = next(g for g in spec.heads if (f"{pre}.q.weight", 0) in spec.perm_to_axes[g])
        assert spec.sizes[heads] == 2
        assert spec.heads[q] == Heads(4, 8, heads, None, 2, spec.heads[q].within) and spec.heads[q].within
        # the value units per key/value head, and the output projection's columns of its two query heads
        v = next(g for g in spec.heads if (f"{pre}.v.weight", 0) in spec.perm_to_axes[g])
        o = next(g for g in spec.heads if (f"{pre}.o.weight", 1) in spec.perm_to_axes[g])
        assert spec.heads[v] == Heads(2, 8, heads, spec.heads[v].inner, 1)
        assert spec.heads[o] == Heads(4, 8, heads, spec.heads[v].inner, 2, spec.heads[q].within)
    assert spec.axes["head.weight"] == spec.axes["embed.weight"]  # the tied head follows the residual stream
    _assert_exact(model, spec, x)
    assert not check_equivalence(model, _flat(spec), x, trials=3, generator=0).passed


class _SumParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.fc = nn.Linear(D // H, 2)

    def forward(self, x):
        b, n, d = x.shape
        return self.fc(self.qkv(x).reshape(b, n, 3, H, d // H).sum(2))


class _PerDimScale(nn.Module):
    """A (d,) parameter shared by every head: the units inside heads cannot move per head."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.gain = nn.Parameter(torch.rand(D // H) + 0.5)
        self.proj = nn.Linear(D, 2)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, H, d // H).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q * self.gain @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d)).mean(1)


class _RelativeBias(nn.Module):
    """Per-head relative-position biases read from a table by a constant index (Swin, CoAtNet, LeViT)."""

    def __init__(self, split_inside: bool) -> None:
        super().__init__()
        self.split_inside = split_inside
        self.qkv = nn.Linear(D, 3 * D)
        self.table = nn.Parameter(torch.randn(H, 2 * N - 1))
        pos = torch.arange(N)
        self.register_buffer("index", pos[:, None] - pos[None, :] + N - 1)  # persistent: a constant all the same
        self.proj = nn.Linear(D, 2)

    def forward(self, x):
        b, n, d = x.shape
        if self.split_inside:  # LeViT: each head's units split into its query, key and value parts
            q, k, v = self.qkv(x).view(b, n, H, -1).split([d // H] * 3, dim=3)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:
            q, k, v = self.qkv(x).reshape(b, n, 3, H, d // H).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1) + self.table[:, self.index]).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d)).mean(1)


@pytest.mark.parametrize("split_inside", [False, True])
def test_relative_position_biases_move_with_their_heads(split_inside):
    model = _double(_RelativeBias(split_inside), seed=13)
    x = torch.randn(2, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    spec = trace_spec(model, x)
    heads = next(g for g, pairs in spec.perm_to_axes.items() if ("table", 0) in pairs)
    assert spec.sizes[heads] == H
    # a fused projection keeps both inside permutations; per-head query/key/value parts keep none (the parts of
    # each head are not a flat group), the heads still move
    assert len(spec.heads) == (0 if split_inside else 2)
    _assert_exact(model, spec, x)


class _Variants(nn.Module):
    """Separate q/k/v projections viewed as (B, N, H, d); SDPA with enable_gqa or ALiBi slopes as an additive mask."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        kv = 2 if kind == "enable_gqa" else H
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, kv * D // H), nn.Linear(D, kv * D // H)
        self.o = nn.Linear(D, 2)
        slopes = 2.0 ** -torch.arange(1, H + 1, dtype=torch.float64)
        pos = torch.arange(N, dtype=torch.float64)
        alibi = -slopes[:, None, None] * (pos[None, :, None] - pos[None, None, :]).abs()
        self.register_buffer("alibi", alibi, persistent=kind == "alibi_buffer")

    def forward(self, x):
        b, n, d = x.shape
        q = self.q(x).view(b, n, H, -1).transpose(1, 2)
        k = self.k(x).view(b, n, -1, d // H).transpose(1, 2)
        v = self.v(x).view(b, n, -1, d // H).transpose(1, 2)
        if self.kind == "enable_gqa":
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif self.kind == "alibi_hand":
            o = (q @ k.transpose(-2, -1) * (d // H) ** -0.5 + self.alibi).softmax(-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.alibi.to(x.dtype))
        return self.o(o.transpose(1, 2).reshape(b, n, d)).mean(1)


def test_grouped_query_attention_through_enable_gqa():
    model = _double(_Variants("enable_gqa"), seed=15)
    x = torch.randn(2, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    spec = trace_spec(model, x)
    v = next(g for g in spec.heads if ("v.weight", 0) in spec.perm_to_axes[g])
    o = next(g for g in spec.heads if ("o.weight", 1) in spec.perm_to_axes[g])
    assert (spec.heads[v].count, spec.heads[o].count, spec.heads[o].tie) == (2, H, 2)
    assert spec.heads[v].inner == spec.heads[o].inner and spec.heads[v].heads == spec.heads[o].heads
    _assert_exact(model, spec, x)
    assert not check_equivalence(model, _flat(spec), x, trials=3, generator=0).passed


@pytest.mark.parametrize("kind", ["alibi_constant", "alibi_hand", "alibi_buffer"])
def test_alibi_slopes_fix_or_move_the_heads(kind):
    model = _double(_Variants(kind), seed=17)
    x = torch.randn(2, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    spec = trace_spec(model, x)
    # constant slopes (not in the state dict) pin every head to its slope; a stored table moves with the heads
    assert {h.heads is None for h in spec.heads.values()} == {kind != "alibi_buffer"}
    assert (("alibi", 0) in {p for pairs in spec.perm_to_axes.values() for p in pairs}) == (kind == "alibi_buffer")
    assert len(spec.heads) == 2  # the units inside heads move either way
    _assert_exact(model, spec, x)


class _MHAVariants(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.emb = nn.Linear(5, D)
        kdim = 6 if kind == "kdim" else None
        self.mha = nn.MultiheadAttention(D, H, batch_first=True, kdim=kdim, vdim=kdim, add_bias_kv=kind == "bias_kv")
        self.side = nn.Linear(5, 6)
        self.fc = nn.Linear(D, 3)
        self.register_buffer("masks", torch.randn(2 * H, N, N))
        self.register_buffer("padding", torch.tensor([[False] * N, [False] * (N - 1) + [True]]))

    def forward(self, x):
        h = self.emb(x)
        kv = self.side(x) if self.kind == "kdim" else h
        if self.kind == "per_head_mask":
            a, _ = self.mha(h, kv, kv, attn_mask=self.masks, need_weights=False)
        else:
            a, _ = self.mha(h, kv, kv, key_padding_mask=self.padding)
        return self.fc(a).mean(1)


@pytest.mark.parametrize("kind", ["kdim", "bias_kv", "per_head_mask"])
def test_multihead_attention_variants(kind):
    model = _double(_MHAVariants(kind), seed=19)
    x = torch.randn(2, N, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(20))
    spec = trace_spec(model, x)
    assert (spec.heads["mha.qk"].heads is None) == (kind == "per_head_mask")  # one mask per (batch, head)
    if kind == "bias_kv":
        assert ("mha.bias_k", 2) in spec.perm_to_axes["mha.qk"] and ("mha.bias_v", 2) in spec.perm_to_axes["mha.vo"]
    _assert_exact(model, spec, x)


def test_an_operation_on_the_fused_parts_is_refused_naming_the_node():
    with pytest.raises(SpecError, match=r"fx node `sum_1` .*fused query/key/value parts"):
        trace_spec(_SumParts(), torch.randn(2, N, D))


def test_a_parameter_shared_by_all_heads_keeps_the_insides_of_query_and_key_in_place():
    model = _double(_PerDimScale(), seed=12)
    x = torch.randn(2, N, D, dtype=torch.float64)
    spec = trace_spec(model, x)
    assert len(spec.heads) == 1  # only the value units keep permutations inside heads
    assert ("gain", 0) not in {p for pairs in spec.perm_to_axes.values() for p in pairs}
    _assert_exact(model, spec, x)


def test_structured_permutations_are_drawn_and_checked():
    spec = (SpecBuilder().group("h", 2).group("qk", 6).group("vo", 6)
            .heads("qk", Heads(2, 3, "h", "qk")).heads("vo", Heads(2, 3, "h", "vo"))
            .add("wq", 0, "qk").add("wv", 0, "vo").build())  # fmt: skip
    for seed in range(20):
        perms = random_permutation(spec, generator=seed)
        validate_permutation(spec, perms)
        blocks = perms["qk"].view(2, 3) // 3
        assert torch.equal(blocks, perms["h"][:, None].expand(2, 3))  # whole heads, moved as the head group
    perms = random_permutation(spec, generator=0)
    bad = dict(perms, vo=torch.tensor([0, 1, 3, 2, 4, 5]))
    with pytest.raises(ValueError, match="group `vo` moves units between its 2 attention heads"):
        validate_permutation(spec, bad)
    swapped = dict(perms, h=perms["h"].flip(0))
    with pytest.raises(ValueError, match="moves its heads unlike its head group `h`"):
        validate_permutation(spec, swapped)
    with pytest.raises(SpecError, match="has 6 units, not 3 heads of 3"):
        SpecBuilder().group("g", 6).heads("g", Heads(3, 3, None, "g")).build()
