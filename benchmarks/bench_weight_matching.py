"""Benchmark: weight matching (Git Re-Basin, Alg. 1) against the PyPI package ``rebasin`` 0.0.47, side by side.

For torchvision ResNet-18, MobileNetV2 and ResNet-50 with random weights (seeded), one thread, in one process:

* two independent initialisations: the objective :math:`\\sum_\\ell \\langle W^A_\\ell, \\Pi(W^B)_\\ell\\rangle` over
  all parameters of the aligned B (computed the same way for both tools, in float64), the time, and whether the
  aligned B still computes B's function (relative error of its logits on a seeded batch; a permutation of hidden
  units keeps them up to float32 rounding);
* a planted problem (B = A with its units randomly permuted): the largest weight error |A - aligned B| (0 when the
  planted permutation is recovered), the objective and the time.

rebasin groups a depthwise convolution's output channels apart from its input channels (MobileNetV2), so its
permutations there change B's function. For such models ours is also run on that relaxed grouping
(``neuralign rb-groups``): the same freedom for both, to compare the optimisers.

Times include tracing the model (``trace_spec`` / rebasin's graph) and applying the permutation; the ratio is ours
over rebasin's, both timed back to back on the same machine. With ``--extra`` (the default) ours is also run with
``tol=0`` (to a coordinate-wise optimum) and, on the models in ``--restart-models``, with ``restarts=4`` (the greedy
run first, then random starts: the objective of every run).

    python benchmarks/bench_weight_matching.py [--models resnet18 mobilenet_v2 resnet50] [--no-extra]

``rebasin`` is optional and not a dependency of the project; without it the benchmark says so and runs ours alone.
To install it without letting pip touch torch: ``pip install --no-deps rebasin==0.0.47 torchview graphviz``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torchvision  # noqa: E402

from neuralign.alignment import (  # noqa: E402
    PermutationSpec,
    Segment,
    align,
    apply_permutation,
    random_permutation,
    trace_spec,
)
from neuralign.optim import solve_assignment  # noqa: E402

try:
    from rebasin import PermutationCoordinateDescent
except ImportError:  # optional: the benchmark then runs ours alone
    PermutationCoordinateDescent = None

EXAMPLE = (2, 3, 32, 32)


def _objective(a: torch.nn.Module, aligned: dict[str, torch.Tensor]) -> float:
    """:math:`\\sum \\langle W^A, W^B_{aligned}\\rangle` over every parameter of A, in float64."""
    sa = a.state_dict()
    return sum(float((sa[k].double() * aligned[k].double()).sum()) for k, _ in a.named_parameters())


def _max_error(a: torch.nn.Module, aligned: dict[str, torch.Tensor]) -> float:
    sa = a.state_dict()
    return max(float((sa[k] - aligned[k]).abs().max()) for k, _ in a.named_parameters())


def _function_error(arch: str, b: torch.nn.Module, aligned: dict[str, torch.Tensor]) -> float:
    """Relative L2 error of the aligned B's logits against B's on a seeded batch (eval mode)."""
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(123))
    c = getattr(torchvision.models, arch)().eval()
    c.load_state_dict(aligned)
    with torch.no_grad():
        y, z = b(x), c(x)
    return float((z - y).norm() / y.norm())


def _ours(a, b, **options) -> tuple[dict[str, torch.Tensor], float, object]:
    start = time.perf_counter()
    res = align(a, b, method="weight", example_input=torch.zeros(EXAMPLE), generator=0, **options)
    aligned = apply_permutation(b.state_dict(), res.spec, res.perms)
    return aligned, time.perf_counter() - start, res


def _rebasin(a, b) -> tuple[dict[str, torch.Tensor], float]:
    moved = copy.deepcopy(b)
    torch.manual_seed(0)  # rebasin draws its group orders from the global generator
    start = time.perf_counter()
    PermutationCoordinateDescent(a, moved, torch.zeros(EXAMPLE)).rebasin()
    return moved.state_dict(), time.perf_counter() - start


def _depthwise_apart(model: torch.nn.Module, spec: PermutationSpec) -> PermutationSpec | None:
    """``spec`` with each depthwise convolution's output channels (and its batch norm, and the next convolution's
    input channels) in a group of their own, as rebasin groups them; None without a depthwise convolution. Not a
    relabelling of hidden units: channel ``i`` of a depthwise convolution reads only its input channel ``i``."""
    modules = list(model.named_modules())
    sizes, axes = dict(spec.sizes), {k: dict(v) for k, v in spec.axes.items()}
    for i, (name, m) in enumerate(modules):
        if isinstance(m, torch.nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels:
            group, own = f"{name}.out", (Segment(f"{name}.out", m.out_channels),)
            sizes[group] = m.out_channels
            norm = next(n for n, x in modules[i + 1 :] if isinstance(x, torch.nn.BatchNorm2d))
            after = next(n for n, x in modules[i + 1 :] if isinstance(x, torch.nn.Conv2d))
            axes[f"{name}.weight"][0] = own
            for key in ("weight", "bias", "running_mean", "running_var"):
                axes[f"{norm}.{key}"][0] = own
            axes[f"{after}.weight"][1] = own
    return PermutationSpec(sizes=sizes, axes=axes) if len(sizes) > len(spec.sizes) else None


def _row(model, case, tool, objective, error, func, seconds, ratio=None, note=""):
    ratio_text = f"{ratio:6.2f}" if ratio is not None else "      "
    print(
        f"{model:13s} {case:11s} {tool:20s} {objective:12.2f} {error:10.3g} {func:10.2g} {seconds:8.2f} {ratio_text}"
        f" {note}",
        flush=True,
    )


def _warm_up() -> None:
    """First calls import scipy and select kernels; neither tool should pay for them in the table."""
    solve_assignment(torch.eye(2), maximize=True)
    a, b = torchvision.models.resnet18().eval(), torchvision.models.resnet18().eval()
    with warnings.catch_warnings():  # one sweep does not converge; that is the point of a warm-up
        warnings.simplefilter("ignore")
        align(a, b, method="weight", example_input=torch.zeros(EXAMPLE), max_iter=1)
    if PermutationCoordinateDescent is not None:
        PermutationCoordinateDescent(a, copy.deepcopy(b), torch.zeros(EXAMPLE)).calculate_permutations(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "resnet50"])
    parser.add_argument("--no-extra", dest="extra", action="store_false", help="skip the tol=0 and restart runs")
    parser.add_argument("--restart-models", nargs="*", default=["resnet18", "mobilenet_v2"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if PermutationCoordinateDescent is None:
        print(
            "rebasin is not installed: ours alone (pip install --no-deps rebasin==0.0.47 torchview graphviz to compare)"
        )
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}")
    _warm_up()
    print(
        f"{'model':13s} {'case':11s} {'tool':20s} {'objective':>12s} {'max |dW|':>10s} {'f rel err':>10s} "
        f"{'time s':>8s} {'ours/rb':>6s}"
    )
    for arch in args.models:
        torch.manual_seed(0)
        a = getattr(torchvision.models, arch)().eval()
        torch.manual_seed(1)
        b = getattr(torchvision.models, arch)().eval()
        spec = trace_spec(a, torch.zeros(EXAMPLE))
        planted = copy.deepcopy(a)
        planted.load_state_dict(apply_permutation(a.state_dict(), spec, random_permutation(spec, generator=2)))
        for case, other in (("independent", b), ("planted", planted)):
            err = functools.partial(_max_error, a) if case == "planted" else (lambda s: float("nan"))
            ours, t_ours, res = _ours(a, other)
            note = f"{res.n_iter} sweeps"
            values = (_objective(a, ours), err(ours), _function_error(arch, other, ours))
            if PermutationCoordinateDescent is None:
                _row(arch, case, "neuralign", *values, t_ours, note=note)
                continue
            theirs, t_theirs = _rebasin(a, other)
            _row(arch, case, "neuralign", *values, t_ours, t_ours / t_theirs, note=note)
            _row(
                arch,
                case,
                "rebasin 0.0.47",
                _objective(a, theirs),
                err(theirs),
                _function_error(arch, other, theirs),
                t_theirs,
            )
        relaxed = _depthwise_apart(a, spec)
        if relaxed is not None:
            start = time.perf_counter()
            res = align(a, b, method="weight", spec=relaxed, generator=0)
            ours = apply_permutation(b.state_dict(), relaxed, res.perms)
            seconds = time.perf_counter() - start
            values = (_objective(a, ours), float("nan"), _function_error(arch, b, ours))
            _row(arch, "independent", "neuralign rb-groups", *values, seconds, note=f"{len(relaxed.sizes)} groups")
        if args.extra:
            ours, t_ours, res = _ours(a, b, tol=0.0)
            _row(
                arch,
                "independent",
                "neuralign tol=0",
                _objective(a, ours),
                float("nan"),
                _function_error(arch, b, ours),
                t_ours,
                note=f"{res.n_iter} sweeps",
            )
            if arch in args.restart_models:
                ours, t_ours, res = _ours(a, b, restarts=4)
                runs = ", ".join(f"{v:.2f}" for v in res.restart_objectives)
                _row(
                    arch,
                    "independent",
                    "neuralign rst=4",
                    _objective(a, ours),
                    float("nan"),
                    _function_error(arch, b, ours),
                    t_ours,
                    note=f"runs (greedy first): {runs}",
                )


if __name__ == "__main__":
    main()
