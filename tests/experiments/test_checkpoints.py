"""Bring your own models: torchvision / timm architectures, plain / wrapped / safetensors checkpoints, the
permutation file, `apply`, `align --export`, `curve --export-point` and a study on given end points."""

import json
import sys

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from neuralign.alignment import load_permutation_file, state_dict_hash
from neuralign.cli import main
from neuralign.curves import Bezier, reestimate_bn
from neuralign.errors import CheckpointError, MissingDependencyError, ShapeMismatchError
from neuralign.experiments.checkpoints import load_endpoint, read_weights, write_weights
from neuralign.experiments.data import load_data
from neuralign.experiments.models import build_model

ARCH = "torchvision:resnet18"


def _resnet18(seed: int, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("neuralign: error: "), err
    return err[-1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Three seeded torchvision resnet18 (A, B, and C of another pair) as plain .pt and .safetensors files, and a
    small seeded .npz of 16x16 RGB images."""
    folder = tmp_path_factory.mktemp("byo")
    rng = np.random.default_rng(0)
    np.savez(folder / "tiny.npz", x_train=rng.integers(0, 256, (96, 16, 16, 3), dtype=np.uint8),
             y_train=np.arange(96) % 10, x_test=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
             y_test=np.arange(40) % 10)  # fmt: skip
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        sd = _resnet18(seed).state_dict()
        torch.save(sd, folder / f"{name}.pt")
        save_file(sd, str(folder / f"{name}.safetensors"))
    return folder


def _data(folder) -> list[str]:
    return ["--data", str(folder / "tiny.npz"), "--align-size", "64", "--batch-size", "32", "--quiet"]


def test_build_model_takes_torchvision_and_timm_names_seeded(monkeypatch):
    a, b = build_model(ARCH, 7, generator=3), build_model(ARCH, 7, generator=3)
    assert isinstance(a, torchvision.models.ResNet) and a.fc.out_features == 7
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    wide = build_model("torchvision:resnet50", 3, width_per_group=128, generator=0)
    assert wide.layer1[0].conv1.out_channels == 128 and wide.fc.out_features == 3
    with pytest.raises(ValueError, match=r"unknown torchvision model 'resnet1'; did you mean \['resnet18'"):
        build_model("torchvision:resnet1", 10)
    with pytest.raises(TypeError, match="model 'torchvision:resnet18': .*unexpected keyword argument 'depth'"):
        build_model(ARCH, 10, depth=3)
    with pytest.raises(ValueError, match=r"unknown model 'keras:x'; expected one of \['tinyten'.*timm:<name>"):
        build_model("keras:x", 10)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(MissingDependencyError, match=r"needs timm, .* pip install 'neuralign\[timm\]'"):
        build_model("timm:resnet10t", 10)
    with pytest.raises(ImportError):
        build_model("timm:resnet10t", 10)


def test_read_weights_recognises_wrappers_and_prefixes_and_validates_shapes(pair, tmp_path):
    sd = torch.load(pair / "a.pt", weights_only=True)
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "lightning.pt")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "args": "x"}, tmp_path / "ddp.pth")
    plain = read_weights(pair / "a.pt")
    assert plain.format == "state_dict" and plain.wrapper is None and plain.note == ""
    wrapped = read_weights(tmp_path / "lightning.pt")
    assert wrapped.wrapper == "state_dict" and wrapped.meta == {"epoch": 3}
    assert wrapped.note == f"{tmp_path / 'lightning.pt'}: read the state dict under 'state_dict'"
    ddp = read_weights(tmp_path / "ddp.pth")
    assert ddp.prefix == "module." and ddp.wrapper == "model"
    assert ddp.note.endswith("read the state dict under 'model' and keys without their 'module.' prefix "
                             "(DistributedDataParallel)")  # fmt: skip
    for w in (wrapped, ddp, read_weights(pair / "a.safetensors")):
        assert state_dict_hash(w.state_dict) == state_dict_hash(plain.state_dict)
    model, meta = load_endpoint(tmp_path / "ddp.pth", arch=ARCH, num_classes=10)
    torch.testing.assert_close(model.state_dict(), sd, rtol=0, atol=0)
    assert meta["arch"] == ARCH and meta["hash"] == state_dict_hash(sd) and not model.training
    save_file(_resnet18(0, num_classes=100).state_dict(), str(tmp_path / "c100.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"does not fit torchvision:resnet18: it has `fc.weight` of shape "
                       r"\(100, 512\) where the architecture has \(10, 512\)"):  # fmt: skip
        load_endpoint(tmp_path / "c100.safetensors", arch=ARCH, num_classes=10)
    torch.save({k: v for k, v in sd.items() if k != "layer1.0.bn1.running_var"}, tmp_path / "short.pt")
    with pytest.raises(ShapeMismatchError, match=r"it lacks `layer1.0.bn1.running_var`"):
        load_endpoint(tmp_path / "short.pt", arch=ARCH, num_classes=10)
    with pytest.raises(CheckpointError, match=r"plain state_dict file that does not record its architecture; "
                       r"give it with --arch"):  # fmt: skip
        load_endpoint(pair / "a.pt")
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match=r"a dict without a state dict .* its keys are \['optimizer'\]"):
        read_weights(tmp_path / "opt.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        read_weights(tmp_path / "bad.safetensors")
    # written back in the input's layout: wrapper, other entries and prefix kept
    write_weights(tmp_path / "again.pth", ddp.state_dict, like=ddp)
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert again["args"] == "x" and set(again["model"]) == {f"module.{k}" for k in sd}
    with pytest.raises(ValueError, match=r"must end in one of \['.safetensors', '.pt', '.pth'\]"):
        write_weights(tmp_path / "x.bin", sd)


def test_load_endpoint_validates_our_own_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"kind": "endpoint", "arch": "mlp", "num_classes": 10, "model_kwargs": {"in_features": 64},
                "state_dict": {"hidden.0.fc.weight": torch.zeros(3, 3)}}, path)  # fmt: skip
    with pytest.raises(ShapeMismatchError, match=r"does not fit mlp: it has `hidden.0.fc.weight` of shape \(3, 3\)"):
        load_endpoint(path)
    with pytest.raises(CheckpointError, match="is a mlp, not a tinyten"):
        load_endpoint(path, arch="tinyten")
    (tmp_path / "evil.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read as data"):
        load_endpoint(tmp_path / "evil.pt")


def test_torchvision_pair_aligned_from_plain_and_safetensors_exported_and_applied(pair, tmp_path, capsys):
    """A from a plain .pt, B from .safetensors through the command line; `align --export` and `apply` write B in A's
    frame, which torchvision's own class loads strictly and which computes B's function (1e-5, float32)."""
    out = tmp_path / "al"
    code = main(["align", "--model-a", str(pair / "a.pt"), "--model-b", str(pair / "b.safetensors"), "--arch", ARCH,
                 *_data(pair), "--out", str(out), "--export", str(tmp_path / "exported.safetensors")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    record = load_permutation_file(out / "alignment.pt")
    assert record.arch == ARCH and record.method == "correlation" and record.neuralign_version
    assert record.model_a["hash"] == state_dict_hash(torch.load(pair / "a.pt", weights_only=True))
    assert record.model_b["source"] == str(pair / "b.safetensors")
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in record.perms.values())
    summary = json.loads((out / "alignment.json").read_text())
    assert summary["format_version"] == 1 and set(summary["correlation_after"]) == set(summary["groups"])
    assert sum(summary["correlation_after"].values()) > sum(summary["correlation_before"].values())
    manifest = json.loads((out / "manifest_align.json").read_text())
    assert manifest["data"]["image_size"] == [16, 16] and len(manifest["data"]["mean"]) == 3
    # apply from the plain .pt copy of B (same weights, same hash) into .pt and .safetensors
    assert main(["apply", "--model", str(pair / "b.pt"), "--perms", str(out / "alignment.pt"), "--out",
                 str(tmp_path / "applied.pt"), "--quiet"]) == 0  # fmt: skip
    assert main(["apply", "--model", str(pair / "b.safetensors"), "--perms", str(out / "alignment.pt"), "--out",
                 str(tmp_path / "applied.safetensors"), "--quiet"]) == 0  # fmt: skip
    assert (tmp_path / "manifest_apply.json").is_file()
    b = _resnet18(2).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        expected = b(x)
    exported = load_file(str(tmp_path / "exported.safetensors"))
    for loaded in (exported, load_file(str(tmp_path / "applied.safetensors")),
                   torch.load(tmp_path / "applied.pt", weights_only=True)):  # fmt: skip
        torch.testing.assert_close(loaded, exported, rtol=0, atol=0)
        user = torchvision.models.resnet18(num_classes=10)
        user.load_state_dict(loaded, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(user.eval()(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(exported["conv1.weight"], b.state_dict()["conv1.weight"])  # it was permuted
    # the same alignment written as .safetensors reads back equal
    write = load_permutation_file(out / "alignment.pt")
    from neuralign.alignment import save_permutation_file

    save_permutation_file(tmp_path / "perm.safetensors", write)
    again = load_permutation_file(tmp_path / "perm.safetensors")
    assert again.header() == write.header() and all(torch.equal(again.perms[g], write.perms[g]) for g in write.perms)


def test_a_permutation_file_of_another_pair_or_architecture_is_refused(pair, tmp_path, capsys):
    out = tmp_path / "al"
    assert main(["align", "--model-a", str(pair / "a.pt"), "--model-b", str(pair / "b.pt"), "--arch", ARCH,
                 "--method", "weight", *_data(pair), "--out", str(out)]) == 0  # fmt: skip
    perms = str(out / "alignment.pt")
    assert main(["apply", "--model", str(pair / "c.pt"), "--perms", perms, "--out", str(tmp_path / "x.pt")]) == 2
    err = _error(capsys)
    assert f"permutation file {perms!r} was computed for another model B (weights sha256:" in err
    assert err.endswith("...; another pair)")
    assert not (tmp_path / "x.pt").exists()
    assert main(["curve", "--model-a", str(pair / "c.pt"), "--model-b", str(pair / "b.pt"), "--arch", ARCH,
                 "--perms", perms, *_data(pair), "--epochs", "1", "--out", str(tmp_path / "c")]) == 2  # fmt: skip
    assert "was computed for another model A" in _error(capsys)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), tmp_path / "r34.pt")
    assert main(["apply", "--model", str(tmp_path / "r34.pt"), "--perms", perms, "--out", str(tmp_path / "y.pt")]) == 2
    assert _error(capsys).endswith(
        f"permutation file {perms!r} was computed for another architecture: model B has other keys or shapes "
        "(the first: `layer1.2.conv1.weight`, which the original lacks)"
    )
    assert main(["apply", "--model", str(tmp_path / "r34.pt"), "--perms", perms, "--arch", "torchvision:resnet34",
                 "--out", str(tmp_path / "y.pt")]) == 2  # fmt: skip
    assert _error(capsys).endswith(
        f"permutation file {perms!r} was computed for torchvision:resnet18, not torchvision:resnet34 "
        "(another architecture)"
    )


def test_permutation_file_is_validated_when_read(tmp_path):
    from neuralign.alignment import PermutationFile, SpecBuilder, save_permutation_file

    spec = SpecBuilder().group("h", 3).add("w1", 0, "h").add("w2", 1, "h").build()
    record = PermutationFile(perms={"h": torch.tensor([2, 0, 1])}, spec=spec, method="test",
                             model_a={"hash": None}, model_b={"hash": None})  # fmt: skip
    save_permutation_file(tmp_path / "p.pt", record)
    state = torch.load(tmp_path / "p.pt", weights_only=True)
    header = json.loads(state["header"])
    assert header["format"] == "neuralign-permutation" and header["spec"]["sizes"] == {"h": 3}
    header["format_version"] = 2
    torch.save({**state, "header": json.dumps(header)}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="has format version 2; this neuralign reads versions up to 1"):
        load_permutation_file(tmp_path / "future.pt")
    torch.save({**state, "perms": {"h": torch.tensor([0, 0, 1])}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"group `h` is not a permutation of 0..2"):
        load_permutation_file(tmp_path / "bad.pt")
    torch.save({"kind": "alignment", "perms": {}}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="of kind 'alignment', expected 'permutation' .*run align again"):
        load_permutation_file(tmp_path / "old.pt")
    with pytest.raises(ValueError, match="a permutation file must end in one of"):
        save_permutation_file(tmp_path / "p.json", record)
    sd = {"w1": torch.randn(3, 2), "w2": torch.randn(4, 3)}
    recorded = PermutationFile(**{**record.__dict__, "model_b": {"hash": state_dict_hash(sd)}})
    recorded.check_pair(model_b=sd, hash_b=state_dict_hash(sd))  # the pair it was made for passes
    other = {k: v + 1 for k, v in sd.items()}
    with pytest.raises(CheckpointError, match=r"computed for another model B \(weights sha256:.*; another pair\)"):
        recorded.check_pair(model_b=other, hash_b=state_dict_hash(other))
    with pytest.raises(CheckpointError, match=r"does not fit model B .*`w2` of shape \(4, 2\)"):
        record.check_pair(model_b={"w1": torch.randn(3, 2), "w2": torch.randn(4, 2)})


def test_curve_export_point_writes_the_network_at_t_with_reestimated_batch_norm(pair, tmp_path, capsys):
    a, b = _resnet18(1), _resnet18(2)
    curve = Bezier.between(dict(a.named_parameters()), dict(b.named_parameters()))
    curve.save(tmp_path / "curve.pt")
    out = tmp_path / "w.safetensors"
    assert main(["curve", "--model-a", str(pair / "a.safetensors"), "--model-b", str(pair / "b.safetensors"),
                 "--arch", ARCH, *_data(pair), "--from", str(tmp_path / "curve.pt"), "--export-point", "0.25",
                 "--bn-batches", "2", "--out", str(out)]) == 0  # fmt: skip
    exported = load_file(str(out))
    user = torchvision.models.resnet18(num_classes=10)
    user.load_state_dict(exported, strict=True)
    params = {k: v.detach() for k, v in curve(0.25).items()}
    data = load_data(str(pair / "tiny.npz"), align_size=64, batch_size=32, generator=0)
    buffers = reestimate_bn(a, params, data.train, max_batches=2)
    for k, v in {**params, **buffers}.items():
        torch.testing.assert_close(exported[k], v, rtol=1e-6, atol=1e-6, msg=k)
    assert not torch.allclose(exported["bn1.running_mean"], a.state_dict()["bn1.running_mean"])
    assert main(["curve", "--model-a", str(pair / "a.pt"), "--model-b", str(pair / "b.pt"), "--arch", ARCH,
                 *_data(pair), "--export-point", "0.5", "--out", str(tmp_path / "w")]) == 2  # fmt: skip
    assert "with --export-point, --out is the weight file to write and must end in one of" in _error(capsys)


def test_curve_fitted_and_exported_in_one_command_then_evaluated(tmp_path, capsys):
    """Zoo end points as plain state dicts: fit a curve and export its midpoint in one command (the curve's files go
    next to the weight file), then evaluate the curve from the plain checkpoint."""
    data = ["--data", "digits", "--resize", "16", "--train-size", "128", "--test-size", "64", "--quiet"]
    for seed in (1, 2):
        torch.save(build_model("tinyten", 10, generator=seed, in_channels=1).state_dict(), tmp_path / f"t{seed}.pt")
    pair_args = ["--model-a", str(tmp_path / "t1.pt"), "--model-b", str(tmp_path / "t2.pt"), "--arch", "tinyten",
                 "--model-arg", "in_channels=1"]  # fmt: skip
    out = tmp_path / "run" / "mid.pt"
    assert main(["curve", *pair_args, *data, "--epochs", "1", "--export-point", "0.5", "--out", str(out)]) == 0
    assert (tmp_path / "run" / "curve.pt").is_file() and (tmp_path / "run" / "manifest_curve.json").is_file()
    model = build_model("tinyten", 10, in_channels=1)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert main(["evaluate", "--model-a", str(tmp_path / "t1.pt"), "--arch", "tinyten", "--model-arg",
                 "in_channels=1", "--curve", str(tmp_path / "run" / "curve.pt"), *data, "--num-points", "3",
                 "--bn-batches", "1", "--out", str(tmp_path / "ev")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["t"] == [0.0, 0.5, 1.0]


def test_timm_pair_aligned_from_safetensors(tmp_path, capsys):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (neuralign[timm])")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", x_train=rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8),
             y_train=np.arange(64) % 10, x_test=rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8),
             y_test=np.arange(20) % 10)  # fmt: skip
    for seed in (1, 2):
        torch.manual_seed(seed)
        save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), str(tmp_path / f"m{seed}.safetensors"))
    code = main(["align", "--model-a", str(tmp_path / "m1.safetensors"), "--model-b", str(tmp_path / "m2.safetensors"),
                 "--arch", "timm:resnet10t", "--data", str(tmp_path / "tiny.npz"), "--quiet", "--out",
                 str(tmp_path / "al"), "--export", str(tmp_path / "b.safetensors")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    torch.manual_seed(2)
    b = timm.create_model("resnet10t", num_classes=10).eval()
    user = timm.create_model("resnet10t", num_classes=10)
    user.load_state_dict(load_file(str(tmp_path / "b.safetensors")), strict=True)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(user.eval()(x), b(x), rtol=1e-5, atol=1e-5)


def test_study_runs_on_given_end_points(tmp_path, capsys):
    for seed in (1, 2):
        torch.save({"state_dict": build_model("tinyten", 10, generator=seed, in_channels=1).state_dict()},
                   tmp_path / f"e{seed}.pt")  # fmt: skip
    tiny = ["--set", "curve.epochs=1", "--set", "pam.x_epochs=1", "--set", "evaluation.num_points=3",
            "--set", "evaluation.plane_grid=0", "--set", "verification=false", "--set", "max_batches=2",
            "--set", "evaluation.max_bn_batches=1", "--set", "settings=aligned,"]  # fmt: skip
    code = main(["study", "--preset", "demo", "--arch", "tinyten", "--endpoints", str(tmp_path / "e1.pt"),
                 str(tmp_path / "e2.pt"), "--data", "digits", "--resize", "16", "--train-size", "128",
                 "--test-size", "64", "--quiet", "--out", str(tmp_path / "s"), *tiny])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert results["config"]["endpoints"] == [str(tmp_path / "e1.pt"), str(tmp_path / "e2.pt")]
    assert not (tmp_path / "s" / "endpoints").exists()  # nothing trained
    record = load_permutation_file(tmp_path / "s" / "pair1" / "alignment.pt")
    assert record.model_a["source"] == str(tmp_path / "e1.pt") and record.arch == "tinyten"
    assert set(results["pairs"][0]["curves"]) == {"aligned"}
