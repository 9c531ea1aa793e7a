"""The zoo's transformers (``vit``, ``tinylm``): built by name with seeds, output shapes, exact torch.fx traces,
argument errors, and the builder arguments the command line derives from image data."""

from __future__ import annotations

import pytest
import torch
from torch.fx import symbolic_trace

from neuralign.experiments.models import TinyLM, ViT, build_model, builder_kwargs

KWARGS = {"vit": {"width": 32, "depth": 2, "heads": 4, "mlp_dim": 48}, "tinylm": {"width": 32, "depth": 2}}


def _input(name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=gen) if name == "vit" else torch.randint(0, 7, (2, 9), generator=gen)


@pytest.mark.parametrize("name,cls,shape", [("vit", ViT, (2, 7)), ("tinylm", TinyLM, (2, 9, 7))])
def test_built_by_name_seeded_and_traced_exactly(name, cls, shape):
    a = build_model(name, 7, generator=0, **KWARGS[name])
    b = build_model(name, 7, generator=0, **KWARGS[name])
    assert isinstance(a, cls)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    x = _input(name)
    for mode in (True, False):
        a.train(mode)
        with torch.no_grad():
            out = a(x)
            assert out.shape == shape and torch.isfinite(out).all()
            torch.testing.assert_close(symbolic_trace(a)(x), out, rtol=0, atol=0)


def test_tied_embeddings_of_the_language_model():
    model = build_model("tinylm", 11, generator=0)
    assert model.head.weight is model.embed.weight


@pytest.mark.parametrize(
    "build,match",
    [(lambda: ViT(10, image_size=30, patch_size=4), r"`image_size` \(30\) must be a multiple of `patch_size` \(4\)"),
     (lambda: ViT(10, width=30, heads=4), r"`width` \(30\) must be a multiple of `heads` \(4\)"),
     (lambda: TinyLM(10, heads=4, kv_heads=3), r"`heads` a multiple of `kv_heads` \(3\)"),
     (lambda: TinyLM(10, width=36, heads=4), r"with an even head size")],
)  # fmt: skip
def test_bad_sizes_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_builder_arguments_from_image_data():
    assert builder_kwargs("vit", 1, (28, 28)) == {"in_channels": 1, "image_size": 28}
    assert builder_kwargs("vit", 3, (32, 32), width=0.5) == {"in_channels": 3, "image_size": 32, "width": 32}
    with pytest.raises(ValueError, match="`vit` takes square images, got 28x32"):
        builder_kwargs("vit", 1, (28, 32))
    with pytest.raises(ValueError, match="`tinylm` is a language model"):
        builder_kwargs("tinylm", 3, (32, 32))
