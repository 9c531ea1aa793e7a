"""Helpers shared by the commands: devices, option parsing, loading data, end points and alignments, tables and
manifests."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from neuralign import _distributed
from neuralign._utils import environment_versions, load_checkpoint, usable_cores
from neuralign.errors import CheckpointError
from neuralign.experiments.runfolder import RunFolder

__all__ = [
    "usable_cores",
    "version",
    "info",
    "parse_device",
    "parse_value",
    "parse_overrides",
    "parse_floats",
    "DATA_SETTINGS",
    "data_settings",
    "load_command_data",
    "model_args",
    "load_model",
    "load_endpoints",
    "load_alignment",
    "state_of",
    "params_of",
    "check_image_size",
    "table",
    "sgd_optimizer",
    "one_line",
    "run_folder",
    "write_manifest",
    "alignment_record",
    "export_aligned",
    "read_curve",
    "seconds_per_pass",
    "duration",
    "announce_cost",
]


def version() -> str:
    import neuralign

    return neuralign.__version__


def info(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (under torchrun every rank runs the command; one report is enough)."""
    if _distributed.rank() == 0:
        print(*args, **kwargs)


def parse_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name}: {one_line(exc)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "," in text:
        return tuple(parse_value(t) for t in text.split(",") if t)
    return text


def parse_overrides(pairs: Sequence[str], *, option: str = "--set") -> dict[str, Any]:
    out = {}
    for item in pairs or ():
        if "=" not in item:
            raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = parse_value(value.strip())
    return out


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option} expects comma-separated numbers, got {text!r}") from None


#: The data options of :func:`neuralign.cli.parser.add_data` -> the dotted paths of the settings they override.
DATA_SETTINGS = {
    "data": "data.dataset", "data_root": "data.root", "download": "data.download", "batch_size": "data.batch_size",
    "train_size": "data.train_size", "test_size": "data.test_size", "align_size": "data.align_size",
    "resize": "data.resize", "mean": "data.mean", "std": "data.std",
}  # fmt: skip


def data_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The data options given on the command line (:func:`neuralign.cli.parser.add_data` with ``settings=True``)
    as ``{setting path: value}`` (``--mean``, ``--std`` as tuples of floats; ``--download`` only when given)."""
    out: dict[str, Any] = {}
    for option, path in DATA_SETTINGS.items():
        value = getattr(args, option, None)
        if value is None or value is False:
            continue
        out[path] = parse_floats(value, f"--{option}") if option in ("mean", "std") else value
    return out


def load_command_data(args: argparse.Namespace):
    from neuralign.experiments.data import load_data

    data = load_data(
        args.data, root=args.data_root, download=args.download, batch_size=args.batch_size,
        train_size=args.train_size, test_size=args.test_size, align_size=args.align_size, resize=args.resize,
        generator=args.seed, mean=parse_floats(args.mean, "--mean"), std=parse_floats(args.std, "--std"),
    )  # fmt: skip
    write_manifest(args, data=data.describe())
    return data


def model_args(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = parse_overrides(getattr(args, "model_arg", None) or (), option="--model-arg")
    reserved = {"num_classes": "--num-classes", "seed": "--seed", "weights": None, "pretrained": None}
    for key in kwargs.keys() & reserved.keys():
        instead = reserved[key]
        raise ValueError(f"--model-arg {key}=... is not a builder argument here: " + (
            f"use {instead}" if instead else "neuralign builds models without downloaded weights; load a checkpoint "
            "with --model-a/--model-b instead"))  # fmt: skip
    return kwargs


def load_model(path: str, args: argparse.Namespace, num_classes: int | None) -> tuple[torch.nn.Module, dict]:
    from neuralign.experiments.checkpoints import load_endpoint

    model, meta = load_endpoint(path, arch=args.arch, num_classes=args.num_classes or num_classes,
                                model_kwargs=model_args(args))  # fmt: skip
    if meta["note"]:
        info(f"neuralign: {meta['note']}", file=sys.stderr)
    return model, meta


def load_endpoints(args: argparse.Namespace, device: torch.device, data=None):
    num_classes = data.num_classes if data is not None else None
    a, meta_a = load_model(args.model_a, args, num_classes)
    b, meta_b = load_model(args.model_b, args, num_classes)
    if meta_a["arch"].lower() != meta_b["arch"].lower():
        raise ValueError(f"--model-a is a {meta_a['arch']} but --model-b is a {meta_b['arch']}")
    return a.to(device), b.to(device), meta_a, meta_b


def load_alignment(path: str, meta_a: dict, meta_b: dict, sd_b: dict[str, torch.Tensor]):
    """The permutation file at ``path``, refused if it was made for another architecture or pair."""
    from neuralign.alignment import load_permutation_file

    record = load_permutation_file(path)
    record.check_pair(arch=meta_a["arch"], model_b=sd_b, hash_a=meta_a["hash"], hash_b=meta_b["hash"])
    return record


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def params_of(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {k for k, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def check_image_size(model: torch.nn.Module, data, args: argparse.Namespace) -> None:
    """Refuse, in one line, data whose images the architecture cannot take (e.g. 8x8 digits for TinyTen)."""
    from neuralign.experiments.models import smallest_input_size

    h, w = data.image_size
    need = smallest_input_size(model, data.in_channels, (h, w))
    if need is None:
        return
    if need == 0:
        first = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
        if first is not None and first.in_channels != data.in_channels:
            raise ValueError(f"--arch {args.arch} takes {first.in_channels}-channel images but --data {args.data} has "
                             f"{data.in_channels} channel(s); choose a dataset or architecture that match")  # fmt: skip
        raise ValueError(f"--arch {args.arch} cannot take the {h}x{w} images of --data {args.data} at any size up "
                         "to 256; choose another --arch")  # fmt: skip
    raise ValueError(f"--arch {args.arch} needs images of at least {need}x{need} but --data {args.data} has {h}x{w}; "
                     f"add --resize {need} (or larger) to resize them")  # fmt: skip


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns right-aligned except the first."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    fmt = [(str.ljust if i == 0 else str.rjust) for i in range(len(header))]
    return "\n".join("  ".join(f(c, w) for f, c, w in zip(fmt, row, widths)) for row in cells)


def sgd_optimizer(lr: float):
    def make(params):
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)

    return make


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (its lines joined with "; "), or its type when it has none."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def run_folder(args: argparse.Namespace) -> RunFolder:
    """The command's run folder: ``--out`` (or its folder when it names a weight file: ``apply``,
    ``--export-point``) with the manifest ``manifest_<cmd>.json``; ``train`` keeps one per end point (several seeds
    may share a folder)."""
    out = Path(args.out)
    folder = out.parent if out.suffix in (".safetensors", ".pt", ".pth") else out
    name = f"manifest_train_{args.arch}_seed{args.seed}.json" if args.command == "train" else \
        f"manifest_{args.command}.json"  # fmt: skip
    return RunFolder(folder, name)


def write_manifest(args: argparse.Namespace, **extra: Any) -> Path:
    """Record the command, its arguments, the seed, package versions and the device (and, once loaded, the data's
    description: sizes, image size, normalisation statistics) in the command's manifest. The ``options`` that
    identify its result (:func:`neuralign.cli.runfolder.check_run`) are kept: they are recorded when the run
    starts, after the check against the previous run's."""
    folder = run_folder(args)
    record = folder.manifest() or {}
    record.update({
        "kind": "command_manifest",
        "command": args.command,
        "argv": sys.argv,
        "arguments": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list)) or v is None},
        "versions": environment_versions(),
        "device": str(parse_device(args.device)),
        "threads": torch.get_num_threads(),
        "distributed": _distributed.describe(),
        "started": getattr(args, "started", None) or time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    })  # fmt: skip
    args.started = record["started"]
    folder.save(record)
    return folder.path


def alignment_record(res, meta_a: dict, meta_b: dict, *, method: str, settings: dict[str, Any]):
    from neuralign.alignment import PermutationFile

    return PermutationFile(
        perms={g: p.cpu() for g, p in res.perms.items()}, spec=res.spec, method=method, settings=settings,
        model_a={"hash": meta_a["hash"], "source": meta_a["path"], "layout": meta_a["layout"]},
        model_b={"hash": meta_b["hash"], "source": meta_b["path"], "layout": meta_b["layout"]}, arch=meta_a["arch"],
        results={"correlation_before": getattr(res, "correlation_before", {}),
                 "correlation_after": getattr(res, "correlation_after", {})},
    )  # fmt: skip


def export_aligned(model_b: str, record, out: str) -> Path:
    """Write the weights of the file ``model_b`` permuted by ``record`` to ``out``, in the input's layout."""
    from neuralign.alignment import apply_permutation, state_dict_hash
    from neuralign.experiments.checkpoints import read_weights, write_weights

    if Path(out).resolve() == Path(model_b).resolve():
        raise ValueError(f"the aligned weights would overwrite the input {model_b}; write them to another file")
    weights = read_weights(model_b)
    if weights.note:
        info(f"neuralign: {weights.note}", file=sys.stderr)
    record.check_pair(model_b=weights.state_dict, hash_b=state_dict_hash(weights.state_dict))
    aligned = apply_permutation(weights.state_dict, record.spec, record.perms)
    metadata = {"neuralign_aligned_to": str(record.model_a.get("hash")), "neuralign_permutation": record.path,
                "neuralign_method": record.method}  # fmt: skip
    return write_weights(out, aligned, like=weights, metadata=metadata)


def read_curve(path: str):
    from neuralign.curves.families import CURVE_FAMILIES

    state = load_checkpoint(path, kind="curve", required=("family",))
    family = CURVE_FAMILIES.get(state["family"])
    if family is None:
        raise CheckpointError(f"{path}: unknown curve family {state['family']!r}")
    return family.load(path)


def seconds_per_pass(model: torch.nn.Module, data, device: torch.device) -> tuple[float, int]:
    """Seconds of one forward pass of a training batch through ``model`` (eval mode, no gradients; the best of 3
    after one warm-up) and the batch size. The model is not changed."""
    x = next(iter(data.train))[0].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as exc:
        model.train(was_training)
        raise ValueError(f"the model cannot run on the images of --data (shape {tuple(x.shape)}): "
                         f"{one_line(exc)}") from None  # fmt: skip
    times = []
    with torch.no_grad():
        for _ in range(4):
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    model.train(was_training)
    return min(times[1:]), int(x.shape[0])


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def announce_cost(what: str, passes: int, detail: str, model: torch.nn.Module, data, device) -> None:
    """One line before a long command starts: its forward passes (a backward pass counted as two) and the time
    they take at one measured pass."""
    per, batch = seconds_per_pass(model, data, device)
    info(f"{what}: about {passes:,} forward passes of batch {batch} ({detail}) at {1000 * per:.0f} ms each "
          f"(measured): expect about {duration(passes * per)}; see --help for cheaper settings", file=sys.stderr)
