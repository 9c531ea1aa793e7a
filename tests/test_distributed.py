"""Data parallelism on CPU with gloo and 2 processes: every data-parallel function against one process.

One ``torch.multiprocessing`` spawn (module fixture) runs every function on 2 ranks and saves what each rank got;
each test computes the one-process reference on the same global batches and compares. The torchrun tests launch
``python -m torch.distributed.run --standalone`` in a subprocess (an interrupted run resumed, the CLI manifest).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from neuralign import _distributed
from neuralign.alignment import align
from neuralign.attacks import PGD
from neuralign.curves import Line, evaluate_curve, evaluate_model, fit_curve, fit_curve_pam, reestimate_bn
from neuralign.experiments.training import train_model
from tests.planted import planted_copy, small_mlp

WORLD = 2
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ shared inputs
def _bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5),
                         nn.BatchNorm1d(5))  # fmt: skip


def _batches(sizes, shape, seed: int, classes: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)) for n in sizes]


# global batches: even and odd sizes, so that the slices of some batches differ in size (7 -> 4 + 3)
SIZES = (12, 12, 7, 10)


def _inputs() -> dict:
    a, b = small_mlp(1), small_mlp(2)
    planted = planted_copy(a)  # B = A permuted plus a little noise: alignment has a clear answer
    return {
        "a": a, "b": b, "planted": planted, "bn": _bn_net(4),
        "data": _batches(SIZES, (6,), 5), "images": _batches(SIZES, (3, 8, 8), 6, classes=5),
    }  # fmt: skip


def _bn_curve_summary(inp: dict) -> dict:
    """evaluate_curve on a segment between two batch-norm nets (a batch-norm pass and an evaluation per point)."""
    bn = inp["bn"]
    line = Line.between(dict(bn.named_parameters()), dict(_bn_net(7).named_parameters()))
    ev = evaluate_curve(bn, line, inp["images"], inp["images"], num_points=3)
    return {"loss": ev.test_loss, "accuracy": ev.test_accuracy}


def _run_all(inp: dict) -> dict:
    """Every data-parallel function on ``inp``; the same code runs in one process and on each rank."""
    a, b, data = inp["a"], inp["b"], inp["data"]
    out = {}
    res = align(inp["a"], inp["planted"], [x for x, _ in data])
    out["align"] = {"perms": res.perms, "after": res.correlation_after}
    bn = inp["bn"]
    out["bn"] = reestimate_bn(bn, dict(bn.named_parameters()), inp["images"])
    out["bn_curve"] = _bn_curve_summary(inp)
    out["eval"] = evaluate_model(a, data)
    fit = fit_curve(a, a.state_dict(), b.state_dict(), data, epochs=1, generator=0, weight_decay=5e-4)
    out["curve"] = fit.curve.points[1]
    out["curve_history"] = {k: v for k, v in fit.history[0].items() if k != "time"}
    trained = train_model(a, data, epochs=1, lr=0.05)
    out["train"] = trained.state_dict
    out["train_history"] = {k: v for k, v in trained.history[0].items() if k != "seconds"}
    pam = fit_curve_pam(a, a.state_dict(), b.state_dict(), data, init="identity", x_epochs=1, max_iter=1,
                        gradient_batches=2, value_batches=2, generator=0, lam=10.0, swap_trials=2)  # fmt: skip
    out["pam"] = {"perms": pam.perms, "control": pam.curve.points[1], "history": pam.history}
    out["neighbourhood"] = _neighbourhood(inp, res.perms)
    return out


def _neighbourhood(inp: dict, perms) -> dict:
    """The neighbourhood check of ``perms`` (B = the planted copy) on a fixed line: 2 held-out batches of 32
    scored, the screen on the next 64 examples (under a process group each rank screens its share of every slice
    and the race sums over ranks). Per group: the candidates raced on each slice, the best scored move's units and
    change."""
    from neuralign.alignment import apply_permutation, trace_spec
    from neuralign.curves import Bezier
    from neuralign.verification import verify_alignment

    a, b = inp["a"], inp["planted"]
    aligned = apply_permutation(b.state_dict(), trace_spec(a, inp["data"][0][0]), perms)
    params = [{k: sd[k] for k, _ in a.named_parameters()} for sd in (a.state_dict(), aligned)]
    held = _batches((32,) * 5, (6,), 9)
    report = verify_alignment(a, a.state_dict(), b.state_dict(), perms, inp["data"], checks=("neighbourhood",),
                              curve=Bezier.between(*params), heldout_loader=held, value_batches=2, screen_examples=64,
                              n_swaps=2, n_control_swaps=2, generator=0).checks["neighbourhood"]  # fmt: skip
    rows = report.details["per_group"]
    return {g: {"raced": row["raced"], "best_change": row["best_change"],
                "best_move": [int(u) for u in re.findall(r"\d+", report.details["best_move"][g])]}
            for g, row in rows.items()}  # fmt: skip


def _ranks_only(inp: dict, folder: str) -> dict:
    """What only a process group has: a stopped-then-resumed run (checkpoint written by rank 0, read by all), and
    the refusal of a batch smaller than the world."""
    out = {}
    data, a = inp["data"], inp["a"]
    whole = train_model(a, data, epochs=3, lr=0.05, checkpoint=f"{folder}/whole.ckpt")
    train_model(a, data, epochs=3, lr=0.05, checkpoint=f"{folder}/cut.ckpt", callback=lambda r: r["epoch"] == 1)
    resumed = train_model(a, data, epochs=3, lr=0.05, checkpoint=f"{folder}/cut.ckpt")
    out["resume"] = (whole.state_dict, resumed.state_dict)
    # a robust fit on batches that split unevenly (5 -> 3 + 2, 7 -> 4 + 3): t must stay in step on the ranks
    g = torch.Generator().manual_seed(8)
    boxed = [(torch.rand(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (5, 7, 9)]
    t_generator = torch.Generator().manual_seed(0)
    robust = fit_curve(a, a.state_dict(), inp["b"].state_dict(), boxed, epochs=2, generator=t_generator,
                       adversarial=PGD(eps=0.1, alpha=0.05, steps=2))  # fmt: skip
    out["robust_curve"] = robust.curve.points[1]
    out["robust_t_state"] = t_generator.get_state()
    try:
        train_model(a, [(torch.randn(1, 6), torch.tensor([0]))], epochs=1, lr=0.05)
    except ValueError as exc:
        out["small_batch_error"] = str(exc)
    # a loader built with another seed on each rank (here: the same batches, rank r's order starting at batch r) is
    # refused on every rank
    order = [(i + _distributed.rank()) % len(data) for i in range(len(data))]
    own, own_images = [data[i] for i in order], [inp["images"][i] for i in order]
    for name, call in (("bn", lambda: reestimate_bn(inp["bn"], dict(inp["bn"].named_parameters()), own_images)),
                       ("train", lambda: train_model(a, own, epochs=1, lr=0.05))):  # fmt: skip
        try:
            call()
        except ValueError as exc:
            out[f"{name}_mismatch_error"] = str(exc)
    return out


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        inp = _inputs()
        torch.save({**_run_all(inp), **_ranks_only(inp, folder)}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(folder),), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def inputs() -> dict:
    return _inputs()


# ------------------------------------------------------------------------------------------------ tests
def test_helpers_without_a_process_group_are_identities():
    x, y = torch.arange(5.0), torch.arange(5)
    assert _distributed.shard_batch(x, y) == (x, y, 1.0)
    assert _distributed.describe() == {"world_size": 1, "backend": None, "rank": 0}
    assert _distributed.on_rank_zero(lambda: 7) == 7
    assert _distributed.all_reduce_sum(torch.tensor([1, 2])).dtype == torch.float64
    assert _distributed.backend_for("cuda:1") == "nccl" and _distributed.backend_for("cpu") == "gloo"


def test_ranks_agree(ranks):
    # every rank ends with the same numbers (same global batches, all-reduced sums and gradients)
    numbers = [{k: v for k, v in r.items() if not k.endswith("_error")} for r in ranks]
    torch.testing.assert_close(numbers[0], numbers[1], rtol=0, atol=0)
    assert ranks[0]["small_batch_error"] == ranks[1]["small_batch_error"]


def test_align_gives_the_one_process_permutations(ranks, inputs):
    one = align(inputs["a"], inputs["planted"], [x for x, _ in inputs["data"]])
    for g, p in one.perms.items():
        assert torch.equal(ranks[0]["align"]["perms"][g], p), g
    # the moments are merged in float64: correlations agree far below the float32 inputs' precision
    for g, c in one.correlation_after.items():
        assert abs(ranks[0]["align"]["after"][g] - c) < 1e-6


def test_reestimate_bn_equals_the_one_process_average(ranks, inputs):
    # whole batches round-robin: every batch's statistics are the one-process ones, whatever the world size (with
    # slices, running_var differed by ~1% and num_batches_tracked doubled); the float64 sums differ only in order
    bn = inputs["bn"]
    ref = reestimate_bn(bn, dict(bn.named_parameters()), inputs["images"])
    for key, value in ref.items():
        if value.is_floating_point():
            torch.testing.assert_close(ranks[0]["bn"][key], value, rtol=0, atol=1e-6)
        else:
            assert torch.equal(ranks[0]["bn"][key], value), key  # num_batches_tracked: the global batches
    assert int(ranks[0]["bn"]["1.num_batches_tracked"]) == len(SIZES)


def test_evaluate_curve_with_batch_norm_equals_one_process(ranks, inputs):
    # the study's numbers: a batch-norm pass (train mode) then an evaluation at each point; float32 logits of the
    # same whole batches, summed in float64 in another order: equal to far below 1e-6
    want = _bn_curve_summary(inputs)
    got = ranks[0]["bn_curve"]
    assert got["accuracy"] == want["accuracy"]
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(want["loss"]), rtol=0, atol=1e-6)


def test_ranks_with_different_loaders_are_refused(ranks):
    for r in ranks:
        for name in ("bn", "train"):
            assert "yields different first batches on different ranks" in r[f"{name}_mismatch_error"], name


def test_evaluate_model_sums_over_ranks(ranks, inputs):
    loss, acc = evaluate_model(inputs["a"], inputs["data"])
    assert ranks[0]["eval"][1] == acc
    assert abs(ranks[0]["eval"][0] - loss) < 1e-6


# Tolerances for the training tests: a rank's slice gradient is summed with the other's instead of being one mean
# over the batch, which changes the float32 rounding of each gradient by a few ulps (relative ~1e-7); over the 4
# steps of one epoch with lr <= 0.1 and weights of order 0.3 the difference stays below 1e-6 absolute. 1e-5 leaves
# a margin of 10 and is still far below a one-step change (lr * |grad| ~ 1e-3).
ATOL = 1e-5


def test_fit_curve_epoch_equals_one_process(ranks, inputs):
    a, b, data = inputs["a"], inputs["b"], inputs["data"]
    one = fit_curve(a, a.state_dict(), b.state_dict(), data, epochs=1, generator=0, weight_decay=5e-4)
    for got, want in zip(ranks[0]["curve"].values(), one.curve.points[1].values()):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    for key in ("loss", "objective", "accuracy"):
        assert abs(ranks[0]["curve_history"][key] - one.history[0][key]) < 1e-6, key


def test_train_model_epoch_equals_one_process(ranks, inputs):
    one = train_model(inputs["a"], inputs["data"], epochs=1, lr=0.05)
    torch.testing.assert_close(ranks[0]["train"], one.state_dict, rtol=0, atol=ATOL)
    for key in ("train_loss", "train_acc"):
        assert abs(ranks[0]["train_history"][key] - one.history[0][key]) < 1e-6, key


def test_fit_curve_pam_equals_one_process(ranks, inputs):
    a, b, data = inputs["a"], inputs["b"], inputs["data"]
    one = fit_curve_pam(a, a.state_dict(), b.state_dict(), data, init="identity", x_epochs=1, max_iter=1,
                        gradient_batches=2, value_batches=2, generator=0, lam=10.0, swap_trials=2)  # fmt: skip
    got = ranks[0]["pam"]
    for g, p in one.perms.items():
        assert torch.equal(got["perms"][g], p), g
    for x, y in zip(got["control"].values(), one.curve.points[1].values()):
        torch.testing.assert_close(x, y, rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.tensor(got["history"]), torch.tensor(one.history), rtol=1e-5, atol=1e-6)


def test_neighbourhood_screen_races_the_same_candidates_as_one_process(ranks, inputs):
    # each rank screens its share of every slice; the race's sums are all-reduced, so that every rank ranks and
    # scores the same moves as one process (no batch norm here: the same values up to summation order). A rank
    # that raced on its own share alone would rank other moves.
    res = align(inputs["a"], inputs["planted"], [x for x, _ in inputs["data"]])
    one = _neighbourhood(inputs, res.perms)
    got = ranks[0]["neighbourhood"]
    assert got.keys() == one.keys()
    for g, row in one.items():
        assert got[g]["raced"] == row["raced"] and got[g]["best_move"] == row["best_move"], g
        assert abs(got[g]["best_change"] - row["best_change"]) < 1e-6, g


def test_robust_fit_keeps_t_in_step_on_uneven_slices(ranks):
    # the t generator drew the same values on both ranks (one per global batch, none for the attacks' starts)
    want = torch.Generator().manual_seed(0)
    torch.randint(0, 2**62, (1,), generator=want)  # the attack's seed
    torch.rand(6, dtype=torch.float64, generator=want)  # 3 batches x 2 epochs
    for r in ranks:
        assert torch.equal(r["robust_t_state"], want.get_state())
    torch.testing.assert_close(ranks[0]["robust_curve"], ranks[1]["robust_curve"], rtol=0, atol=0)


def test_shard_refuses_a_batch_smaller_than_the_world(ranks):
    message = ranks[0]["small_batch_error"]
    assert "yielded a batch of 1 samples, which cannot be split over 2 ranks" in message
    assert "drop the last" not in message and "--batch-size" in message


def test_stopped_run_resumes_on_every_rank_to_the_same_result(ranks):
    for r in ranks:
        whole, resumed = r["resume"]
        torch.testing.assert_close(resumed, whole, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ torchrun
def _torchrun(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


RESUME_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from torch import nn
    from neuralign.experiments.data import ArrayDataset, ArrayLoader
    from neuralign.experiments.training import train_model
from tests.planted import planted_copy, small_mlp
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out, stop = sys.argv[1], int(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(90, 1, 4, 4, generator=g) * 255).to(torch.uint8)
    loader = ArrayLoader(ArrayDataset(images, torch.randint(0, 3, (90,), generator=g)), batch_size=16, shuffle=True,
                         generator=7)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def callback(record):
        if record["epoch"] == stop and dist.get_rank() == 0:
            os._exit(3)   # a hard interruption (pre-emption) right after this epoch's checkpoint

    res = train_model(net, loader, epochs=4, lr=0.05, checkpoint=os.path.join(out, "train.ckpt"), callback=callback)
    if dist.get_rank() == 0:
        torch.save(res.state_dict, os.path.join(out, "final.pt"))
    dist.destroy_process_group()
""")


@pytest.mark.slow  # three torchrun launches: ~35 s on 2 cores
def test_interrupted_torchrun_resumes_to_the_same_result(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    done = _torchrun(str(script), str(whole), "0")
    assert done.returncode == 0, done.stderr[-2000:]
    killed = _torchrun(str(script), str(cut), "2")
    assert killed.returncode != 0 and (cut / "train.ckpt").exists() and not (cut / "final.pt").exists()
    assert torch.load(cut / "train.ckpt", weights_only=True)["data"]["epoch"] == 2
    resumed = _torchrun(str(script), str(cut), "0")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    torch.testing.assert_close(torch.load(cut / "final.pt"), torch.load(whole / "final.pt"), rtol=0, atol=0)


@pytest.mark.slow  # two torchrun launches: ~30 s on 2 cores
def test_cli_under_torchrun_records_the_process_group(tmp_path):
    run = _torchrun("-m", "neuralign", "evaluate", "--help")
    assert run.returncode == 0, run.stderr[-2000:]
    run = _torchrun("-m", "neuralign", "train", "--arch", "mlp", "--data", "digits", "--epochs", "1", "--quiet",
                    "--out", str(tmp_path))  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = json.loads((tmp_path / "manifest_train_mlp_seed0.json").read_text())
    assert manifest["distributed"] == {"world_size": 2, "backend": "gloo", "rank": 0}
    assert run.stdout.count("mlp_seed0.pt") == 1  # rank 0 alone prints the paths
    assert run.stderr.count("test accuracy") == 1  # and the result



@pytest.mark.slow  # a tiny demo study on 2 ranks: ~60 s on 2 cores
def test_study_under_torchrun_records_the_process_group(tmp_path):
    tiny = ["--set", "train.epochs=1", "--set", "curve.epochs=1", "--set", "pam.x_epochs=1",
            "--set", "evaluation.num_points=3", "--set", "evaluation.plane_grid=3", "--set", "verification.n_swaps=2",
            "--set", "verification.swap_trials=2", "--set", "max_batches=3",
            "--set", "evaluation.max_bn_batches=2"]  # fmt: skip
    run = _torchrun("-m", "neuralign", "study", "--preset", "demo", "--quiet", "--out", str(tmp_path), *tiny)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("report.md") == 1 and run.stderr.count("time per stage") == 1
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["runs"][-1]["distributed"] == {"world_size": 2, "backend": "gloo", "rank": 0}
    record = json.loads((tmp_path / "stages" / "pair_1_curve_aligned.json").read_text())
    assert record["distributed"]["world_size"] == 2
