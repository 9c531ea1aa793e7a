"""The shared private modules every layer uses: option objects (`_options`), validation (`_validate`), the JSON codec
of result files (`_json`), the statistics of the paired tests (`_stats`) and the one checkpoint of resumable loops
(`_epochs`)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from neuralign import _json
from neuralign._epochs import CHECKPOINT_VERSION, EpochCheckpoint
from neuralign._options import Options, nested, renamed_keywords, resolve_options, set_path, setting_paths
from neuralign._stats import bonferroni_quantile, paired_change, wilson_interval
from neuralign._utils import atomic_save
from neuralign._validate import check_bool, check_choice, check_int, check_real
from neuralign.errors import CheckpointError


# ------------------------------------------------------------------------------------------------ _validate
@pytest.mark.parametrize("value, expected", [(3, 3), (np.int64(3), 3)])
def test_check_int_accepts_ints_and_numpy_ints(value, expected):
    out = check_int(value, "n", minimum=1)
    assert out == expected and type(out) is int


@pytest.mark.parametrize("value, error, message", [
    (0, ValueError, r"^`n` must be a positive int, got 0$"),
    (True, TypeError, r"^`n` must be a positive int, got bool True$"),
    (1.0, TypeError, r"^`n` must be a positive int, got float 1.0$"),
    ("2", TypeError, r"^`n` must be a positive int, got str '2'$"),
])  # fmt: skip
def test_check_int_refuses_in_one_line(value, error, message):
    with pytest.raises(error, match=message):
        check_int(value, "n", minimum=1)


def test_check_real_bounds_nan_inf_and_none():
    assert check_real(np.float32(0.5), "x", low=0.0, high=1.0, low_open=True) == 0.5
    assert check_real(None, "x", allow_none=True) is None
    assert check_real(math.inf, "lam", low=0.0, low_open=True, allow_inf=True) == math.inf
    with pytest.raises(ValueError, match=r"^`x` must be a finite number in \(0, 1\], got 0.0$"):
        check_real(0.0, "x", low=0.0, high=1.0, low_open=True)
    with pytest.raises(ValueError, match=r"^`x` must be a finite number >= 0, got nan$"):
        check_real(math.nan, "x", low=0.0)
    with pytest.raises(ValueError, match=r"^`lam` must be a number > 0, got nan$"):
        check_real(math.nan, "lam", low=0.0, low_open=True, allow_inf=True)
    with pytest.raises(ValueError, match=r"^`x` must be a finite number, got inf$"):
        check_real(math.inf, "x")
    with pytest.raises(TypeError, match=r"^`x` must be a finite number, got bool False$"):
        check_real(False, "x")
    assert check_bool(np.bool_(True), "b") is True
    with pytest.raises(TypeError, match=r"^`b` must be a bool \(True or False\), got int 1$"):
        check_bool(1, "b")
    with pytest.raises(ValueError, match=r"^unknown method 'x'; expected one of \['a', 'b'\]$"):
        check_choice("x", "method", ("b", "a"))


# ------------------------------------------------------------------------------------------------ _options
@dataclasses.dataclass(frozen=True)
class _Step(Options):
    method = "plain"
    size: int = 1

    def __post_init__(self) -> None:
        check_int(self.size, "size", minimum=1)


@dataclasses.dataclass(frozen=True)
class _Other(Options):
    method = "other"
    rate: float = 0.5


@dataclasses.dataclass(frozen=True)
class _Outer(Options):
    step: Options = nested(_Step, _Other, default=_Step(), named=(_Step(size=2),))
    extra: _Other | None = nested(_Other, optional=True, default=None)
    ts: tuple[float, ...] = (0.5,)


def test_options_round_trip_replace_and_refuse_unknown_names():
    outer = _Outer(step=_Other(rate=0.25), extra=_Other(), ts=(0.1, 0.2))
    data = outer.to_dict()
    assert data == {"step": {"method": "other", "rate": 0.25}, "extra": {"rate": 0.5}, "ts": [0.1, 0.2]}
    assert _Outer.from_dict(data).to_dict() == data
    assert _Outer().replace(step="plain").step == _Step(size=2)  # a name means the field's own default
    with pytest.raises(ValueError, match=r"^unknown _Outer options \['stp'\]; expected some of \['extra', 'step', "
                                         r"'ts'\]$"):  # fmt: skip
        _Outer().replace(stp=1)
    with pytest.raises(ValueError, match=r"`_Outer.step` needs a `method` among \['other', 'plain'\], got 'nope'"):
        _Outer.from_dict({"step": {"method": "nope"}})


def test_set_path_walks_groups_and_names_the_full_path():
    outer = set_path(_Outer(), "step.size", 3)
    assert outer.step == _Step(size=3)
    assert set_path(_Outer(), "extra.rate", 0.1).extra == _Other(rate=0.1)  # a None group takes its default first
    with pytest.raises(ValueError, match=r"^unknown setting 'step.rate': _Step has no 'rate'; expected one of "
                                         r"\['size'\]$"):  # fmt: skip
        set_path(_Outer(), "step.rate", 1.0)
    with pytest.raises(ValueError, match=r"^unknown setting 'ts.x': 'ts' is a value, not a group of settings$"):
        set_path(_Outer(), "ts.x", 1.0)
    with pytest.raises(ValueError, match=r"^`size` must be a positive int, got 0$"):
        set_path(_Outer(), "step.size", 0)
    assert setting_paths(_Outer) == ["step", "step.size", "step.rate", "extra", "extra.rate", "ts"]


def test_keyword_overrides_and_renamed_keywords():
    assert resolve_options(_Step, None, {"size": 4}, where="f") == _Step(size=4)
    with pytest.raises(TypeError, match=r"f\(\) got unexpected keyword arguments \['sise'\]; its options are "
                                        r"\['size'\]"):  # fmt: skip
        resolve_options(_Step, None, {"sise": 4}, where="f")
    with pytest.raises(TypeError, match=r"`options` of f must be a _Step, got _Other"):
        resolve_options(_Step, _Other(), {}, where="f")
    with pytest.warns(DeprecationWarning, match=r"f\(\): `old` is deprecated since neuralign 0.2; use `new`"):
        assert renamed_keywords({"old": 1}, {"old": "new"}, where="f") == {"new": 1}
    with pytest.raises(TypeError, match=r"f\(\) got unexpected keyword arguments \['what'\]"):
        renamed_keywords({"what": 1}, {"old": "new"}, where="f")


# ------------------------------------------------------------------------------------------------ _json, _stats
def test_the_json_codec_writes_strict_json_and_reads_it_back():
    data = {"a": math.inf, "b": [-math.inf, 1.5], "c": torch.tensor([1, 2]), "d": np.float64(0.25), "e": (1, 2)}
    text = _json.dumps(data)
    assert "Infinity" not in text and "NaN" not in text
    back = _json.loads(text)
    assert back == {"a": math.inf, "b": [-math.inf, 1.5], "c": [1, 2], "d": 0.25, "e": [1, 2]}
    assert math.isnan(_json.loads(_json.dumps({"x": math.nan}))["x"])
    with pytest.raises(TypeError, match=r"`value\['f'\]` is a object, which cannot be written as JSON"):
        _json.dumps({"f": object()})


def test_the_paired_test_statistics():
    mean, se = paired_change(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert mean == pytest.approx(1.0) and se == pytest.approx(1.0 / math.sqrt(3))
    # one test, 2 batches: Student's t with 1 degree of freedom, 95 %: 6.314 (tables); fewer than 2: never
    assert bonferroni_quantile(0.05, 1, 2) == pytest.approx(6.3138, abs=1e-4)
    assert bonferroni_quantile(0.05, 10, 1) == math.inf
    lo, hi = wilson_interval(0, 40)
    assert lo == 0.0 and hi == pytest.approx(0.0876, abs=1e-4)


# ------------------------------------------------------------------------------------------------ _epochs
def test_an_epoch_checkpoint_restores_everything_and_refuses_other_runs(tmp_path):
    path = tmp_path / "run.ckpt"
    net, gen = torch.nn.Linear(3, 2), torch.Generator().manual_seed(5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    saved = EpochCheckpoint(path, "loop", config={"lr": 0.1, "ends": torch.ones(2)}, objects={"net": net, "opt": opt,
                            "gen": gen})  # fmt: skip
    saved.save({"epoch": 3, "history": [1.0, 2.0]})
    expected_draw = torch.rand(2, generator=gen)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    # a fresh loop restores the model, optimizer, generator and data
    net2, gen2 = torch.nn.Linear(3, 2), torch.Generator().manual_seed(99)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    again = EpochCheckpoint(path, "loop", config={"lr": 0.1, "ends": torch.ones(2)},
                            objects={"net": net2, "opt": opt2, "gen": gen2})  # fmt: skip
    assert again.restore() == {"epoch": 3, "history": [1.0, 2.0]}
    assert all(torch.equal(net2.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(torch.rand(2, generator=gen2), expected_draw)
    assert opt2.state_dict()["state"][0]["momentum_buffer"] is not None
    for config, message in (({"lr": 0.2, "ends": torch.ones(2)}, r"its lr is 0.1, this run's is 0.2"),
                            ({"lr": 0.1, "ends": torch.zeros(2)}, r"its ends entry differs from this run's")):
        with pytest.raises(CheckpointError, match=message):
            EpochCheckpoint(path, "loop", config=config, objects={}).restore()
    with pytest.raises(CheckpointError, match=r"is of kind 'loop', expected 'other'"):
        EpochCheckpoint(path, "other", config={}, objects={}).restore()
    with pytest.raises(CheckpointError, match=r"belongs to another model: `checkpoint` has parameter `weight`"):
        EpochCheckpoint(path, "loop", config={}, objects={"net": torch.nn.Linear(3, 5)}).restore()
    assert EpochCheckpoint(tmp_path / "none.ckpt", "loop", config={}, objects={}).restore() is None


def test_a_checkpoint_of_before_0_2_is_refused_by_name(tmp_path):
    path = tmp_path / "old.ckpt"
    atomic_save({"kind": "train_model", "model": {}, "epoch": 2}, path)  # 0.1's own format, no version
    with pytest.raises(CheckpointError, match=rf"has format version None, this neuralign reads version "
                                              rf"{CHECKPOINT_VERSION} \(it was written by an older neuralign\): "
                                              r"delete it to start over"):  # fmt: skip
        EpochCheckpoint(path, "train_model", config={}, objects={}).restore()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CHECKPOINT_VERSION == 2
