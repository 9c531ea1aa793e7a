"""Learned permutations (straight-through estimator, Sinkhorn re-basin, learned from weight matching): planted
problems, the straight-through forward pass, descent on a seeded toy problem, determinism, resume, errors."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.func import functional_call

from neuralign.alignment import (
    LEARNED_METHODS,
    LearnedOptions,
    SpecBuilder,
    apply_permutation,
    learn_permutation,
    learned_from_weight_matching,
    random_permutation,
    sinkhorn_rebasin,
    straight_through,
    trace_spec,
)
from neuralign.errors import CheckpointError, ShapeMismatchError
from tests.alignment.nets import ResCatNet, randomize_bn

METHODS = sorted(LEARNED_METHODS)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def toy_data(seed: int = 0, n: int = 512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    teacher = torch.randn(8, 3, generator=g)
    y = (x @ teacher + 0.3 * x.pow(2) @ teacher.flip(0)).argmax(1)
    return x, y


def batches(x, y, size: int = 64):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def trained(seed: int) -> nn.Module:
    x, y = toy_data()
    model = mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def pair():
    return trained(1), trained(2)


def line_losses(model: nn.Module, state_b, x, y, lams=(0.0, 0.25, 0.5, 0.75, 1.0)) -> list[float]:
    pa = dict(model.named_parameters())
    out = []
    with torch.no_grad():
        for lam in lams:
            params = {k: torch.lerp(pa[k].detach(), state_b[k], lam) for k in pa}
            out.append(float(nn.functional.cross_entropy(functional_call(model, params, (x,)), y)))
    return out


def barrier(losses: list[float]) -> float:
    return max(losses) - 0.5 * (losses[0] + losses[-1])


def run(method: str, a, b, loader, **kwargs):
    return learn_permutation(a, b, loader, method=method, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_planted_permutation_is_recovered_with_zero_barrier(method, pair):
    a = pair[0]
    x, y = toy_data()
    spec = trace_spec(a, x[:2])
    planted = random_permutation(spec, generator=3)
    b = mlp(9)
    b.load_state_dict(apply_permutation(a.state_dict(), spec, planted))
    # Sinkhorn's soft permutation starts near uniform (tau = 1, one-hot scores): a few epochs sharpen it back to the
    # start's permutation (measured: the rounding still moves 2 units after 2 epochs, none from epoch 4 on)
    epochs = 10 if method == "sinkhorn" else 2
    res = run(method, a, b, batches(x, y), spec=spec, epochs=epochs, generator=0)
    aligned = apply_permutation(b.state_dict(), spec, res.perms)
    for k, v in a.state_dict().items():
        assert torch.equal(aligned[k], v), k
    # B aligned is A exactly, so every point of the line is A: the barrier is 0 up to float32 rounding of lerp
    assert abs(barrier(line_losses(a, aligned, x, y))) < 1e-6
    assert (res.n_iter, res.cost.data_passes, res.cost.steps, res.cost.samples) == (epochs, epochs, 8 * epochs,
                                                                                    512 * epochs)  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_data_passes_count_the_share_of_the_loader_that_max_batches_runs(method, pair):
    # a new-user trial: 2 of 8 batches per epoch were counted as a whole pass over the data
    a, b = pair
    x, y = toy_data()
    res = run(method, a, b, batches(x, y), epochs=3, generator=0, max_batches=2)
    assert res.cost.data_passes == 3 * 2 / 8 and res.cost.steps == 3 * 2


    class Unsized:  # a loader without a length: an epoch counts as one pass
        def __iter__(self):
            return iter(batches(x, y))

    res = run(method, a, b, Unsized(), epochs=1, generator=0, max_batches=2)
    assert res.cost.data_passes == 1.0


def test_sinkhorn_data_free_recovers_a_planted_permutation_from_the_identity(pair):
    a = pair[0]
    x, _ = toy_data()
    spec = trace_spec(a, x[:2])
    b = mlp(9)
    b.load_state_dict(apply_permutation(a.state_dict(), spec, random_permutation(spec, generator=4)))
    res = sinkhorn_rebasin(a, b, spec=spec, loss="l2", init="identity", epochs=100, generator=0)
    aligned = apply_permutation(b.state_dict(), spec, res.perms)
    assert all(torch.equal(aligned[k], v) for k, v in a.state_dict().items())
    assert res.cost.data_passes == 0.0 and res.cost.samples == 0 and res.cost.steps == 100
    # the objective at the start (random identity-permuted weights) is far above the end's
    assert res.history[-1]["loss"] < 0.1 * res.history[0]["loss"]


class Shared(list):
    """A list that a deep copy of its module shares (straight_through runs a deep copy of ``model_a``)."""

    def __deepcopy__(self, memo):
        return self


class Recorder(nn.Module):
    """An MLP that records the first layer's weight of every forward pass (functional_call's substituted one)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)
        self.seen = Shared()

    def forward(self, x):
        self.seen.append(self.fc1.weight.detach().clone())
        return self.fc2(self.fc1(x).relu())


def test_straight_through_forward_pass_uses_the_projected_permutation():
    torch.manual_seed(0)
    a, b = Recorder(), Recorder()
    x, y = toy_data()
    # hand-built: tracing would run the recording forward
    spec = SpecBuilder().group("h", 16).add("fc1.weight", 0, "h").add("fc1.bias", 0, "h").add("fc2.weight", 1, "h")
    spec = spec.build()
    group = "h"
    # a large rate moves the free weights far from theta_A in one step: they are no permutation of theta_B, so a
    # forward pass on them (instead of their projection) would fail the exact check below
    res = straight_through(a, b, batches(x, y, 128), spec=spec, epochs=2, lr=5.0, momentum=0.0, generator=0)
    wa, wb = a.fc1.weight.detach(), b.fc1.weight.detach()
    perms = []
    for w in a.seen:
        # w == lerp(wa, wb[perm], 0.5) exactly, for one permutation perm of B's hidden units
        perm = torch.cdist(2 * w - wa, wb).argmin(dim=1)
        assert sorted(perm.tolist()) == list(range(16))
        assert torch.equal(w, torch.lerp(wa, wb[perm], 0.5))
        perms.append(perm)
    assert len(perms) == 8
    # the first projection (free weights = theta_A, warm start at weight matching) is weight matching itself
    assert torch.equal(perms[0], res.init_perms[group])
    assert any(not torch.equal(p, perms[0]) for p in perms)  # the free weights moved the projection
    # the returned permutation is one the forward passes used (the lowest batch loss)
    assert any(torch.equal(p, res.perms[group]) for p in perms)


def memorizer(seed: int, x, y) -> nn.Module:
    model = mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def barrier_pair():
    """Two nets that memorise the same random labels: a high barrier on the line (midpoint loss 4.4 against 0.17
    and 0.18 at the ends, measured), so a permutation has much to gain."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 8, generator=g), torch.randint(0, 3, (512,), generator=g)
    return memorizer(1, x, y), memorizer(2, x, y), x, y


# rates at which each method descends within 8 epochs of 8 batches (the straight-through default 1e-2 barely moves
# the free weights in 64 steps; 0.5 is the rate of the PyTorch port of Git Re-Basin's STE)
RATES = {"straight_through": 0.5, "sinkhorn": 0.1, "learned": 0.1}


@pytest.mark.parametrize("method", METHODS)
def test_objective_decreases_on_a_seeded_toy_problem(method, barrier_pair):
    a, b, x, y = barrier_pair
    spec = trace_spec(a, x[:2])
    res = run(method, a, b, batches(x, y), spec=spec, init="identity", epochs=8, generator=0, loss="midpoint",
              lr=RATES[method])  # fmt: skip
    losses = [h["loss"] for h in res.history]
    # stochastic descent: the mean objective of the last two epochs is below that of the first two
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    if method != "sinkhorn":
        # the hard permutation's midpoint loss on the whole data is below the start's (Sinkhorn's objective is the
        # soft permutation's: its rounding carries no such guarantee)
        start = line_losses(a, b.state_dict(), x, y, (0.5,))[0]
        end = line_losses(a, apply_permutation(b.state_dict(), spec, res.perms), x, y, (0.5,))[0]
        assert end < start


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_result(method, pair):
    a, b = pair
    x, y = toy_data()
    kwargs = {"epochs": 2, "generator": 5, "init": "identity"}
    one, two = run(method, a, b, batches(x, y), **kwargs), run(method, a, b, batches(x, y), **kwargs)
    assert all(torch.equal(one.perms[g], two.perms[g]) for g in one.perms)
    assert [h["loss"] for h in one.history] == [h["loss"] for h in two.history]
    assert one.cost.assignments == two.cost.assignments


@pytest.mark.parametrize("method", METHODS)
def test_resume_after_an_interrupt_is_bit_identical(method, pair, tmp_path):
    a, b = pair
    x, y = toy_data()
    kwargs = {"epochs": 3, "generator": 7, "init": "identity", "loss": "random"}
    whole = run(method, a, b, batches(x, y), **kwargs)
    path = tmp_path / "run.pt"
    stopped = run(method, a, b, batches(x, y), checkpoint=path, callback=lambda r: r["epoch"] == 0, **kwargs)
    assert stopped.n_iter == 1 and stopped.status.name == "CALLBACK"
    torch.manual_seed(123)  # the global RNG is part of the checkpoint
    resumed = run(method, a, b, batches(x, y), checkpoint=path, **kwargs)
    assert all(torch.equal(whole.perms[g], resumed.perms[g]) for g in whole.perms)
    assert [h["loss"] for h in whole.history] == [h["loss"] for h in resumed.history]
    assert (whole.cost.steps, whole.cost.samples, whole.cost.data_passes) == (
        resumed.cost.steps, resumed.cost.samples, resumed.cost.data_passes)  # fmt: skip
    # another seed is another run: refused, not answered with the stored one (a new-user trial found it reused)
    with pytest.raises(CheckpointError, match="seed"):
        run(method, a, b, batches(x, y), checkpoint=path, **{**kwargs, "generator": 8})


def test_defaults_follow_the_papers():
    x, y = toy_data(n=64)
    a, b = mlp(1), mlp(2)
    ste = straight_through(a, b, batches(x, y), generator=0)
    assert (ste.loss, ste.options.lr, ste.options.momentum) == ("midpoint", 1e-2, 0.9)
    sk = sinkhorn_rebasin(a, b, batches(x, y), generator=0)
    assert (sk.loss, sk.options.lam_range, sk.options.tau, sk.options.sinkhorn_iter) == ("random", (0.0, 1.0), 1.0, 20)
    lw = learned_from_weight_matching(a, b, batches(x, y), generator=0)
    assert (lw.loss, lw.options.lam_range) == ("random", (0.4, 0.6))
    # every method starts at weight matching by default
    assert all(torch.equal(ste.init_perms[g], lw.init_perms[g]) for g in ste.init_perms)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda a, b, d: straight_through(a, b, d, init="random"), ValueError, r"unknown init 'random'"),
        (lambda a, b, d: straight_through(a, b, d, loss="l2"), ValueError, r"loss 'l2' is data-free"),
        (lambda a, b, d: learned_from_weight_matching(a, b, None), ValueError, r"needs a `loader`"),
        (lambda a, b, d: sinkhorn_rebasin(a, b, d, epochs=0), ValueError, r"`epochs` must be"),
        (lambda a, b, d: sinkhorn_rebasin(a, b, d, loss="cosine"), ValueError, r"unknown loss 'cosine'"),
        (lambda a, b, d: sinkhorn_rebasin(a, b, d, lam_range=(0.6, 0.4)), ValueError, r"low <= high"),
        (lambda a, b, d: sinkhorn_rebasin(a, b, d, steps=3), TypeError, r"unexpected keyword arguments \['steps'\]"),
        (lambda a, b, d: straight_through(a, "b", d), TypeError, r"must be nn.Module"),
        (lambda a, b, d: straight_through(a, nn.Linear(8, 3), d), ShapeMismatchError, r"`model_b` has no"),
        (lambda a, b, d: straight_through(a, b, [(d[0][0],)]), TypeError, r"\(inputs, targets\)"),
        (lambda a, b, d: straight_through(a, b, d, options={"epochs": 2}), TypeError, r"must be a LearnedOptions"),
    ],
)
def test_bad_input_is_named(call, error, match):
    x, y = toy_data(n=64)
    with pytest.raises(error, match=match):
        call(mlp(1), mlp(2), batches(x, y))


def test_options_round_trip():
    opts = LearnedOptions(epochs=3, loss="random", lam_range=(0.4, 0.6))
    assert LearnedOptions.from_dict(opts.to_dict()) == opts


# ------------------------------------------------------------------------------------------------ data parallel
WORLD = 2
# global batches of even and odd sizes, so that some slices differ in size (7 -> 4 + 3)
SIZES = (12, 12, 7, 10)


def _parallel_inputs():
    g = torch.Generator().manual_seed(11)
    data = [(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in SIZES]
    return mlp(1), mlp(2), data


def _parallel_runs() -> dict:
    a, b, data = _parallel_inputs()
    out = {}
    for method in METHODS:
        res = run(method, a, b, data, epochs=2, generator=0, init="identity", lr=RATES[method])
        out[method] = {"perms": res.perms, "losses": [h["loss"] for h in res.history], "samples": res.cost.samples}
    return out


def _worker(rank: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.save(_parallel_runs(), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~20 s on 2 busy cores, mostly imports
def test_data_parallel_runs_equal_the_one_process_run(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    one = _parallel_runs()
    for method in METHODS:
        for g, p in one[method]["perms"].items():
            assert torch.equal(ranks[0][method]["perms"][g], p) and torch.equal(ranks[1][method]["perms"][g], p)
        # every rank sees the global batches' objective (all-reduced, so both ranks agree exactly); it equals the
        # one-process objective up to float32 rounding of the slices' sums
        assert ranks[0][method]["losses"] == ranks[1][method]["losses"]
        torch.testing.assert_close(torch.tensor(ranks[0][method]["losses"]), torch.tensor(one[method]["losses"]),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        assert ranks[0][method]["samples"] == one[method]["samples"] == 2 * sum(SIZES)


# ------------------------------------------------------------------------------------------------ SIGKILL
KILLED = """
import os, signal, sys
import torch
sys.path.insert(0, {root!r})
from tests.alignment.test_learned import run, toy_data, batches, trained
a, b = trained(1), trained(2)
x, y = toy_data()


def die(record):
    if record["epoch"] == 1:  # after the checkpoint of epoch 1 is written
        os.kill(os.getpid(), signal.SIGKILL)


run({method!r}, a, b, batches(x, y), checkpoint={path!r}, callback=die, epochs=3, generator=7, init="identity",
    loss="random")
"""


@pytest.mark.slow  # a subprocess per method
@pytest.mark.parametrize("method", METHODS)
def test_resume_after_sigkill_is_bit_identical(method, pair, tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    path = str(tmp_path / "run.pt")
    proc = subprocess.run([sys.executable, "-c", KILLED.format(root=root, method=method, path=path)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    a, b = pair
    x, y = toy_data()
    kwargs = {"epochs": 3, "generator": 7, "init": "identity", "loss": "random"}
    resumed = run(method, a, b, batches(x, y), checkpoint=path, **kwargs)
    whole = run(method, a, b, batches(x, y), **kwargs)
    assert all(torch.equal(whole.perms[g], resumed.perms[g]) for g in whole.perms)
    assert [h["loss"] for h in whole.history] == [h["loss"] for h in resumed.history]


@pytest.mark.parametrize("method", METHODS)
def test_a_traced_net_with_batch_norm_residuals_and_concatenation(method):
    """ResCatNet: batch norm (run in train mode on the method's own buffer copies), a residual addition tying two
    groups, a channel concatenation and a LayerNorm over a permuted axis; the planted permutation is recovered and
    neither model is modified."""
    torch.manual_seed(0)
    a = randomize_bn(ResCatNet(), 0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    spec = trace_spec(a, data[0][0][:2])
    b = ResCatNet()
    b.load_state_dict(apply_permutation(a.state_dict(), spec, random_permutation(spec, generator=1)))
    before = {k: v.clone() for k, v in [*a.state_dict().items(), *(("b." + k, v) for k, v in b.state_dict().items())]}
    res = run(method, a, b, data, spec=spec, epochs=2, generator=0)
    aligned = apply_permutation(b.state_dict(), spec, res.perms)
    assert all(torch.equal(aligned[k], v) for k, v in a.state_dict().items())
    after = {**a.state_dict(), **{"b." + k: v for k, v in b.state_dict().items()}}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert a.training and b.training  # the caller's flags are left as they were
