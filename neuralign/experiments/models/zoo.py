r"""The zoo's registry: :func:`build_model` builds a model by name (the zoo's own, ``torchvision:<name>`` or
``timm:<name>``) with an optional seeded, RNG-neutral initialisation; :func:`available_models` lists the zoo's
names; :func:`smallest_input_size` says whether a model takes images of a given size.

Every model of the zoo is written for neuron alignment:

- **Plain layers only.** ``nn.Conv2d``, ``nn.BatchNorm*``, ``nn.Linear``, ``nn.ReLU``, ``nn.MaxPool2d``,
  ``nn.AdaptiveAvgPool2d``, ``nn.Flatten``, ``nn.Dropout``; no curve layers and no custom autograd. Curves and
  permutations act on the state dict, so a model here is always an end point or a point of a curve.
- **Traceable by** :func:`torch.fx.symbolic_trace`. No Python control flow depends on tensor values; the only
  branches are on Python attributes fixed at construction (``downsample is None``, ``bn is None``) and on
  ``self.training`` (GoogLeNet's auxiliary heads), so a trace taken in train mode and one taken in eval mode
  are each exact for that mode.
- **One ReLU module per call site.** Alignment taps post-activations per call site (a forward hook on each
  ``nn.ReLU`` module, or the matching fx node), so no ``nn.ReLU`` object is ever called twice in one forward
  pass: a residual block owns ``relu1`` (interior) and ``relu2`` (after the skip addition), a classifier owns
  one ReLU per hidden layer. Every ReLU is ``inplace=False`` so that a hook on the preceding BatchNorm still
  sees the pre-activation.
- **Stable names.** Parameter names follow torchvision where an equivalent exists (``conv1``, ``bn1``,
  ``downsample.0``, ``inception4a.branch2.1.conv``, ``aux1.fc1``, ``fc``).

Randomness: ``nn.Module`` initialisers draw from the *global* torch RNG (there is no ``generator=`` argument
on ``nn.init``). :func:`build_model` therefore takes ``generator=`` (a seed): with a seed the model is built
inside
``torch.random.fork_rng()`` after ``torch.manual_seed(seed)``, so that two builds with the same seed have
identical weights and the caller's global RNG state is left exactly as it was. Without a seed the global RNG
is used (and advanced), as for any ``nn.Module``.

References
----------
.. [1] K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
   arXiv:1512.03385.
.. [2] K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
   ICLR 2015, arXiv:1409.1556.
.. [3] C. Szegedy et al., "Going Deeper with Convolutions", CVPR 2015, arXiv:1409.4842.
.. [4] S. Kornblith, M. Norouzi, H. Lee, G. Hinton, "Similarity of Neural Network Representations Revisited",
   ICML 2019, arXiv:1905.00414.
.. [5] N. J. Tatro, P.-Y. Chen, P. Das, I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode Connectivity via
   Neuron Alignment", NeurIPS 2020, arXiv:2009.02439.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from neuralign._options import renamed_keywords
from neuralign._utils import as_seed
from neuralign._validate import check_int
from neuralign.errors import MissingDependencyError
from neuralign.experiments.models.googlenet import GoogLeNet
from neuralign.experiments.models.lm import TinyLM
from neuralign.experiments.models.mlp import MLP
from neuralign.experiments.models.resnet import resnet20, resnet32
from neuralign.experiments.models.tinyten import TinyTen
from neuralign.experiments.models.vgg import vgg11, vgg16
from neuralign.experiments.models.vit import ViT

logger = logging.getLogger(__name__)

__all__ = ["available_models", "build_model", "builder_kwargs", "smallest_input_size"]


def _tinyten(num_classes: int, in_channels: int = 3) -> nn.Module:
    return TinyTen(num_classes=num_classes, in_channels=in_channels)


def _googlenet(num_classes: int, aux_logits: bool = True, in_channels: int = 3) -> nn.Module:
    return GoogLeNet(num_classes=num_classes, aux_logits=aux_logits, in_channels=in_channels)


def _mlp(
    num_classes: int,
    in_features: int,
    hidden: Sequence[int] = (512, 512),
    batch_norm: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    return MLP(in_features, num_classes, hidden=hidden, batch_norm=batch_norm, dropout=dropout)


def _vit(num_classes: int, in_channels: int = 3, image_size: int = 32, patch_size: int = 4, width: int = 64,
         depth: int = 4, heads: int = 4, mlp_dim: int = 128, dropout: float = 0.0) -> nn.Module:  # fmt: skip
    return ViT(num_classes, in_channels, image_size, patch_size, width, depth, heads, mlp_dim, dropout)


def _tinylm(num_classes: int, width: int = 64, depth: int = 2, heads: int = 4, kv_heads: int = 2,
            hidden: int = 128) -> nn.Module:  # fmt: skip
    return TinyLM(num_classes, width, depth, heads, kv_heads, hidden)  # the classes are the vocabulary


_MODELS: dict[str, Callable[..., nn.Module]] = {
    "tinyten": _tinyten,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "googlenet": _googlenet,
    "mlp": _mlp,
    "vit": _vit,
    "tinylm": _tinylm,
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`, in registry order.

    Examples
    --------
    >>> available_models()
    ['tinyten', 'resnet20', 'resnet32', 'vgg11', 'vgg16', 'googlenet', 'mlp', 'vit', 'tinylm']
    """
    return list(_MODELS)


_PREFIXES = ("torchvision", "timm")


def _external_factory(name: str) -> tuple[str, Callable[..., nn.Module]]:
    """``(canonical name, factory(num_classes, **kwargs))`` of a ``torchvision:<name>`` or ``timm:<name>`` model."""
    prefix, _, model = name.partition(":")
    prefix = prefix.lower()
    if prefix not in _PREFIXES or not model:
        raise ValueError(
            f"unknown model {name!r}; expected one of {available_models()}, torchvision:<name> or timm:<name>"
        )
    if prefix == "torchvision":
        import torchvision.models

        known = torchvision.models.list_models()
        if model not in known:
            close = difflib.get_close_matches(model, known, n=3)
            hint = f"; did you mean {close}?" if close else "; see torchvision.models.list_models()"
            raise ValueError(f"unknown torchvision model {model!r}{hint}")

        def build(num_classes: int, **kwargs: Any) -> nn.Module:
            return torchvision.models.get_model(model, weights=None, num_classes=num_classes, **kwargs)

        return f"torchvision:{model}", build
    try:
        import timm
    except ImportError as exc:
        raise MissingDependencyError(
            f"model {name!r} needs timm, which is not installed; install the extra: pip install 'neuralign[timm]'"
        ) from exc
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3)
        hint = f"; did you mean {close}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown timm model {model!r}{hint}")

    def build_timm(num_classes: int, **kwargs: Any) -> nn.Module:
        return timm.create_model(model, pretrained=False, num_classes=num_classes, **kwargs)

    return f"timm:{model}", build_timm


def build_model(
    name: str, num_classes: int, *, generator: torch.Generator | int | None = None, **kwargs: Any
) -> nn.Module:
    """Build a model of the zoo, of torchvision or of timm by name, optionally with a seeded, RNG-neutral
    initialisation.

    Parameters
    ----------
    name : str
        One of :func:`available_models` (case-insensitive): ``tinyten``, ``resnet20``, ``resnet32``,
        ``vgg11``, ``vgg16``, ``googlenet``, ``mlp``, ``vit`` (a small Vision Transformer), ``tinylm`` (an
        LLM-style decoder; ``num_classes`` is its vocabulary); or ``"torchvision:<name>"`` for any builder of
        ``torchvision.models`` (``torchvision.models.list_models()``, built without pretrained weights), or
        ``"timm:<name>"`` for any model of timm (``timm.list_models()``, ``pretrained=False``; needs the optional
        extra ``neuralign[timm]``).
    num_classes : int
        Outputs of the classifier.
    generator : int, torch.Generator or None
        With an int seed (or a ``torch.Generator``, from which one seed is drawn), the model is built inside
        ``torch.random.fork_rng(devices=[])`` after ``torch.manual_seed(seed)``: two builds with the same seed
        have identical weights, and the caller's global CPU RNG state is unchanged afterwards. With ``None``,
        initialisation draws from (and advances) the global RNG. Models are built on the CPU; move them with
        ``.to(device)``. (``seed=`` before 0.2, still accepted with a :class:`DeprecationWarning`.)
    **kwargs
        Keyword arguments of the model: ``in_channels`` for every convolutional model; ``width`` for
        ``resnet*`` and ``vgg*``; ``batch_norm`` for ``vgg*`` and ``mlp``; ``aux_logits`` for ``googlenet``;
        ``in_features`` (required), ``hidden`` and ``dropout`` for ``mlp``; ``image_size``, ``patch_size``,
        ``width`` (an int), ``depth``, ``heads``, ``mlp_dim``, ``dropout`` for ``vit``; ``width``, ``depth``,
        ``heads``, ``kv_heads``, ``hidden`` for ``tinylm``. For ``torchvision:`` and ``timm:``
        models, any keyword argument of the builder (e.g. ``width_per_group`` for torchvision's
        ``wide_resnet50_2``, ``in_chans`` for timm).

    Returns
    -------
    torch.nn.Module
        The model, in train mode, on the CPU, in float32.

    Raises
    ------
    ValueError
        Unknown ``name`` (for torchvision and timm, with the closest names), or a bad value of a model argument.
    TypeError
        ``name`` is not a string, an argument the model does not take, a missing required argument, an
        argument of the wrong type, or a ``seed`` that is not an int.
    MissingDependencyError
        ``timm:<name>`` without timm installed (an :class:`ImportError` naming the extra ``neuralign[timm]``).

    Examples
    --------
    >>> a = build_model("TinyTen", 10, generator=0)
    >>> b = build_model("tinyten", 10, generator=0)
    >>> all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    True
    >>> build_model("mlp", 10, in_features=64, hidden=(16,)).fc.in_features
    16
    >>> build_model("torchvision:resnet18", 7, generator=0).fc.out_features
    7
    """
    if "seed" in kwargs:
        generator = renamed_keywords({"seed": kwargs.pop("seed")}, {"seed": "generator"}, where="build_model")[
            "generator"]
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a str, got {type(name).__name__} {name!r}")
    key = name.lower()
    if ":" in name:
        key, factory = _external_factory(name)
        external = True
    elif key in _MODELS:
        factory = _MODELS[key]
        external = False
    else:
        raise ValueError(
            f"unknown model {name!r}; expected one of {available_models()}, torchvision:<name> or timm:<name>"
        )
    if not external:
        params = inspect.signature(factory).parameters
        accepted = [p for p in params if p != "num_classes"]
        for arg in kwargs:
            if arg not in accepted:
                raise TypeError(
                    f"model {key!r} got an unexpected keyword argument {arg!r}; it accepts {accepted}"
                )
        for arg, p in params.items():
            if arg != "num_classes" and p.default is inspect.Parameter.empty and arg not in kwargs:
                raise TypeError(f"model {key!r} is missing the required keyword argument {arg!r}")
    seed = None
    if isinstance(generator, torch.Generator):
        seed = as_seed(generator)
    elif generator is not None:
        seed = check_int(generator, "generator", allow_none=True)
        if not 0 <= seed < 2**64:
            raise ValueError(f"`generator` must be a seed in [0, 2**64), got {seed}")
    try:
        if seed is None:
            return factory(num_classes=num_classes, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = factory(num_classes=num_classes, **kwargs)
    except TypeError as exc:
        if not external:
            raise
        raise TypeError(f"model {key!r}: {_first_line(exc)}") from exc
    logger.debug("built %s (%d classes) with seed %d", key, num_classes, seed)
    return model


def builder_kwargs(
    arch: str,
    in_channels: int,
    image_size: tuple[int, int],
    *,
    width: float | None = None,
    hidden: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The builder arguments of a zoo architecture for images of ``in_channels`` channels and ``image_size``:
    ``in_channels`` (and ``width``) for the convolutional models, ``in_features`` (and ``hidden``, with batch norm)
    for ``mlp``; none for ``torchvision:`` and ``timm:`` models, which keep their builders' own defaults. Token
    data (a text dataset's bundle: ``in_channels`` 0) fit ``tinylm`` only (its ``width`` scaled by ``width``).

    >>> builder_kwargs("mlp", 1, (28, 28), hidden=(256,))
    {'in_features': 784, 'batch_norm': True, 'hidden': (256,)}
    """
    name = arch.lower()
    if name == "tinylm":
        if in_channels != 0:
            raise ValueError("`tinylm` is a language model: it reads token ids, not images")
        # a multiplier of the default 64, kept a multiple of 8 (4 heads of an even size)
        return {} if width is None else {"width": 8 * max(1, round(8 * width))}
    if in_channels == 0:
        raise ValueError(f"`{arch}` takes images but the data are token sequences; use `tinylm`")
    if ":" in name:
        return {}
    if name == "vit":
        if image_size[0] != image_size[1]:
            raise ValueError(f"`vit` takes square images, got {image_size[0]}x{image_size[1]}")
        kw = {"in_channels": in_channels, "image_size": image_size[0]}
        if width is not None:  # a multiplier of the default 64, kept a multiple of the 4 heads
            kw["width"] = 4 * max(1, round(16 * width))
        return kw
    if name == "mlp":
        kw: dict[str, Any] = {"in_features": in_channels * image_size[0] * image_size[1], "batch_norm": True}
        if hidden is not None:
            kw["hidden"] = tuple(hidden)
        return kw
    kw = {"in_channels": in_channels}
    if width is not None:
        kw["width"] = width
    return kw


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def smallest_input_size(model: nn.Module, in_channels: int, image_size: tuple[int, int], *,
                        max_size: int = 256) -> int | None:
    """Whether ``model`` can take images of ``image_size``: ``None`` if it can, else the smallest square side length
    (up to ``max_size``) it can take, or ``0`` if none up to ``max_size`` works.

    One forward pass of a single zero image per size tried, in eval mode, without gradients (the model is not
    changed: its mode is restored). ``in_channels`` 0 (token sequences, a text dataset) is not an image: ``None``.

    Examples
    --------
    >>> smallest_input_size(build_model("tinyten", 10, in_channels=1), 1, (8, 8))
    9
    >>> smallest_input_size(build_model("tinyten", 10, in_channels=1), 1, (28, 28)) is None
    True
    """

    def fits(h: int, w: int) -> bool:
        param = next(model.parameters(), None)
        x = torch.zeros(1, in_channels, h, w, device=param.device if param is not None else None)
        try:
            model(x)
        except RuntimeError:
            return False
        return True

    if in_channels == 0:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if fits(*image_size):
                return None
            return next((n for n in range(max(image_size) + 1, max_size + 1) if fits(n, n)), 0)
    finally:
        model.train(was_training)
