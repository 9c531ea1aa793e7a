"""The byte-level text dataset ``pydoc`` (issue 21): a deterministic split with no paragraph in both splits, next-token
windows of the asked context length, loaders of int64 ``(B, T)`` tokens and targets, the loss and accuracy of
``(B, T, V)`` logits, and a language model whose loss a few training steps lower."""

from __future__ import annotations

import math

import pytest
import torch

from neuralign._utils import classification_loss
from neuralign.curves import evaluate_model
from neuralign.experiments.data import ArrayDataset, byte_windows, load_data, pydoc_corpus
from neuralign.experiments.data.text import parse_text_dataset
from neuralign.experiments.models import build_model, builder_kwargs, smallest_input_size
from neuralign.experiments.training import train_model


def test_split_is_deterministic_and_no_paragraph_is_in_both():
    first, second = pydoc_corpus(), pydoc_corpus()
    assert first.train == second.train and first.test == second.test
    assert not set(first.train_paragraphs) & set(first.test_paragraphs)
    assert len(set(first.train_paragraphs)) == len(first.train_paragraphs)
    assert first.train == "\n\n".join(first.train_paragraphs).encode("utf-8")
    # about one paragraph in TEST_SHARDS = 10 is a test paragraph
    share = len(first.test_paragraphs) / (len(first.train_paragraphs) + len(first.test_paragraphs))
    assert 0.05 < share < 0.15
    assert "PSF-2.0" in first.provenance["license"] and first.provenance["module"] == "pydoc_data.topics"


def test_few_test_windows_occur_in_the_training_text():
    corpus = pydoc_corpus()
    x, y = byte_windows(corpus.test, 64)
    windows = [bytes(x[i].tolist()) + bytes([int(y[i, -1])]) for i in range(x.shape[0])]
    leaked = sum(w in corpus.train for w in windows)
    assert leaked <= 0.02 * len(windows)  # 8 of 595 in Python 3.11.7 (near-duplicate paragraphs); by topic: 571/916


def test_windows_are_inputs_and_their_next_bytes():
    data = bytes(range(200)) * 3
    x, y = byte_windows(data, 16)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape == y.shape == ((len(data) - 1) // 16, 16)
    flat = torch.tensor(list(data))
    torch.testing.assert_close(x.flatten().long(), flat[: x.numel()], rtol=0, atol=0)
    torch.testing.assert_close(y.flatten(), flat[1 : x.numel() + 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`data` holds 4 bytes, fewer than `context_length` \+ 1 = 5"):
        byte_windows(b"abcd", 4)
    with pytest.raises(TypeError, match="`data` must be bytes, got str"):
        byte_windows("abcd", 2)


def test_loaders_yield_token_ids_and_next_token_targets():
    bundle = load_data("pydoc:32", batch_size=8, generator=0)
    assert bundle.context_length == 32 and bundle.num_classes == 256 and bundle.in_channels == 0
    assert bundle.describe()["context_length"] == 32
    x, y = next(iter(bundle.test))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (256, 32)
    torch.testing.assert_close(y[:, :-1], x[:, 1:], rtol=0, atol=0)
    again = load_data("pydoc:32", batch_size=8, generator=0)
    torch.testing.assert_close(next(iter(again.train))[0], next(iter(bundle.train))[0], rtol=0, atol=0)
    small = load_data("pydoc", train_size=100, test_size=10, align_size=20)
    assert (len(small.train.dataset), len(small.test.dataset), len(small.align.dataset)) == (100, 10, 20)
    assert small.context_length == 64


@pytest.mark.parametrize("kwargs,message", [
    ({"resize": 16}, "`resize` applies to images; the text dataset 'pydoc' takes none"),
    ({"mean": (0.5,), "std": (0.2,)}, "`mean` applies to images"),
    ({"stratified": True}, "`stratified` draws class-balanced images"),
])  # fmt: skip
def test_image_options_are_refused_for_text(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_data("pydoc", **kwargs)


def test_context_length_in_the_name():
    assert parse_text_dataset(" PyDoc:8 ") == ("pydoc", 8) and parse_text_dataset("digits") is None
    for bad in ("pydoc:0", "pydoc:x", "pydoc:"):
        with pytest.raises(ValueError, match="the context length after ':' must be an integer >= 1"):
            load_data(bad)


def test_token_dataset_needs_one_target_per_token():
    tokens = torch.zeros(4, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"`labels` must have one target per token, shape \(4, 5\), got \(4, 6\)"):
        ArrayDataset(tokens, torch.zeros(4, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"`labels` must be an integer \(N, T\) tensor"):
        ArrayDataset(tokens, torch.zeros(4, dtype=torch.int64))


def test_sequence_loss_and_accuracy_count_every_token():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen)
    target = torch.randint(0, 7, (3, 5), generator=gen)
    by_token = torch.stack([torch.nn.functional.cross_entropy(logits[b, t][None], target[b, t][None])
                            for b in range(3) for t in range(5)])  # fmt: skip
    torch.testing.assert_close(classification_loss(logits, target), by_token.mean(), rtol=1e-6, atol=0)

    class Fixed(torch.nn.Module):  # the logits above, whatever the tokens
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return logits[: tokens.shape[0]] * self.scale

    loss, acc = evaluate_model(Fixed(), [(torch.zeros(2, 5, dtype=torch.long), target[:2]),
                                         (torch.zeros(3, 5, dtype=torch.long), target)])  # fmt: skip
    losses = torch.cat([by_token[:10], by_token])
    hits = torch.cat([(logits[:2].argmax(-1) == target[:2]).flatten(), (logits.argmax(-1) == target).flatten()])
    assert math.isclose(loss, float(losses.double().mean()), rel_tol=1e-6)
    assert acc == float(hits.double().mean())  # 25 tokens, not 5 sequences


def test_a_few_training_steps_lower_the_loss():
    bundle = load_data("pydoc:32", batch_size=16, train_size=256, test_size=64, generator=0)
    model = build_model("tinylm", 256, generator=0, width=32, depth=1, hidden=64)
    before, _ = evaluate_model(model.eval(), bundle.test)
    assert abs(before - math.log(256)) < 0.1  # small initial logits: about uniform over the 256 bytes
    res = train_model(model, bundle.train, epochs=2, lr=1e-2, weight_decay=0.0, optimizer="adamw")
    model.load_state_dict(res.state_dict)
    after, acc = evaluate_model(model.eval(), bundle.test)
    assert after < before - 1.0 and acc > 0.1  # 32 AdamW steps: 5.55 -> about 3.3 nats (measured)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_optimizer_must_be_known():
    with pytest.raises(ValueError, match="optimizer"):
        train_model(torch.nn.Linear(2, 2), [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))], epochs=1,
                    optimizer="adam")  # fmt: skip


def test_token_data_fit_tinylm_only():
    assert builder_kwargs("tinylm", 0, (1, 64)) == {}
    assert builder_kwargs("tinylm", 0, (1, 64), width=0.5) == {"width": 32}
    with pytest.raises(ValueError, match="`resnet20` takes images but the data are token sequences; use `tinylm`"):
        builder_kwargs("resnet20", 0, (1, 64))
    assert smallest_input_size(build_model("tinylm", 256, generator=0), 0, (1, 64)) is None


def test_train_command_trains_tinylm_on_pydoc(tmp_path):
    from neuralign.cli import main
    from neuralign.experiments.checkpoints import load_endpoint

    command = ["train", "--arch", "tinylm", "--data", "pydoc:16", "--train-size", "64", "--test-size", "16",
               "--batch-size", "16", "--epochs", "1", "--lr", "0.05", "--out", str(tmp_path), "--quiet"]  # fmt: skip
    assert main(command) == 0
    model, meta = load_endpoint(str(tmp_path / "tinylm_seed0.pt"))
    assert meta["arch"] == "tinylm" and meta["num_classes"] == 256
    assert model(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, 256)
