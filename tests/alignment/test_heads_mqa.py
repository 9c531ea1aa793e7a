"""Multi-query attention (one key/value head, Shazeer 2019, arXiv:1911.02150): every query head reads the same keys
and values, so the query heads may be reordered freely (one block of ``Heads.within``, with the output projection's
columns of each head), the value units share one permutation inside for all of them, and under RoPE the query/key
units inside heads stay in place. On the zoo's TinyLM with ``kv_heads=1`` in float64: the traced spec has that
freedom, permutations drawn from it keep the function to rounding, planted permutations are recovered exactly by
weight and correlation matching; the grouped-query and multi-head forms trace as before. Attention written by hand
(SDPA broadcasting the one head, or ``repeat_interleave``) has the same freedom; a learned scale per query head reads
their order, and they stay in place with the value units still permuted."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralign.alignment import (
    Heads,
    align,
    apply_permutation,
    invert_permutation,
    random_permutation,
    split_heads_permutation,
    trace_spec,
    validate_permutation,
)
from neuralign.experiments.models.lm import TinyLM
from neuralign.verification import check_equivalence


def _lm(kv_heads: int, depth: int = 2, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM(20, width=16, depth=depth, heads=4, kv_heads=kv_heads, hidden=24).double()
    for p in model.parameters():  # weights of order one: the heads' outputs differ clearly
        nn.init.normal_(p, std=0.5)
    return model.eval()


def _tokens(seed: int, shape=(2, 6)) -> torch.Tensor:
    return torch.randint(0, 20, shape, generator=torch.Generator().manual_seed(seed))


def _mqa_heads(b: int) -> dict[str, Heads]:
    p = f"blocks.{b}.attn."
    within = f"{p}q.within"
    return {
        f"{p}q": Heads(4, 4, None, None, 4, within),  # RoPE: nothing moves inside query/key heads
        f"{p}v": Heads(1, 4, None, f"{p}v.inner", 1, None),  # the one value head: its units
        f"{p}v_1": Heads(4, 4, None, f"{p}v.inner", 4, within),  # the output projection's columns
    }


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_mqa_spec_reorders_all_query_heads(mode):
    model = _lm(1)
    getattr(model, mode)()
    spec = trace_spec(model, _tokens(0))
    assert spec.heads == {**_mqa_heads(0), **_mqa_heads(1)}
    for b in range(2):
        p = f"blocks.{b}.attn."
        assert (f"{p}q.weight", 0) in spec.perm_to_axes[f"{p}q"]
        assert (f"{p}v.weight", 0) in spec.perm_to_axes[f"{p}v"]
        assert (f"{p}o.weight", 1) in spec.perm_to_axes[f"{p}v_1"]
        assert not any((f"{p}k.weight", 0) in spec.perm_to_axes[g] for g in spec.groups)  # RoPE: keys stay


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_mqa_permutations_keep_the_function(mode):
    model = _lm(1, seed=1)
    getattr(model, mode)()
    x = _tokens(2)
    spec = trace_spec(model, x)
    ref = model(x)
    moved = False
    for seed in range(3):
        perms = random_permutation(spec, generator=seed)
        validate_permutation(spec, perms)
        h = spec.heads["blocks.0.attn.q"]
        moved |= not torch.equal(split_heads_permutation(h, perms["blocks.0.attn.q"])[2], torch.arange(4)[None])
        out = torch.func.functional_call(model, apply_permutation(model.state_dict(), spec, perms), (x,),
                                         tie_weights=False)  # fmt: skip
        # float64: the permuted sums round alike to ~1e-15 of logits of order 10
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert moved  # the draws did reorder the query heads
    verdict = check_equivalence(model, spec, x, trials=2, generator=0)
    assert verdict.passed, verdict.message


@pytest.mark.parametrize("method", ["weight", "correlation"])
def test_mqa_planted_permutation_is_recovered_exactly(method):
    model = _lm(1, seed=3)
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 20, (16, 12), generator=gen) for _ in range(2)]
    spec = trace_spec(model, batches[0][:2])
    perms = random_permutation(spec, generator=5)
    assert any(not torch.equal(split_heads_permutation(h, perms[g])[2], torch.arange(4)[None])
               for g, h in spec.heads.items() if h.within is not None)  # fmt: skip  # the query heads are reordered
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(model.state_dict(), spec, perms))
    kwargs = {"loader": batches} if method == "correlation" else {"spec": spec, "generator": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # groups without a tap (the query heads) are matched by weights
        res = align(model, other, method=method, **kwargs)
    expected = invert_permutation(perms)
    wrong = [g for g in spec.groups if not torch.equal(res.perms[g], expected[g])]
    assert not wrong, wrong


def test_gqa_and_mha_specs_are_unchanged():
    # the specs these forms traced to before multi-query attention had its rule (depth 1)
    gqa = trace_spec(_lm(2, depth=1), _tokens(0))
    p = "blocks.0.attn."
    assert gqa.sizes == {"embed": 16, f"{p}q": 16, f"{p}k.heads": 2, f"{p}v": 8, f"{p}v_1": 16, "blocks.0.gate": 24}
    assert gqa.heads == {
        f"{p}q": Heads(4, 4, f"{p}k.heads", None, 2, f"{p}q.within"),
        f"{p}v": Heads(2, 4, f"{p}k.heads", f"{p}v.inner", 1, None),
        f"{p}v_1": Heads(4, 4, f"{p}k.heads", f"{p}v.inner", 2, f"{p}q.within"),
    }
    mha = trace_spec(_lm(4, depth=1), _tokens(0))
    assert mha.sizes == {"embed": 16, f"{p}q.heads": 4, f"{p}v": 16, "blocks.0.gate": 24}
    assert mha.heads == {f"{p}v": Heads(4, 4, f"{p}q.heads", f"{p}v.inner", 1, None)}


class _MQA(nn.Module):
    """Multi-query attention without RoPE on ``(B, N, 24)``: 6 query heads of 4 units, one key/value head; ``form``
    ``"broadcast"`` (SDPA broadcasts the key/value head), ``"repeat"`` (``repeat_interleave`` by hand) or
    ``"scaled"`` (the repeat, and a learned scale per query head on the scores)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.q, self.k, self.v, self.o = nn.Linear(24, 24), nn.Linear(24, 4), nn.Linear(24, 4), nn.Linear(24, 24)
        self.scale = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 6, 4).transpose(1, 2)
        k, v = (p(x).view(b, n, 1, 4).transpose(1, 2) for p in (self.k, self.v))
        if self.form == "broadcast":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = k.repeat_interleave(6, dim=1), v.repeat_interleave(6, dim=1)
            a = q @ k.transpose(-2, -1) * 0.5
            o = (a * self.scale if self.form == "scaled" else a).softmax(-1) @ v
        x = x + self.o(o.transpose(1, 2).reshape(b, n, 24))
        return self.fc(x.mean(1))


@pytest.mark.parametrize("form", ["broadcast", "repeat", "scaled"])
def test_mqa_by_hand(form):
    torch.manual_seed(6)
    model = _MQA(form)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    model = model.double().eval()
    x = torch.randn(2, 5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    spec = trace_spec(model, x)
    if form == "scaled":  # the per-head scale reads the query heads' order: only the value units move
        assert spec.sizes == {"v": 4} and spec.heads == {}
    else:
        assert spec.heads["q"] == Heads(6, 4, None, None, 6, "q.within")
        assert spec.heads["v_1"] == Heads(6, 4, None, "v.inner", 6, "q.within")
        assert ("o.weight", 1) in spec.perm_to_axes["v_1"]
    ref = model(x)
    for seed in range(3):
        perms = random_permutation(spec, generator=seed)
        out = torch.func.functional_call(model, apply_permutation(model.state_dict(), spec, perms), (x,))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)  # float64 rounding of sums of order one


class _MaskedMHA(nn.Module):
    """Multi-head attention (6 heads of 4 units on ``(B, N, 24)``) with additive scores computed from the input and
    repeated over the heads: copies of one unpermuted tensor that no value merges with."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(24, 24) for _ in range(4))
        self.bias, self.fc = nn.Linear(24, 5), nn.Linear(24, 3)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, 6, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        m = self.bias(x)[:, None].repeat_interleave(6, dim=1)
        a = (q @ k.transpose(-2, -1) + m).softmax(-1)
        x = x + self.o((a @ v).transpose(1, 2).reshape(b, n, 24))
        return self.fc(x.mean(1))


def test_scores_repeated_over_heads_trace_as_before():
    # the spec traced before multi-query attention had its rule: an unpermuted tensor on the heads' axis fixes the
    # heads, the units inside each head still move (per head)
    torch.manual_seed(8)
    model = _MaskedMHA().double().eval()
    x = torch.randn(2, 5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    spec = trace_spec(model, x)
    assert spec.sizes == {"q": 24, "v": 24}
    assert spec.heads == {"q": Heads(6, 4, None, "q.inner"), "v": Heads(6, 4, None, "v.inner")}
    perms = random_permutation(spec, generator=0)
    out = torch.func.functional_call(model, apply_permutation(model.state_dict(), spec, perms), (x,))
    torch.testing.assert_close(out, model(x), rtol=0, atol=1e-12)  # float64 rounding of sums of order one
