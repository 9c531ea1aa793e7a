"""The argument parser of ``neuralign``: one sub-parser per command and the option groups they share."""

from __future__ import annotations

import argparse
import importlib
import textwrap

from neuralign.cli.commands import COMMAND_MODULES

__all__ = [
    "add_arch",
    "add_common",
    "add_data",
    "add_force",
    "add_optimizer",
    "add_pair",
    "build_parser",
    "list_settings_in_help",
    "study_settings",
]


def add_common(p: argparse.ArgumentParser, *, out: str, out_help: str | None = None) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--out", default=out,
                   help=out_help or f"output folder (default: {out}); rerunning resumes from it")  # fmt: skip
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default: cpu)")
    g.add_argument("--seed", type=int, default=0, help="base seed of every random choice (default: 0)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, capped at the cores this process may use; with "
                        "--executor local, per job, default the cores shared among --jobs); on a machine shared with "
                        "other work, --threads 1 keeps idle threads from spinning")  # fmt: skip
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="log the library's progress messages")


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="start over even if --out holds the finished result (without it, a rerun prints one line "
                        "and skips a finished result, and resumes an interrupted one from its checkpoint)")  # fmt: skip


def add_data(p: argparse.ArgumentParser, *, required: bool = True, settings: bool = False) -> None:
    """The data options, defined once for every command. With ``settings`` they override a preset's data settings
    (``neuralign study``, ``neuralign compare``: :func:`~neuralign.cli.common.data_settings`), so that none has a
    default of its own."""
    from neuralign.cli.common import parse_value  # imports torch: not at module level (see cli/__init__)

    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, default=None,
                   help="dataset: cifar10, cifar100, mnist, tinyimagenet, digits (shipped), pydoc or pydoc:T (text "
                        "shipped with Python: byte windows of T = 64 tokens, for --arch tinylm), an .npz file with "
                        "x_train, y_train, x_test, y_test (uint8 images), or imagefolder:PATH (PATH/train/<class>/ "
                        "and PATH/val/<class>/ or PATH/test/<class>/ image files)")  # fmt: skip
    g.add_argument("--data-root", default=None, help="folder holding the torchvision dataset (or <name>.npz)")
    g.add_argument("--download", action="store_true", help="let torchvision download the dataset (needs network)")
    g.add_argument("--batch-size", type=int, default=None if settings else 128,
                   help="training batch size (default: " + ("the preset's)" if settings else "128)"))  # fmt: skip
    g.add_argument("--train-size", type=parse_value, default=None,
                   help="use a subset of the training set: a count or a fraction (default: all)")  # fmt: skip
    g.add_argument("--test-size", type=parse_value, default=None, help="subset of the test set (default: all)")
    g.add_argument("--align-size", type=parse_value, default=None,
                   help="alignment images: the first N training images with test transforms (default: the first "
                        "10000, or all if fewer)")  # fmt: skip
    g.add_argument("--resize", type=int, default=None, help="resize images to this side length (imagefolder: "
                   "to this square size; default the most common size of a sample)")
    g.add_argument("--mean", default=None, help="normalisation means, comma-separated, one per channel "
                   "(default: the dataset's, or computed on the training images)")
    g.add_argument("--std", default=None, help="normalisation standard deviations, with --mean")


def add_optimizer(p: argparse.ArgumentParser, *, settings: bool = False) -> None:
    """``--optimizer`` of the end points' training (``TrainingOptions.optimizer``), defined once for every command
    that trains them. With ``settings`` it overrides the preset's ``train.optimizer`` (``neuralign study``,
    ``neuralign compare``) and has no default of its own."""
    from neuralign.experiments.training import OPTIMIZERS  # imports torch: not at module level (see cli/__init__)

    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None if settings else "sgd",
                   help="optimizer of the end points' training: sgd (the paper's Nesterov SGD) or adamw (for "
                        "transformers such as tinylm, with a smaller learning rate, e.g. 5e-3; SGD does not train "
                        "tinylm) (default: " + ("the preset's, sgd" if settings else "sgd") + ")"
                        + ("; the curves' optimizer is --set curve.optimizer=adamw" if settings else ""))  # fmt: skip


#: The zoo's architectures (``neuralign.experiments.models.available_models()``, spelled out here so that ``--help``
#: imports no model code; a test keeps the two equal).
ZOO_ARCHES = ("tinyten", "resnet20", "resnet32", "vgg11", "vgg16", "googlenet", "mlp", "vit", "tinylm")

#: The help of every ``--arch`` that builds a model.
ARCH_HELP = (", ".join(ZOO_ARCHES) + " (tinylm: a language model, for text --data such as pydoc), torchvision:<name> "
             "(any torchvision.models builder, e.g. torchvision:resnet18) or timm:<name> (needs the extra "
             "neuralign[timm])")  # fmt: skip


def add_arch(p: argparse.ArgumentParser, *, checkpoints: bool) -> None:
    g = p.add_argument_group("architecture" + (" of plain checkpoints" if checkpoints else ""))
    g.add_argument("--arch", required=not checkpoints, default=None,
                   help=ARCH_HELP + ("; needed for plain state dicts and .safetensors files, which do not "
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


def list_settings_in_help(p: argparse.ArgumentParser) -> None:
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

    for module in COMMAND_MODULES:
        for name, (add_parser, _) in importlib.import_module(f"neuralign.cli.commands.{module}").COMMANDS.items():
            add_parser(sub)
            assert name in sub.choices, name  # the module's registry names the parser it adds
    return parser
