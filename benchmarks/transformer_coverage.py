"""Coverage of the tracer on transformers: which attention models ``trace_spec`` handles, the head structure it finds,
and whether the spec keeps the function unchanged (float64, random head, inside-head and residual permutations).

Models: torchvision's ``vit_b_16`` (32 x 32 images) and a small ``VisionTransformer`` (image 32, patch 8, 2 layers,
4 heads, width 64), ``swin_t``; the zoo's ``vit`` and ``tinylm``; and, when timm is importable, the ten timm models of
issue 21 (random weights). Every floating tensor whose entries are all equal (zero-initialised heads) is re-drawn as
in ``benchmarks/model_coverage.py``. The check is ``check_equivalence(..., trials=1)`` in float64; eval and train mode
are reported apart (a module that caches a tensor outside its state dict in eval mode fails only there). The front
end is ``trace_spec``'s default: torch.fx, or torch.export where fx cannot trace the model or keeps an operation
opaque (reported as "via torch.export").

    python benchmarks/transformer_coverage.py [--out docs/transformer_coverage.md] [--no-timm] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_coverage import randomize_constants  # noqa: E402

from neuralign.alignment import trace_spec  # noqa: E402
from neuralign.errors import SpecError  # noqa: E402
from neuralign.experiments.models import build_model  # noqa: E402
from neuralign.verification import check_equivalence  # noqa: E402

TOL = 1e-9
TIMM = {  # name -> (keyword arguments, input side)
    "vit_tiny_patch16_224": ({"img_size": 32}, 32),
    "deit_tiny_patch16_224": ({"img_size": 32}, 32),
    "edgenext_xx_small": ({}, 64),
    "levit_128s": ({"img_size": 64}, 64),
    "efficientformer_l1": ({}, 224),
    "coatnet_nano_rw_224": ({"img_size": 64}, 64),
    "maxvit_nano_rw_256": ({"img_size": 128}, 128),
    "mobilevit_xxs": ({}, 64),
    "tiny_vit_5m_224": ({}, 224),
    "tf_efficientnetv2_b0": ({}, 64),
}


def models(with_timm: bool):
    """(label, builder, input) for every model of the table."""
    image = lambda side: torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))  # noqa: E731
    out = [
        ("torchvision:vit_b_16", lambda: torchvision.models.vit_b_16(weights=None, num_classes=10, image_size=32),
         image(32)),
        ("torchvision:VisionTransformer(32, 8, 2 layers, 4 heads, 64)", lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10),
         image(32)),
        ("torchvision:swin_t", lambda: torchvision.models.swin_t(weights=None, num_classes=10), image(64)),
        ("zoo:vit", lambda: build_model("vit", 10), image(32)),
        ("zoo:tinylm", lambda: build_model("tinylm", 256),
         torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))),
    ]  # fmt: skip
    if with_timm:
        import timm

        for name, (kw, side) in TIMM.items():
            out.append((f"timm:{name}", lambda name=name, kw=kw: timm.create_model(name, num_classes=10, **kw),
                        image(side)))  # fmt: skip
    return out


def heads_summary(spec) -> str:
    """Head groups and what the flat groups with heads keep (``H x d``, tie, inside permutations)."""
    head_groups = {h.heads for h in spec.heads.values() if h.heads is not None}
    head_groups |= {g for g in spec.sizes if g.endswith(".heads")}  # the tracer's name for a head permutation
    inside = [h for h in spec.heads.values() if h.inner is not None]
    kinds = sorted({f"{h.count}x{h.size}" + (f" tie {h.tie}" if h.tie > 1 else "") for h in inside})
    within = sum(h.within is not None for h in spec.heads.values())
    return (f"{len(head_groups)} head groups; {len(inside)} groups with inside permutations"
            + (f" ({', '.join(kinds)})" if kinds else "")
            + (f"; {within} groups whose query heads move within their key/value group" if within else ""))  # fmt: skip


def row(label, build, x) -> str:
    torch.manual_seed(0)
    try:
        model = randomize_constants(build(), 1).double()
    except Exception as exc:  # noqa: BLE001 - reported
        return f"| {label} | - | build error: {type(exc).__name__}: {str(exc).splitlines()[0][:150]} | | | |"
    x = x.double() if x.is_floating_point() else x
    shape = "x".join(map(str, x.shape))
    t0 = time.perf_counter()
    try:
        spec = trace_spec(model, x)
    except SpecError as exc:
        why = str(exc).splitlines()[0][:300]
        return f"| {label} | {shape} | refused: {why} | - | - | {time.perf_counter() - t0:.1f} |"
    res = check_equivalence(model, spec, x, trials=1, generator=0, tol=TOL)
    verdict = "exact" if res.passed else "**CHECK FAILS**"
    exported = any(t.node.startswith("export_") for ts in spec.taps.values() for t in ts)  # its graph's node names
    how = "traced via torch.export" if exported else "traced"
    return (f"| {label} | {shape} | {how}, {verdict}: {len(spec.sizes)} groups, {sum(spec.sizes.values())} units; "
            f"{heads_summary(spec)} | {res.max_diff_eval:.1e} / {res.max_diff_train:.1e} | "
            f"{', '.join(res.stochastic) or '-'} | {time.perf_counter() - t0:.1f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-timm", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    with_timm = not args.no_timm
    if with_timm:
        try:
            import timm  # noqa: F401
        except ImportError:
            with_timm = False
    lines = [
        "# Tracer coverage on transformers", "",
        "The table is generated by `benchmarks/transformer_coverage.py` (do not edit it by hand); the notes after it "
        "are not.", "",
        f"- date: {datetime.date.today()}; torch {torch.__version__}, torchvision {torchvision.__version__}"
        + (f", timm {__import__('timm').__version__}" if with_timm else ", timm not installed")
        + f", Python {platform.python_version()}, {args.threads} thread(s), CPU", "",
        "*head groups*: groups that permute whole heads (one per attention; under RoPE or when the units inside heads "
        "cannot move per head, the only permutation of the query/key units). *groups with inside permutations*: flat "
        "groups of H x d units whose units may also move inside each head (query/key, value/output), `tie t`: t query "
        "heads per key/value head. *float64 diff*: `check_equivalence(trials=1)`, eval / train mode, tolerance 1e-09.",
        "", "| model | input | outcome | float64 diff (eval / train) | random ops | seconds |",
        "| --- | --- | --- | ---: | --- | ---: |",
    ]  # fmt: skip
    for label, build, x in models(with_timm):
        lines.append(row(label, build, x))
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
