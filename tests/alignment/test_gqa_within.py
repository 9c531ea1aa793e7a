"""Grouped-query attention: the query heads of one key/value head may be reordered among themselves (``Heads.within``)
but never leave their group. Every form (SDPA's ``enable_gqa``, ``repeat_interleave`` of the key/value heads, the
zoo's TinyLM) traces to a spec with that freedom; structured
permutations that use it keep the function exactly in float64; a permutation moving a query head into another
group is refused by ``validate_permutation`` and changes the function; head-structured matching finds the best
order of the query heads on brute-forced small instances."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralign.alignment import (
    Heads,
    PermutationSpec,
    SpecBuilder,
    apply_permutation,
    heads_permutation,
    random_permutation,
    split_heads_permutation,
    trace_spec,
    validate_permutation,
)
from neuralign.alignment.heads import match_heads
from neuralign.errors import SpecError
from neuralign.experiments.models.lm import TinyLM
from neuralign.verification import check_equivalence

D, H, N = 24, 6, 5  # width, query heads, sequence length


class _GQA(nn.Module):
    """Separate q/k/v projections, ``kv`` key/value heads serving ``H / kv`` query heads each; ``form`` is
    ``"enable_gqa"`` (SDPA repeats them), ``"repeat"`` (``repeat_interleave`` by hand), ``"scaled"`` (the
    repeat, with a learned scale per query head on the scores) or ``"group_mean"`` (the repeat, and the mean of
    each group's query heads added back: a view that reads the heads' order inside a group)."""

    def __init__(self, form: str, kv: int) -> None:
        super().__init__()
        self.form, self.kv = form, kv
        d = D // H
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, kv * d), nn.Linear(D, kv * d)
        self.o = nn.Linear(D, D)
        self.scale = nn.Parameter(torch.rand(H, 1, 1) + 0.5)
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, -1).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv, -1).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv, -1).transpose(1, 2)
        if self.form == "enable_gqa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k, v = k.repeat_interleave(H // self.kv, dim=1), v.repeat_interleave(H // self.kv, dim=1)
            a = q @ k.transpose(-2, -1) * (D // H) ** -0.5
            o = (a * self.scale if self.form == "scaled" else a).softmax(-1) @ v
            if self.form == "group_mean":
                t = H // self.kv
                o = o + o.view(b, self.kv, t, n, -1).mean(2, keepdim=True).expand(-1, -1, t, -1, -1).reshape(o.shape)
        x = x + self.o(o.transpose(1, 2).reshape(b, n, D))
        return self.fc(x.mean(1))


def _double(model, seed):
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return model.double().eval()


def _query_groups(spec, weight):
    """The flat groups with heads on the query projection's rows and the output projection's columns."""
    q = next(g for g in spec.heads if (f"{weight}q.weight", 0) in spec.perm_to_axes[g])
    o = next(g for g in spec.heads if (f"{weight}o.weight", 1) in spec.perm_to_axes[g])
    return q, o


def _moved_within(spec, perms):
    """True if some group reorders the query heads inside a block."""
    return any(not torch.equal(split_heads_permutation(h, perms[g])[2], torch.arange(h.tie).expand(h.blocks, h.tie))
               for g, h in spec.heads.items() if h.within is not None)  # fmt: skip


def _assert_exact(model, spec, x, seeds=range(3)):
    ref = model(x)
    moved = False
    for seed in seeds:
        perms = random_permutation(spec, generator=seed)
        moved |= _moved_within(spec, perms)
        state = apply_permutation(model.state_dict(), spec, perms)
        out = torch.func.functional_call(model, state, (x,), tie_weights=False)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)  # float64: permuted sums round alike to ~1e-15
    assert moved  # the draws did reorder query heads inside their blocks
    verdict = check_equivalence(model, spec, x, trials=2, generator=0)
    assert verdict.passed, verdict.message


def _cross_group(spec, q, o):
    """A permutation that exchanges the first query head of block 0 with the first of block 1 (in the queries and
    the output projection's columns alike), every other group unchanged."""
    perms = {g: torch.arange(n) for g, n in spec.sizes.items()}
    h = spec.heads[q]
    for g in (q, o):
        p = perms[g].reshape(spec.heads[g].count, spec.heads[g].size).clone()
        p[[0, h.tie]] = p[[h.tie, 0]]
        perms[g] = p.reshape(-1)
    return perms


@pytest.mark.parametrize("form", ["enable_gqa", "repeat"])
@pytest.mark.parametrize("kv", [2, 3])  # blocks of 3 and of 2 query heads
def test_query_heads_move_within_their_group(form, kv):
    model = _double(_GQA(form, kv), seed=3)
    x = torch.randn(2, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    spec = trace_spec(model, x)
    q, o = _query_groups(spec, "")
    t = H // kv
    assert (spec.heads[q].count, spec.heads[q].tie) == (H, t) and spec.heads[q].within is not None
    assert spec.heads[o].within == spec.heads[q].within and spec.heads[o].tie == t
    assert spec.heads[q].heads is not None and spec.sizes[spec.heads[q].heads] == kv
    _assert_exact(model, spec, x)
    bad = _cross_group(spec, q, o)
    with pytest.raises(ValueError, match=r"moves units between its 6 attention heads .* or heads between its "):
        validate_permutation(spec, bad)
    # without the head structure the same relabelling is accepted, and it changes the function
    bare = PermutationSpec(spec.sizes, spec.axes, spec.taps, {})
    moved = torch.func.functional_call(model, apply_permutation(model.state_dict(), bare, bad), (x,))
    assert (moved - model(x)).abs().max() > 1e-3


@pytest.mark.parametrize("form", ["scaled", "group_mean"])
def test_query_heads_read_in_order_move_as_blocks(form):
    # a learned scale per query head is a parameter axis of the query heads, and a view into (key/value heads,
    # query heads) reads their order: they move as blocks only
    model = _double(_GQA(form, 2), seed=5)
    x = torch.randn(2, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    spec = trace_spec(model, x)
    q, o = _query_groups(spec, "")
    assert spec.heads[o].within is None and spec.heads[o].tie == 3
    perms = random_permutation(spec, generator=0)
    out = torch.func.functional_call(model, apply_permutation(model.state_dict(), spec, perms), (x,))
    torch.testing.assert_close(out, model(x), rtol=0, atol=1e-12)


def test_tinylm_query_heads_move_within_their_group():
    model = _double(TinyLM(50, width=32, depth=2, heads=4, kv_heads=2, hidden=48), seed=7)
    x = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(8))
    spec = trace_spec(model, x)
    for b in range(2):
        q, o = _query_groups(spec, f"blocks.{b}.attn.")
        assert spec.heads[q].inner is None  # RoPE: no permutation inside query/key heads
        assert spec.heads[q].within is not None and spec.heads[q].within == spec.heads[o].within
    _assert_exact(model, spec, x)
    q, o = _query_groups(spec, "blocks.0.attn.")
    with pytest.raises(ValueError, match="or heads between its blocks of 2 tied heads"):
        validate_permutation(spec, _cross_group(spec, q, o))


def test_within_is_checked_and_serialised():
    build = lambda h: SpecBuilder().group("kv", 2).group("q", 8).heads("q", h).build()  # noqa: E731
    spec = build(Heads(4, 2, "kv", None, 2, "w"))
    assert PermutationSpec.from_dict(spec.to_dict()).heads == spec.heads
    old = spec.to_dict()
    old["heads"] = {g: h[:5] for g, h in old["heads"].items()}  # written before `within` existed
    assert PermutationSpec.from_dict(old).heads["q"] == Heads(4, 2, "kv", None, 2)
    with pytest.raises(SpecError, match="sharing within key `w` differ"):
        (SpecBuilder().group("kv", 2).group("q", 8).group("o", 4).heads("q", Heads(4, 2, "kv", None, 2, "w"))
         .heads("o", Heads(4, 1, None, None, 2, "w")).build())
    # reordering the heads of a block is refused where `within` is None, and must agree across one key
    pi, tau = torch.tensor([1, 0]), torch.tensor([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="reorders the 2 tied heads of a block, which move whole"):
        validate_permutation(build(Heads(4, 2, "kv", None, 2)),
                             {"kv": pi, "q": heads_permutation(Heads(4, 2, "kv", None, 2), pi, None, tau)})
    two = (SpecBuilder().group("kv", 2).group("q", 8).group("o", 8).heads("q", Heads(4, 2, "kv", None, 2, "w"))
           .heads("o", Heads(4, 2, "kv", None, 2, "w")).build())  # fmt: skip
    h = two.heads["q"]
    with pytest.raises(ValueError, match="reorders the heads inside its blocks unlike the other groups of key `w`"):
        validate_permutation(two, {"kv": pi, "q": heads_permutation(h, pi, None, tau),
                                   "o": heads_permutation(h, pi, None, None)})  # fmt: skip


def _objective(sim, perms):
    return sum(float(S[torch.arange(S.shape[0]), perms[g]].sum()) for g, S in sim.items())


def _all_structured(spec):
    """Every structured permutation of a spec with key/value heads `kv` (2), queries `q` and outputs `o` (blocks of
    2 query heads of 2 units, within key `w`), keys `k` and values `v` (2 heads of 2 units)."""
    two = [torch.tensor(p) for p in itertools.permutations(range(2))]
    for pi in itertools.permutations(range(2)):
        pi = torch.tensor(pi)
        for tau, s_qk, s_vo in itertools.product(*(itertools.product(two, repeat=2) for _ in range(3))):
            tau, s_qk, s_vo = torch.stack(tau), torch.stack(s_qk), torch.stack(s_vo)
            yield {"kv": pi, "k": heads_permutation(spec.heads["k"], pi, s_qk),
                   "v": heads_permutation(spec.heads["v"], pi, s_vo),
                   "q": heads_permutation(spec.heads["q"], pi, s_qk, tau),
                   "o": heads_permutation(spec.heads["o"], pi, s_vo, tau)}  # fmt: skip


def _gqa_spec():
    builder = SpecBuilder().group("kv", 2).group("k", 4).group("v", 4).group("q", 8).group("o", 8)
    builder.heads("k", Heads(2, 2, "kv", "qk")).heads("v", Heads(2, 2, "kv", "vo"))
    return builder.heads("q", Heads(4, 2, "kv", "qk", 2, "w")).heads("o", Heads(4, 2, "kv", "vo", 2, "w")).build()


@pytest.mark.parametrize("seed", range(4))
def test_match_heads_recovers_a_planted_query_head_order_and_beats_blocks(seed):
    spec = _gqa_spec()
    gen = torch.Generator().manual_seed(seed)
    planted = random_permutation(spec, generator=gen)
    identity = {g: torch.arange(n) for g, n in spec.sizes.items()}
    # a planted instance: similarity 1 where B's unit is A's planted match, plus noise well below the gap
    sim = {g: torch.eye(n, dtype=torch.float64)[planted[g]] + 0.1 * torch.rand(n, n, generator=gen, dtype=torch.float64)
           for g, n in spec.sizes.items()}  # fmt: skip
    sim["kv"] = torch.zeros(2, 2, dtype=torch.float64)  # the head group has no tensor of its own
    found = match_heads(spec, sim, identity)
    validate_permutation(spec, found)
    values = [_objective(sim, p) for p in _all_structured(spec)]
    assert _objective(sim, found) == pytest.approx(max(values), rel=1e-12)
    assert all(torch.equal(found[g], planted[g]) for g in spec.groups)
    # on pure noise the result is a structured permutation at least as good as the best with the heads in order
    noise = {g: torch.randn(n, n, generator=gen, dtype=torch.float64) for g, n in spec.sizes.items()}
    noise["kv"] = torch.zeros(2, 2, dtype=torch.float64)
    found = match_heads(spec, noise, identity)
    validate_permutation(spec, found)
    in_order = [_objective(noise, p) for p in _all_structured(spec) if not _moved_within(spec, p)]
    assert _objective(noise, found) >= max(in_order) - 1e-12
    assert _objective(noise, found) <= max(_objective(noise, p) for p in _all_structured(spec)) + 1e-12
