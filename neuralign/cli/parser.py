"""The argument parser of ``neuralign``: one sub-parser per command and the option groups they share."""

from __future__ import annotations

import argparse
import textwrap

__all__ = ["add_common", "add_force", "add_data", "add_arch", "add_pair", "study_settings", "build_parser"]


def add_common(p: argparse.ArgumentParser, *, out: str, out_help: str | None = None) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--out", default=out,
                   help=out_help or f"output folder (default: {out}); rerunning resumes from it")  # fmt: skip
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default: cpu)")
    g.add_argument("--seed", type=int, default=0, help="base seed of every random choice (default: 0)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, capped at the cores this process may use); on a "
                        "machine shared with other work, --threads 1 keeps idle threads from spinning")  # fmt: skip
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="log the library's progress messages")


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="start over even if --out holds the finished result (without it, a rerun prints one line "
                        "and skips a finished result, and resumes an interrupted one from its checkpoint)")  # fmt: skip


def add_data(p: argparse.ArgumentParser, *, required: bool = True, stats: bool = True) -> None:
    from neuralign.cli.common import parse_value  # imports torch: not at module level (see cli/__init__)

    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, default=None,
                   help="dataset: cifar10, cifar100, mnist, tinyimagenet, digits (shipped), an .npz file with "
                        "x_train, y_train, x_test, y_test (uint8 images), or imagefolder:PATH (PATH/train/<class>/ "
                        "and PATH/val/<class>/ or PATH/test/<class>/ image files)")  # fmt: skip
    g.add_argument("--data-root", default=None, help="folder holding the torchvision dataset (or <name>.npz)")
    g.add_argument("--download", action="store_true", help="let torchvision download the dataset (needs network)")
    g.add_argument("--batch-size", type=int, default=128, help="training batch size (default: 128)")
    g.add_argument("--train-size", type=parse_value, default=None,
                   help="use a subset of the training set: a count or a fraction (default: all)")  # fmt: skip
    g.add_argument("--test-size", type=parse_value, default=None, help="subset of the test set (default: all)")
    g.add_argument("--align-size", type=parse_value, default=None,
                   help="alignment images: the first N training images with test transforms (default: the first "
                        "10000, or all if fewer)")  # fmt: skip
    g.add_argument("--resize", type=int, default=None, help="resize images to this side length (imagefolder: "
                   "to this square size; default the most common size of a sample)")
    if stats:
        g.add_argument("--mean", default=None, help="normalisation means, comma-separated, one per channel "
                       "(default: the dataset's, or computed on the training images)")
        g.add_argument("--std", default=None, help="normalisation standard deviations, with --mean")


def add_arch(p: argparse.ArgumentParser, *, checkpoints: bool) -> None:
    g = p.add_argument_group("architecture" + (" of plain checkpoints" if checkpoints else ""))
    g.add_argument("--arch", required=not checkpoints, default=None,
                   help="tinyten, resnet20, resnet32, vgg11, vgg16, googlenet, mlp, torchvision:<name> (any "
                        "torchvision.models builder, e.g. torchvision:resnet18) or timm:<name> (needs the extra "
                        "neuralign[timm])" + ("; needed for plain state dicts and .safetensors files, which do not "
                        "record it (end points of `neuralign train` do)" if checkpoints else ""))  # fmt: skip
    if checkpoints:
        g.add_argument("--num-classes", type=int, default=None,
                       help="classifier outputs of a plain checkpoint (default: the dataset's classes)")  # fmt: skip
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="keyword argument of the model builder, repeatable (e.g. --model-arg width_per_group=32)")


def add_pair(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-a", required=True,
                   help="end point A: a file of `neuralign train`, a plain state dict (.pt/.pth, also wrapped in "
                        "{'state_dict': ...} or {'model': ...} or with DDP's 'module.' prefix) or .safetensors")
    p.add_argument("--model-b", required=True, help="end point B, of the same architecture and in any such format")
    add_arch(p, checkpoints=True)


def _list_settings_in_help(p: argparse.ArgumentParser) -> None:
    """End ``p``'s help with every study setting, read when the help is shown (reading them imports the study,
    which a command line that only runs a command does not need)."""
    shown = p.format_help

    def format_help() -> str:
        listed = textwrap.fill(study_settings(), width=100, initial_indent="  ", subsequent_indent="  ",
                               break_on_hyphens=False)  # fmt: skip
        return f"{shown()}\nstudy settings (--set PATH=VALUE):\n{listed}\n"

    p.format_help = format_help  # type: ignore[method-assign]


def study_settings() -> str:
    """The dotted paths of every study setting, read from :class:`StudyConfig` so that the help cannot drift from
    it."""
    from neuralign._options import setting_paths
    from neuralign.study import StudyConfig

    return ", ".join(setting_paths(StudyConfig))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``neuralign`` (also ``python -m neuralign``)."""
    from neuralign.cli.common import version

    parser = argparse.ArgumentParser(
        prog="neuralign",
        description="Neuron alignment and mode connectivity (Tatro et al., NeurIPS 2020): train networks, align "
        "them, fit curves between them (plain, aligned, PAM), verify the alignment and report.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                        help="print the version of neuralign and exit")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="offline end-to-end study on the shipped digits (a few minutes on a CPU)",
                       description="Train two TinyTen networks on the shipped UCI digits (resized to 16x16), align "
                       "them, fit unaligned / PAM / aligned curves, verify the alignment and write a report with "
                       "figures. Ends with the path of the report.")  # fmt: skip
    add_common(p, out="neuralign-demo")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a study setting, e.g. --set train.epochs=2 (see `neuralign study --help`)")

    p = sub.add_parser("study", help="the paper's Table 1 protocol at any scale",
                       description="Train or load 2 x pairs end points, align each pair, fit the four curves of "
                       "Table 1 (Unaligned, PAM Unaligned, PAM Aligned, Aligned), evaluate them along t with batch "
                       "norm re-estimated, verify the alignment, and write results.json, report.md and figures. "
                       "Presets: paper (the paper's settings, for GPUs), cpu (TinyTen on CIFAR-10 in about an hour "
                       "on 2 cores), demo; robust (adversarially trained end points, robust Unaligned and Aligned "
                       "curves, clean and robust accuracy along t; the paper's §4 settings, for GPUs) and "
                       "robust-cpu (MLPs on MNIST on 2 cores). Any setting can be overridden with --set PATH=VALUE, "
                       "the settings listed at the end (e.g. --set pam.lam=10 --set verification=false).")  # fmt: skip
    _list_settings_in_help(p)
    add_common(p, out="neuralign-study")
    p.add_argument("--preset", choices=["paper", "cpu", "demo", "robust", "robust-cpu"], default="cpu",
                   help="starting settings (default: cpu)")
    p.add_argument("--arch", default=None, help="tinyten, resnet20, resnet32, vgg11, vgg16, googlenet, mlp, "
                   "torchvision:<name>, timm:<name>")
    p.add_argument("--pairs", type=int, default=None, help="number of end-point pairs")
    p.add_argument("--endpoints", nargs="+", default=None, metavar="FILE",
                   help="given end points instead of training: A1 B1 [A2 B2 ...] in any format `align` reads "
                        "(plain state dicts and .safetensors are read as --arch with the dataset's classes)")
    p.add_argument("--epochs", type=int, default=None, help="end-point training epochs")
    p.add_argument("--curve-epochs", type=int, default=None, help="curve (and PAM x-step) epochs")
    p.add_argument("--num-points", type=int, default=None, help="points along t for evaluation")
    p.add_argument("--bn-batches", type=int, default=None, help="batches per batch-norm re-estimation")
    p.add_argument("--width", type=float, default=None, help="width multiplier (ResNet, VGG)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any study setting")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the models' heads (default: the dataset's), e.g. for given end points")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="builder argument of --arch (repeatable), e.g. width_mult=0.5 for torchvision:mobilenet_v2")
    add_data(p, required=False)
    for action in p._actions:  # the study's own defaults apply unless given
        if action.dest == "batch_size":
            action.default = None
    g = p.add_argument_group("running the stages as jobs (needs the cluster extra: pip install 'neuralign[cluster]')")
    g.add_argument("--executor", choices=["sequential", "local", "slurm"], default="sequential",
                   help="sequential: every stage in this process (default); local: up to --jobs stages at once as "
                        "local processes (one GPU each when there are several); slurm: every stage as a Slurm job, "
                        "with job dependencies between stages (returns once they are queued)")  # fmt: skip
    g.add_argument("--jobs", type=int, default=2, help="concurrent local jobs (default: 2)")
    g.add_argument("--slurm-partition", default=None, help="Slurm partition of the jobs")
    g.add_argument("--slurm-time", type=int, default=24 * 60, help="wall time of each Slurm job in minutes "
                   "(default: 1440)")  # fmt: skip
    g.add_argument("--gpus-per-job", type=int, default=1,
                   help="GPUs per Slurm job (default: 1); above 1 each stage runs data-parallel over them")
    g.add_argument("--status", metavar="OUT", default=None,
                   help="print which stages of the study in OUT are done, running (with job ids) or pending, "
                        "and exit")  # fmt: skip

    p = sub.add_parser("train", help="train one end point with the paper's recipe",
                       description="Train a network with Nesterov SGD (lr 0.1, momentum 0.9, wd 5e-4, lr halved "
                       "every 20 epochs), checkpointing every epoch; writes <out>/<arch>_seed<seed>.pt.")  # fmt: skip
    add_common(p, out="neuralign-endpoints")
    add_data(p)
    add_arch(p, checkpoints=False)
    p.add_argument("--width", type=float, default=None, help="width multiplier (ResNet, VGG)")
    p.add_argument("--epochs", type=int, default=250, help="epochs (default: 250)")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: 5e-4)")
    add_force(p)

    p = sub.add_parser("align", help="align end point B to A",
                       description="Find the permutation of B's hidden units that matches A's: correlation of "
                       "post-activations (the paper), l2 (uncentred cross moments) or weight matching. Writes "
                       "alignment.pt (the permutation) and alignment.json (per-layer correlations).")  # fmt: skip
    add_common(p, out="neuralign-align")
    add_pair(p)
    add_data(p)
    p.add_argument("--method", choices=["correlation", "l2", "weight"], default="correlation",
                   help="matching method (default: correlation)")  # fmt: skip
    p.add_argument("--export", default=None, metavar="FILE",
                   help="also write B permuted into A's frame to FILE (.safetensors, .pt or .pth; see `apply`)")

    p = sub.add_parser("apply", help="write end point B permuted into A's frame",
                       description="Apply a permutation file (alignment.pt of `align`, perms.pt of `pam`) to the "
                       "checkpoint it was computed for and write the aligned weights to --out: .safetensors, or "
                       ".pt/.pth in the input's own layout (same wrapper and key prefix), loadable by the model's "
                       "own class with load_state_dict(strict=True). A file computed for another architecture or "
                       "another pair is refused.")  # fmt: skip
    add_common(p, out="b_aligned.safetensors", out_help="the aligned weights to write: .safetensors, .pt or .pth "
                "(default: b_aligned.safetensors)")  # fmt: skip
    p.add_argument("--model", required=True, help="end point B (any format `align` reads)")
    p.add_argument("--perms", required=True, help="permutation file (alignment.pt, perms.pt or .safetensors)")
    p.add_argument("--arch", default=None, help="architecture of --model, checked against the permutation file's")

    p = sub.add_parser("curve", help="fit a curve between two end points",
                       description="Fit a quadratic Bezier (or polygonal chain) between A and B, or B aligned by "
                       "--perms; writes curve.pt and curve.json.")  # fmt: skip
    add_common(p, out="neuralign-curve")
    add_pair(p)
    add_data(p)
    p.add_argument("--perms", default=None, help="alignment.pt to apply to B first (an aligned curve)")
    p.add_argument("--curve", choices=["bezier", "polychain"], default="bezier", help="family (default: bezier)")
    p.add_argument("--export-point", type=float, default=None, metavar="T",
                   help="write the network at t=T of the curve, with batch-norm statistics re-estimated on the "
                        "training data, to --out, which is then a file (.safetensors, .pt or .pth); the fitted "
                        "curve's files go next to it")  # fmt: skip
    p.add_argument("--from", dest="source", default=None, metavar="CURVE",
                   help="with --export-point: export from this curve.pt instead of fitting one")
    p.add_argument("--bn-batches", type=int, default=None,
                   help="batches of the batch-norm re-estimation of --export-point (default: all)")  # fmt: skip
    add_force(p)
    p.add_argument("--epochs", type=int, default=250, help="epochs (default: 250)")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 on w(t) (default: 5e-4)")

    p = sub.add_parser("pam", help="fit a curve jointly with the permutation (PAM)",
                       description="Proximal alternating minimisation over the Bezier control point and the "
                       "permutation of B; writes curve.pt, perms.pt and pam.json.")  # fmt: skip
    add_common(p, out="neuralign-pam")
    add_pair(p)
    add_data(p)
    p.add_argument("--init", default="identity", help="identity, alignment, or an alignment.pt to start from")
    p.add_argument("--method", choices=["linearized", "birkhoff"], default="linearized", help="P-step")
    p.add_argument("--lam", type=float, default=1000.0, help="P proximal step (default: 1000)")
    p.add_argument("--iters", type=int, default=1, help="outer iterations (default: 1)")
    p.add_argument("--epochs", type=int, default=250, help="curve epochs per x-step (default: 250)")
    p.add_argument("--local-search", type=int, default=0, help="swaps tried per group after each P-step")
    p.add_argument("--max-moved", type=float, default=None,
                   help="linearized: the largest fraction of a group's units one P-step may reassign (a bounded "
                        "step, lambda found by bisection; default: unbounded)")  # fmt: skip
    p.add_argument("--p-steps", type=int, default=None, help="linearized: P-steps per outer iteration (default: 1)")
    p.add_argument("--birkhoff-steps", type=int, default=None,
                   help="birkhoff: projected gradient steps on the Birkhoff polytope per P-step (default: 20)")
    p.add_argument("--birkhoff-lr", type=float, default=None, help="birkhoff: their step size (default: PAM's)")
    p.add_argument("--birkhoff-samples", type=int, default=None,
                   help="birkhoff: Birkhoff-von Neumann draws among the rounding candidates (default: 32)")
    p.add_argument("--gradient-batches", type=int, default=None,
                   help="training batches per P-gradient estimate (default: PAM's)")
    p.add_argument("--value-batches", type=int, default=None,
                   help="training batches (at t = 0.25, 0.5, 0.75) scoring each P-step candidate (default: 8)")
    add_force(p)
    p.add_argument("--lr", type=float, default=0.1, help="curve learning rate (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 on w(t) (default: 5e-4)")

    p = sub.add_parser("evaluate", help="evaluate a curve along t",
                       description="Loss and accuracy at --num-points values of t with batch norm re-estimated; "
                       "writes evaluation.json (Avg, Min, barriers, values at t = 0.5). It prints the expected time "
                       "before it starts: the cost is num-points x (bn-batches + test batches) forward passes, so the "
                       "defaults (a full training pass at each of 65 points) take long on a CPU; --num-points 17 "
                       "--bn-batches 10 is a cheap first look.")  # fmt: skip
    add_common(p, out="neuralign-eval")
    p.add_argument("--model-a", required=True, help="an end point of the curve (gives the architecture)")
    add_arch(p, checkpoints=True)
    p.add_argument("--curve", required=True, help="curve.pt")
    add_data(p)
    p.add_argument("--num-points", type=int, default=65,
                   help="points along t (default: 65, the paper's); 17 gives the same picture at a quarter of the "
                        "cost")  # fmt: skip
    p.add_argument("--bn-batches", type=int, default=None,
                   help="batches per BN re-estimation (default: all, a full training pass per point); 10 moves "
                        "accuracies along a fitted curve by about 0.1 points (benchmarks/bn_subset.py) at a small "
                        "fraction of the cost")  # fmt: skip

    p = sub.add_parser("verify", help="check whether an alignment is locally optimal",
                       description="Run the checks of neuralign.verification.verify_alignment (PAM stability, "
                       "first-order certificate, neighbourhood swaps, gradient Taylor test, correlation "
                       "optimality); writes verification.json, verification.md and reassignment.png. It prints the "
                       "expected time before it starts. Cheaper settings: --checks certificate gradient alignment "
                       "(minutes: no PAM runs, no swap scoring), --iters 1, --swaps 8, --local-search 4, or a "
                       "--curve already fitted instead of --fit-epochs.")  # fmt: skip
    add_common(p, out="neuralign-verify")
    add_pair(p)
    add_data(p)
    p.add_argument("--perms", required=True, help="alignment.pt to verify")
    p.add_argument("--curve", default=None, help="a curve fitted for the aligned pair (fitted briefly if absent)")
    p.add_argument("--checks", nargs="*", default=None, help="subset of: stability certificate neighbourhood "
                   "gradient alignment")  # fmt: skip
    p.add_argument("--fit-epochs", type=int, default=None,
                   help="epochs of the curve fitted when --curve is absent (default: VerificationOptions', 2)")
    p.add_argument("--lam", type=float, default=None,
                   help="PAM step and certificate threshold (default: VerificationOptions', 1000)")
    p.add_argument("--iters", type=int, default=None,
                   help="PAM iterations of the stability check (default: VerificationOptions', 2)")
    p.add_argument("--swaps", type=int, default=32,
                   help="best-ranked transpositions scored per group, besides 4 random ones as a control (default: 32, "
                        "more than the library's 8: a command is run once, by hand)")
    p.add_argument("--local-search", type=int, default=None,
                   help="swaps PAM tries per group (default: VerificationOptions', 16)")
    return parser
