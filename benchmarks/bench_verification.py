"""Benchmark: the neighbourhood check's screening four ways, side by side in one run: the whole network per
candidate, or the layers from the permuted group's producer on (:func:`torch.func.vmap` over the candidates of a
chunk, the layers before run once per chunk; the path before 0.4), against the same two ways with the producer and
the consumer evaluated on the moved units only and the layers after the consumer per candidate
(:mod:`neuralign._chain`, where the group's producer, channel-wise layers and consumer form a chain);
and the check's race (successive elimination over slices of the screening set) against the exhaustive screen.

Two TinyTen networks trained on the shipped UCI digits (resized to 16x16, as ``neuralign demo``), aligned by
correlation, a quadratic Bezier curve fitted between them. Per permutation group: the seconds to screen
``--candidates`` transpositions (the data term on the screening set's first slice of 32 examples at t = 0.5) each
way, the ratio of the faster of the first two to the faster of the last two (> 1: a speed-up; the check times
both ways of its kind on each group's first chunk and screens on with the faster) and the largest difference of
their values (float32 rounding); then the held-out test's scoring of the same transpositions (through each
group's chain, every held-out batch) with the curve's points in channels-last memory format (the default on a CPU)
against the contiguous format, side by side, their ratio and largest difference; then,
per group, the race's ``--top`` best transpositions against the exhaustive screen's (every transposition on all
``--examples``): their overlap, whether the best is the same, the candidates left in the race on each slice, and
the seconds of both, side by side. Power (``--race-z 3 1.5 1``): per group, how often a transposition made better by
1 to 4 of the screen's standard errors is ranked among the best by the exhaustive screen, by the exhaustive screen on
its first 64 and 128 examples, and by the race with each elimination threshold, with the race's share of the
candidate-examples (``--trials`` seeded trials per cell; the screen's values are the real ones on this pair, the
better transposition planted in them); then the same on a synthetic screen of 2,016 neutral candidates, one planted 3
standard errors better (200 seeded trials).

Then ``verify_alignment`` with the demo's options on the same pair, its progress records timed: per check the
seconds it took, the seconds it announced before its work (``expected_seconds``, neighbourhood) and the largest
ratio between the time left that a progress bar estimates (elapsed / steps done * steps left) and the time that
was left, over every record after the first tenth of the check's steps and before its last second (a bar shows whole
seconds), with where it was (the fraction of the steps, the estimate and the time left). ``--profile`` prints the timed
verification's seconds by phase (cProfile, cumulative); ``--screen-pairs 512 128`` runs it once per value,
side by side (the same training batches in each run), with each check's verdict and seconds and the neighbourhood
check's best scored move per group; ``--sequential`` runs it once more with every held-out test complete (no
interim look of the sequential test), side by side.

    python benchmarks/bench_verification.py [--epochs 15] [--resize 16] [--candidates 64] [--examples 256] [--threads 1]
        [--skip screen race power verify] [--race-pairs 512] [--race-z 3 1.5 1] [--trials 100] [--profile]
        [--screen-pairs 512 128] [--sequential]

With ``--run FOLDER`` (a finished study folder: ``neuralign demo --out FOLDER``, ``neuralign study --preset cpu``; its
data loaded as the study loads it) it asks instead why that run's neighbourhood check flagged moves in pair 1: for its
flagged random controls and the best flagged move of each of the first groups, the change of the held-out data term
(the check's examples, ``train_eval``) and of the test split (never used by the check), the variance of the held-out
batches' mean changes, and the test split's, over what independent examples predict (batch norm couples a batch's
examples: > 1 would make the test too liberal), the run's curve's held-out data term at t = 0, 0.25, 0.5, 0.75, 1, and
the same after fitting that curve ``--refit-epochs`` more epochs (the moves re-scored); then the run's curve fitted
again with the run's seeds and Garipov's decaying learning rate instead of the preset's, and the run's neighbourhood
check on it (its options and seeds) beside the run's own.

    python benchmarks/bench_verification.py --run /tmp/demo [--refit-epochs 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from neuralign.alignment import align, apply_permutation, trace_spec
from neuralign.curves import fit_curve
from neuralign.curves.problem import CurvePermutationProblem
from neuralign.experiments.data import load_data
from neuralign.experiments.models import build_model
from neuralign.experiments.training import train_model
from neuralign.study.config import PRESETS
from neuralign.verification import verify_alignment
from neuralign.verification._moves import MoveSet
from neuralign.verification.local import _Context, _Meter, _Screen, _screen_group, _swap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of each end point (demo: 15)")
    parser.add_argument("--resize", type=int, default=16,
                        help="image side (demo: 16; 32 gives TinyTen the feature maps it has on CIFAR-10)")
    parser.add_argument("--candidates", type=int, default=64, help="transpositions timed per group")
    parser.add_argument("--examples", type=int, default=256, help="screening examples (the default screen)")
    parser.add_argument("--top", type=int, default=8, help="best transpositions compared (n_swaps)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=(), choices=("screen", "race", "power", "verify"),
                        help="parts to leave out")
    parser.add_argument("--race-z", type=float, nargs="*", default=[3.0, 1.5, 1.0],
                        help="power: the race's elimination rule at each of these z, side by side")
    parser.add_argument("--trials", type=int, default=100, help="power: planted candidates per group and effect")
    parser.add_argument("--race-pairs", type=int, default=512, help="screen_pairs of the race")
    parser.add_argument("--sequential", action="store_true",
                        help="the timed verification also without the sequential tests' interim looks, side by side")
    parser.add_argument("--profile", action="store_true", help="profile the timed verify_alignment by phase")
    parser.add_argument("--screen-pairs", type=int, nargs="*", default=None,
                        help="the timed verify_alignment once per value of screen_pairs, side by side (default: the "
                             "demo's)")
    parser.add_argument("--run", help="a finished `neuralign demo --out` folder: why were its moves flagged?")
    parser.add_argument("--refit-epochs", type=int, default=6, help="with --run: further epochs of its curve")
    args = parser.parse_args()
    least = {"epochs": 1, "resize": 8, "candidates": 1, "examples": 1, "top": 1, "threads": 1, "race_pairs": 1,
             "trials": 1, "refit_epochs": 0}
    for name, low in least.items():
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if not args.race_z:
        parser.error("--race-z needs at least one threshold")
    torch.set_num_threads(args.threads)
    if args.run:
        flagged_moves(args.run, args.refit_epochs)
        return
    data = load_data("digits", batch_size=64, resize=args.resize, generator=0)
    nets = []
    for seed in (1, 2):
        model = build_model("tinyten", 10, in_channels=1, generator=seed)
        model.load_state_dict(train_model(model, data.train, epochs=args.epochs, generator=seed).state_dict)
        nets.append(model.eval())
    a, b = nets
    spec = trace_spec(a, next(iter(data.train))[0][:2])
    perms = align(a, b, data.align, spec=spec).perms
    aligned = apply_permutation(b.state_dict(), spec, perms)
    curve = fit_curve(a, a.state_dict(), aligned, data.train, epochs=2, generator=0).curve
    prob = CurvePermutationProblem(a, a.state_dict(), aligned, spec, data.train, heldout_loader=data.train_eval,
                                   value_batches=4, value_ts=(0.5,))  # fmt: skip
    ctx = _Context(prob, [prob.start_offset(curve)], spec)
    xs, ys = zip(*[(x, y) for x, y in data.train_eval])
    batch = (torch.cat(xs)[: args.examples], torch.cat(ys)[: args.examples])
    ts = [0.5]
    new = _Screen(ctx, batch, ts)
    side = f"{args.resize}x{args.resize}"
    print(f"TinyTen on digits {side}, {args.examples} screening examples, {args.threads} thread(s)")
    if "screen" not in args.skip:
        compare_screens(ctx, spec, batch, ts, args.candidates)
        compare_layouts(ctx, spec, args.candidates)
    if "race" not in args.skip:
        race(ctx, new, args.top, args.race_pairs)
    if "power" not in args.skip:
        power(ctx, batch, args.top, args.race_z, args.trials)
        neutral(args.top, args.race_z)
    if "verify" not in args.skip:
        runs = {f"screen_pairs {pairs}": timed_verification(a, b, perms, curve, spec, data, args.profile, pairs)
                for pairs in args.screen_pairs or [PRESETS["demo"].verification.screen_pairs]}  # fmt: skip
        if args.sequential:
            # the same run with every held-out test on all the held-out examples (no interim look)
            looks = _Context.looks
            _Context.looks = property(lambda self: ())
            try:
                runs["every test complete"] = timed_verification(a, b, perms, curve, spec, data)
            finally:
                _Context.looks = looks
        if len(runs) > 1:
            side_by_side(runs)


def compare_screens(ctx, spec, batch, ts, candidates) -> None:
    dense, chained = _Screen(ctx, batch, ts, chains=False), _Screen(ctx, batch, ts)
    ways = {"whole": dense._one_by_one, "vmap": dense._batched, "chain": chained._one_by_one,
            "chain+vmap": chained._batched}  # fmt: skip
    print(f"{'group':18} {'n':>3} " + " ".join(f"{w + ' s':>12}" for w in ways) + f" {'ratio':>6} {'max |diff|':>10}")
    totals = dict.fromkeys(ways, 0.0)
    best = [0.0, 0.0]
    for g, n in spec.sizes.items():
        pairs = torch.triu_indices(n, n, offset=1).t().tolist()[:candidates]
        cands = [_swap(n, i, j) for i, j in pairs]
        seconds, values = {}, {}
        for name, way in ways.items():
            started = time.perf_counter()
            values[name] = way(g, cands, 0)
            seconds[name] = time.perf_counter() - started
            totals[name] += seconds[name]
        before, after = min(seconds["whole"], seconds["vmap"]), min(seconds["chain"], seconds["chain+vmap"])
        best[0] += before
        best[1] += after
        diff = max(float((values[a] - values["whole"]).abs().max()) for a in ways)
        chain = "" if chained.ctx.problem.chain(g) else "  (no chain: the same way)"
        print(f"{g:18} {n:>3} " + " ".join(f"{seconds[w]:12.2f}" for w in ways) +
              f" {before / after:6.2f} {diff:10.2e}{chain}")  # fmt: skip
    print(f"{'all groups':22} " + " ".join(f"{totals[w]:12.2f}" for w in ways))
    print(f"{'the faster way of each kind, all groups':48} {best[0]:8.2f} -> {best[1]:.2f} s: {best[0] / best[1]:.2f}x")


def compare_layouts(ctx, spec, candidates) -> None:
    """Per group, ``candidates`` transpositions scored as the held-out test scores them (through the group's chain,
    one at a time, on every held-out batch), with the curve's points in channels-last memory format (the default)
    and in the contiguous one, side by side (alternating which runs first), and the largest difference."""
    prob = ctx.problem
    screens = {flag: _Screen(ctx, list(prob.value_set), prob.value_ts, channels_last=flag) for flag in (True, False)}
    print(f"\nheld-out scoring of {candidates} transpositions per group ({len(prob.value_set)} batches of "
          f"{prob.value_set[0][0].shape[0]}): channels-last against contiguous memory format")
    print(f"{'group':18} {'n':>3} {'channels-last s':>15} {'contiguous s':>13} {'ratio':>6} {'max |diff|':>10}")
    totals = dict.fromkeys(screens, 0.0)
    for index, (g, n) in enumerate(spec.sizes.items()):
        cands = [_swap(n, i, j) for i, j in torch.triu_indices(n, n, offset=1).t().tolist()[:candidates]]
        seconds, values = {}, {}
        for flag in (True, False) if index % 2 == 0 else (False, True):
            started = time.perf_counter()
            values[flag] = torch.cat([screens[flag]._one_by_one(g, cands, part) for part in range(len(prob.value_set))],
                                     dim=1)  # fmt: skip
            seconds[flag] = time.perf_counter() - started
            totals[flag] += seconds[flag]
        diff = float((values[True] - values[False]).abs().max())
        print(f"{g:18} {n:>3} {seconds[True]:15.2f} {seconds[False]:13.2f} {seconds[False] / seconds[True]:6.2f} "
              f"{diff:10.2e}")  # fmt: skip
    print(f"{'all groups':22} {totals[True]:15.2f} {totals[False]:13.2f} {totals[False] / totals[True]:6.2f}")


def race(ctx, screen, top, screen_pairs) -> None:
    """Per coordinate with more than ``top`` transpositions: the exhaustive screen (every transposition on every
    slice of the screening set) against the race of the neighbourhood check (``_screen_group``, no controls): the
    fraction of the exhaustive screen's ``top`` best that the race ranks among its ``top`` best ('*' where the best
    move differs), the candidates left in the race on each slice, the seconds of both and their ratio; then the
    linearised screen (``_Screen.linearised``, where the group has a chain) against the exhaustive screen: the
    correlation of their mean changes, how many of the exhaustive screen's ``top`` best are among its ``top``,
    ``2 * top`` (the demo preset races its 16 best) and ``screen_pairs`` best (``--race-pairs``; the default races its
    512 best), and its seconds."""
    print(f"\nthe race against the exhaustive screen on {screen.examples} examples (top {top}; slices "
          f"{[s.stop - s.start for s in screen.slices]})")
    print(f"{'group':18} {'pairs':>5} {'overlap':>8} {'full s':>7} {'race s':>7} {'ratio':>6}  left in the race")
    options = SimpleNamespace(n_swaps=top, n_control_swaps=0, screen_pairs=screen_pairs, callback=None)
    total = [0.0, 0.0]
    linear = []
    for c in ctx.coordinates:
        moves = MoveSet(ctx.spec, c)
        if moves.count <= top:
            continue
        changes = [moves.changes(k) for k in range(moves.count)]
        started = time.perf_counter()
        full = torch.cat([torch.cat([screen(c.label, changes[lo:lo + screen.chunk(p)], p)
                                     for lo in range(0, moves.count, screen.chunk(p))])
                          for p in range(len(screen.slices))], dim=1).mean(1)  # fmt: skip
        middle = time.perf_counter()
        chosen, raced = _screen_group(c.label, moves, torch.arange(moves.count), screen, options,
                                      torch.Generator().manual_seed(0), _Meter(options))  # fmt: skip
        end = time.perf_counter()
        best = torch.argsort(full, stable=True)[:top]
        index = {moves[k].where: k for k in range(moves.count)}
        mine = [index[m.where] for m, _ in chosen]
        same = "*" if mine[0] != int(best[0]) else " "
        total[0] += middle - started
        total[1] += end - middle
        print(f"{c.label:18} {moves.count:>5} {len(set(best.tolist()) & set(mine)) / top:7.2f}{same} "
              f"{middle - started:7.2f} {end - middle:7.2f} {(middle - started) / (end - middle):6.2f}  {raced}")
        started = time.perf_counter()
        lin = screen.linearised(moves)
        if lin is not None:
            order = torch.argsort(lin, stable=True).tolist()
            kept = set(best.tolist())
            linear.append((c.label, float(torch.corrcoef(torch.stack([lin, full]))[0, 1]), len(kept & set(order[:top])),
                           len(kept & set(order[:2 * top])), len(kept & set(order[:screen_pairs])),
                           time.perf_counter() - started))  # fmt: skip
    print(f"{'all groups':24} {'':>8} {total[0]:7.2f} {total[1]:7.2f} {total[0] / total[1]:6.2f}")
    print(f"\nthe linearised screen against the exhaustive screen (top {top})")
    print(f"{'group':18} {'corr':>6} {f'in top {top}':>10} {f'in top {2 * top}':>10} {f'in top {screen_pairs}':>11} "
          f"{'lin s':>7}")
    for label, corr, within, within2, within_pairs, seconds in linear:
        print(f"{label:18} {corr:6.3f} {within:>10} {within2:>10} {within_pairs:>11} {seconds:7.2f}")


class _Values:
    """A screen that returns given per-example changes (``(candidates, examples)``) with the interface
    :func:`_screen_group` uses, counting the candidate-examples it returns."""

    def __init__(self, values, slices):
        self.values, self.slices, self.seconds, self.evaluated, self.hit = values, slices, {}, 0, False
        self.examples = self.local = values.shape[1]

    def chunk(self, part):
        return self.values.shape[0]

    def __call__(self, label, ks, part):
        s = self.slices[part]
        self.seconds[label] = 0.0
        self.evaluated += len(ks) * (s.stop - s.start)
        return self.values[torch.tensor(ks)][:, s]


def power(ctx, batch, top, zs, trials, candidates=512, effects=(1.0, 2.0, 3.0, 4.0), prefixes=(64, 128)) -> None:
    """The race's power against the exhaustive screen's: per coordinate, the screen's per-example changes of its
    first ``candidates`` transpositions (every slice, at the demo's ``value_ts``) are computed once; then, in
    each of ``trials`` seeded trials, one of them (drawn uniformly) is made better by ``effect`` standard errors of
    the screen (its change lowered by that amount on every example; the standard error of a candidate's mean
    change over all the examples, the median over the candidates) and the screen either ranks it among its
    ``top`` best or not: the fraction of trials it does, for the exhaustive screen (every candidate on every
    example), for an exhaustive screen on fewer examples (the first ``prefixes``: a quarter and half the cost) and
    for the race (:func:`_screen_group`) with each elimination threshold ``z``, with the race's candidate-examples
    as a fraction of the exhaustive screen's (in brackets)."""
    from neuralign.verification import local

    screen = _Screen(ctx, batch, PRESETS["demo"].verification.value_ts)
    options = SimpleNamespace(n_swaps=top, n_control_swaps=0, screen_pairs=candidates, callback=None)
    print(f"\npower: a planted better transposition ranked among the {top} best, exhaustive screen against the race "
          f"({trials} trials per cell; [candidate-examples of the race / the exhaustive screen's])")
    zs = list(zs)
    header = "  ".join(f"{'race z=' + format(z, 'g'):>13}" for z in zs)
    fewer = " ".join(f"{'first ' + str(e):>9}" for e in prefixes)
    print(f"{'group':18} {'moves':>5} {'se':>8} {'effect':>6} {'exhaustive':>10} {fewer}  {header}")
    gen = torch.Generator().manual_seed(0)
    rule = local._RACE_Z
    totals = {e: [0.0] * (len(zs) + 1) for e in effects}
    totals_fewer = {e: [0.0] * len(prefixes) for e in effects}
    cost = [0.0] * len(zs)
    groups = 0
    try:
        for c in ctx.coordinates:
            moves = MoveSet(ctx.spec, c)
            if moves.count <= top:
                continue
            n = min(moves.count, candidates)
            changes = [moves.changes(k) for k in range(n)]
            values = torch.cat([torch.cat([screen(c.label, changes[lo:lo + screen.chunk(p)], p)
                                           for lo in range(0, n, screen.chunk(p))])
                                for p in range(len(screen.slices))], dim=1)  # fmt: skip
            se = float((values.std(1) / values.shape[1] ** 0.5).median())
            groups += 1
            for effect in effects:
                hits, spent, short = [0] * (len(zs) + 1), [0] * len(zs), [0] * len(prefixes)
                for _ in range(trials):
                    k = int(torch.randint(n, (1,), generator=gen))
                    planted = values.clone()
                    planted[k] -= effect * se
                    hits[0] += k in torch.argsort(planted.mean(1), stable=True)[:top].tolist()
                    for i, e in enumerate(prefixes):
                        short[i] += k in torch.argsort(planted[:, :e].mean(1), stable=True)[:top].tolist()
                    for i, z in enumerate(zs):
                        local._RACE_Z = z
                        fake = _Values(planted, screen.slices)
                        chosen, _ = _screen_group(c.label, _Indexed(n), torch.arange(n), fake, options,
                                                  torch.Generator().manual_seed(0), _Meter(options))  # fmt: skip
                        hits[i + 1] += k in [m.where[0] for m, _ in chosen]
                        spent[i] += fake.evaluated / planted.numel()
                cells = "  ".join(f"{hits[i + 1] / trials:5.2f} [{spent[i] / trials:4.2f}]" for i in range(len(zs)))
                few = " ".join(f"{h / trials:9.2f}" for h in short)
                print(f"{c.label:18} {n:>5} {se:8.2e} {effect:5g}x {hits[0] / trials:10.2f} {few}  {cells}")
                for i in range(len(zs) + 1):
                    totals[effect][i] += hits[i] / trials
                for i in range(len(prefixes)):
                    totals_fewer[effect][i] += short[i] / trials
                for i in range(len(zs)):
                    cost[i] += spent[i] / trials / len(effects)
    finally:
        local._RACE_Z = rule
    for effect in effects:
        cells = "  ".join(f"{totals[effect][i + 1] / groups:5.2f} [{cost[i] / groups:4.2f}]" for i in range(len(zs)))
        few = " ".join(f"{h / groups:9.2f}" for h in totals_fewer[effect])
        print(f"{'mean over groups':33} {effect:5g}x {totals[effect][0] / groups:10.2f} {few}  {cells}")


def neutral(top, zs, trials=200, count=2016, examples=256, effect=3.0) -> None:
    """The race's power on a synthetic screen larger than the demo pair's groups: ``count`` neutral candidates
    (change 0, per-example noise 0.5), one made better by ``effect`` standard errors of the mean over ``examples``,
    no ``screen_pairs`` cap; over ``trials`` seeded trials, how often the exhaustive screen and the race at each
    ``z`` rank it among the ``top`` best, and the race's share of the candidate-examples."""
    from neuralign.verification import local

    options = SimpleNamespace(n_swaps=top, n_control_swaps=0, screen_pairs=count, callback=None)
    slices = local._slices(examples)
    found, spent = [0] * (len(zs) + 1), [0.0] * len(zs)
    rule = local._RACE_Z
    try:
        for seed in range(trials):
            gen = torch.Generator().manual_seed(1000 + seed)
            means = torch.zeros(count, dtype=torch.float64)
            k = int(torch.randint(count, (1,), generator=gen))
            means[k] = -effect * 0.5 / examples**0.5
            values = means[:, None] + 0.5 * torch.randn(count, examples, generator=gen, dtype=torch.float64)
            found[0] += k in torch.argsort(values.mean(1), stable=True)[:top].tolist()
            for i, z in enumerate(zs):
                local._RACE_Z = z
                fake = _Values(values, slices)
                chosen, _ = _screen_group("g", _Indexed(count), torch.arange(count), fake, options,
                                          torch.Generator().manual_seed(0), _Meter(options))  # fmt: skip
                found[i + 1] += k in [m.where[0] for m, _ in chosen]
                spent[i] += fake.evaluated / values.numel() / trials
    finally:
        local._RACE_Z = rule
    cells = "  ".join(f"z={z:g}: {found[i + 1]} [{spent[i]:.2f}]" for i, z in enumerate(zs))
    print(f"\n{count} neutral synthetic candidates, one {effect:g} standard errors better ({trials} seeded trials): "
          f"ranked among the {top} best by the exhaustive screen in {found[0]}; by the race {cells}")


class _Indexed:
    """Moves named by their index (the values' rows), for :func:`_screen_group` on :class:`_Values`."""

    def __init__(self, count):
        self.count = count

    def changes(self, k):
        return k

    def __getitem__(self, k):
        from neuralign.verification._moves import Move

        return Move("swap", (k, k + 1))


def timed_verification(a, b, perms, curve, spec, data, profile=False, screen_pairs=None):
    """``verify_alignment`` with the demo's options (``screen_pairs`` changed if given), timed: returns the report
    and its seconds per check."""
    options = PRESETS["demo"].verification
    options = options if screen_pairs is None else options.replace(screen_pairs=screen_pairs)
    records: list[tuple[float, dict]] = []
    data.train.generator.manual_seed(0)  # the same training batches (curve fit, screening set) in every run
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    report = verify_alignment(a, a.state_dict(), b.state_dict(), perms, data.train, curve=curve, spec=spec,
                              heldout_loader=data.train_eval, align_loader=data.align,
                              options=options, generator=0,
                              callback=lambda r: records.append((time.perf_counter(), r)))  # fmt: skip
    print(f"\nverify_alignment with the demo's options, screen_pairs {options.screen_pairs}: "
          f"{time.perf_counter() - started:.1f} s, verdict {report.verdict}")
    rows = report.checks["neighbourhood"].details["per_group"].values()
    scored = sum(r["tested"] + r["regulariser_only"] for r in rows)
    print(f"neighbourhood: {sum(r['stopped_early'] for r in rows)} of {scored} scored moves stopped early; "
          "candidates in the race per slice: "
          + "; ".join(str(r["raced"]) for r in rows if "raced" in r))
    if profile:
        profiler.disable()
        phases(profiler)
    print(f"{'check':14} {'seconds':>8} {'expected':>8} {'worst ETA ratio after 1/10':>27} {'at step':>8} "
          f"{'its ETA s':>9} {'left s':>7}")
    seconds = {}
    for name in report.checks:
        mine = [(t, r) for t, r in records if r["check"] == name]
        begin, end = mine[0][0], mine[-1][0]
        expected = next((r["expected_seconds"] for _, r in mine if "expected_seconds" in r), float("nan"))
        worst, at = 1.0, (float("nan"),) * 3
        for t, r in mine:
            total, step = r["total"], r["step"]
            # a bar shows whole seconds: the last second of a check is not judged
            if not total or step < total / 10 or step >= total or end - t < 1.0:
                continue
            eta = (t - begin) / step * (total - step)
            if max(eta / (end - t), (end - t) / eta) > worst:
                worst, at = max(eta / (end - t), (end - t) / eta), (step / total, eta, end - t)
        print(f"{name:14} {end - begin:8.2f} {expected:8.2f} {worst:27.2f} {at[0]:8.2f} {at[1]:9.1f} {at[2]:7.1f}")
        seconds[name] = end - begin
    return report, seconds


def side_by_side(runs) -> None:
    """The timed runs (per ``screen_pairs``, and without interim looks): each check's verdict and seconds, and per
    group of the neighbourhood check its best scored move and count of significant improvements."""
    keys = list(runs)
    print(f"\nside by side, {' / '.join(map(str, keys))}")
    for name in runs[keys[0]][0].checks:
        verdicts = " / ".join(runs[k][0].checks[name].verdict for k in keys)
        times = " / ".join(f"{runs[k][1][name]:.2f}" for k in keys)
        ratio = runs[keys[0]][1][name] / max(runs[keys[-1]][1][name], 1e-9)
        print(f"{name:14} {verdicts:24} seconds {times:20} ratio {ratio:.2f}")
    total = [sum(runs[k][1].values()) for k in keys]
    print(f"{'all checks':14} {'':24} seconds {' / '.join(f'{t:.2f}' for t in total):20} ratio "
          f"{total[0] / total[-1]:.2f}")
    checks = [runs[k][0].checks["neighbourhood"].details for k in keys]
    for g in checks[0]["per_group"]:
        best = " / ".join(c["best_move"].get(g, "-") for c in checks)
        found = " / ".join(str(c["per_group"][g]["improving"]) for c in checks)
        change = " / ".join(f"{c['per_group'][g]['best_change']:.2e}" for c in checks)
        print(f"  {g:16} best move {best:40} its change {change:22} significant {found}")


def phases(profiler) -> None:
    """Cumulative seconds of the verification's phases (functions of neuralign.verification and of the curve
    problem), from the profile of the timed run."""
    import pstats

    stats = pstats.Stats(profiler).stats
    wanted = ("_check_", "_screen_group", "_first_stage", "_Screen.__call__", "_batched", "_one_by_one", "losses",
              "delta", "gradient_at", "fit_curve", "curve_pam", "_refit", "taylor_test", "data_term", "pam",
              "linearised", "_through_chain", "move_costs", "search", "batch_values")
    rows = []
    for (path, _, name), (_, calls, _, cumulative, _) in stats.items():
        if ("neuralign" in path) and any(w.split(".")[-1] == name or name.startswith(w) for w in wanted):
            rows.append((cumulative, calls, f"{path.split('neuralign/')[-1]}:{name}"))
    print(f"\n{'cumulative s':>12} {'calls':>7}  phase")
    for cumulative, calls, where in sorted(rows, reverse=True)[:25]:
        print(f"{cumulative:12.2f} {calls:7d}  {where}")


def flagged_moves(run: str, refit_epochs: int) -> None:
    import json
    from pathlib import Path

    from neuralign.alignment.io import load_permutation_file
    from neuralign.curves import Bezier
    from neuralign.experiments.checkpoints import load_endpoint
    from neuralign.verification._moves import Move, coordinates, move_changes

    folder = Path(run)
    report = json.loads((folder / "pair1" / "verification.json").read_text())
    config = json.loads((folder / "manifest.json").read_text())["config"]
    found = report["checks"]["neighbourhood"]["details"]["improving_moves"]
    moves = [(g, m) for g, ms in found.items() for m in ms if m[3] == "control"]
    moves += [(g, ms[0]) for g, ms in found.items() if ms][:4]
    a = load_endpoint(folder / "endpoints" / "seed1.pt")[0]
    b = load_endpoint(folder / "endpoints" / "seed2.pt")[0]
    perms = load_permutation_file(folder / "pair1" / "alignment.pt").perms
    curve = Bezier.load(folder / "pair1" / "curve_aligned.pt")
    # the run's data, loaded as its study loads it (any study folder: the demo's digits, the cpu preset's CIFAR-10)
    from neuralign.study.config import StudyConfig
    from neuralign.study.runner import _Study

    data = _Study(StudyConfig.from_dict(config), folder, torch.device("cpu"), None).data
    spec = trace_spec(a, next(iter(data.train))[0][:2])
    sa = a.state_dict()
    aligned = apply_permutation(b.state_dict(), spec.restrict(b.state_dict()), perms)
    coordinate = {c.label: c for c in coordinates(spec)}
    verification = config["verification"]

    def context(loader, batches, crv, ts=tuple(verification["value_ts"])):
        prob = CurvePermutationProblem(a, sa, aligned, spec, data.train, heldout_loader=loader, value_batches=batches,
                                       value_ts=ts, weight_decay=verification["weight_decay"])  # fmt: skip
        return _Context(prob, [prob.start_offset(crv)], spec)

    for label, crv in (("the run's curve", curve), (f"fitted {refit_epochs} epochs more", None)):
        if crv is None:
            started = time.perf_counter()
            crv = fit_curve(a, sa, aligned, data.train, curve=curve, epochs=refit_epochs, generator=0).curve
            print(f"\n(fitted {refit_epochs} more epochs in {time.perf_counter() - started:.0f} s)")
        held = context(data.train_eval, verification["value_batches"], crv)
        test = context(data.test, 10**6, crv)
        along = [held.data_term(t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
        print(f"\n{label}: held-out data term at t = 0, 0.25, 0.5, 0.75, 1: " + ", ".join(f"{v:.4f}" for v in along))
        print(f"{'group':16} {'move':10} {'kind':8} {'held-out change':>20} {'test change':>20} "
              f"{'batch var ratio (held-out, test)':>33}")

        def batch_ratio(ctx, changes) -> float:
            # over the full batches (a last, smaller batch's mean varies more)
            d = ctx.losses(changes)[0] - ctx.base_losses()[0]
            sizes = [x[0].shape[0] for x in ctx.problem.value_set]
            means = torch.stack([v.mean() for v, n in zip(d.split(sizes), sizes) if n == sizes[0]])
            return float(means.var() / (d.var() / sizes[0]))

        for g, m in moves:
            changes = move_changes(spec, coordinate[g], Move(m[0], tuple(m[1])))
            h, t = held.delta(changes), test.delta(changes)
            print(f"{g:16} {str(m[1]):10} {m[3]:8} {h.change:11.4f} ± {h.se:6.4f} {t.change:11.4f} ± {t.se:6.4f} "
                  f"{batch_ratio(held, changes):16.2f} {batch_ratio(test, changes):16.2f}")
    # the run's curve again, with the run's seeds (as the study's curve stage draws them) and Garipov's decaying
    # learning rate instead of the preset's; then the run's neighbourhood check on it
    from functools import partial

    from neuralign._utils import stable_seed
    from neuralign.curves.fit import garipov_lr_factor

    epochs, lr, seed = config["curve"]["epochs"], config["curve"]["lr"], config["seed"]
    data.train.generator.manual_seed(stable_seed(seed, "curve-data", 1, "aligned"))
    params = {k: v for k, v in sa.items() if k in dict(a.named_parameters())}
    refit = fit_curve(a, params, {k: aligned[k] for k in params}, data.train, epochs=epochs,
                      generator=stable_seed(seed, "curve", 1, "aligned"),
                      lr_lambda=partial(garipov_lr_factor, epochs=epochs),
                      optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True)).curve  # fmt: skip
    held = context(data.train_eval, verification["value_batches"], refit)
    print("\nthe run's curve fitted again with Garipov's schedule: held-out data term at t = 0, 0.25, 0.5, 0.75, 1: "
          + ", ".join(f"{held.data_term(t):.4f}" for t in (0.0, 0.25, 0.5, 0.75, 1.0)))
    # the run's neighbourhood check (its options, seeds and screening batches) on that curve
    data.train.generator.manual_seed(stable_seed(seed, "verify-data", 1))
    check = verify_alignment(a, sa, b.state_dict(), perms, data.train, curve=refit, spec=spec,
                             heldout_loader=data.train_eval, options=StudyConfig.from_dict(config).verification,
                             checks=("neighbourhood",), generator=stable_seed(seed, "verify", 1))  # fmt: skip
    print(f"neighbourhood check on the curve fitted with Garipov's schedule: "
          f"{check.checks['neighbourhood'].summary}")
    print(f"neighbourhood check on the run's curve (its report): {report['checks']['neighbourhood']['summary']}")


if __name__ == "__main__":
    main()
