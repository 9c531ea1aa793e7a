"""Tests of ``neuralign.experiments.data.loader``: reproducible epochs, mid-epoch resume, workers, plain access."""

from __future__ import annotations

import pytest
import torch

from neuralign.experiments.data import ArrayDataset, ArrayLoader, load_data, make_transform
from tests.experiments.data import batches


def test_augmentation_is_reproducible_from_the_generator():
    first = batches(load_data("digits", resize=16, generator=5).train)
    second = batches(load_data("digits", resize=16, generator=5).train)
    third = batches(load_data("digits", resize=16, generator=6).train)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], third[1])  # another order
    loader = load_data("digits", resize=16, generator=5).train
    epoch1, epoch2 = batches(loader), batches(loader)
    assert torch.equal(epoch1[0], first[0]) and not torch.equal(epoch1[0], epoch2[0])
    # same order, different augmentation: the draw depends on the generator beyond the shuffling
    unshuffled = ArrayDataset(
        torch.full((16, 1, 12, 12), 200, dtype=torch.uint8),
        torch.zeros(16, dtype=torch.long),
        make_transform("crop", image_size=(12, 12), channels=1),
    )
    a = batches(ArrayLoader(unshuffled, batch_size=8, generator=1))[0]
    b = batches(ArrayLoader(unshuffled, batch_size=8, generator=1))[0]
    c = batches(ArrayLoader(unshuffled, batch_size=8, generator=2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_mid_epoch_exactly(tmp_path, num_workers):
    def fresh(batch_size: int = 100) -> ArrayLoader:
        return load_data("digits", resize=16, batch_size=batch_size, generator=11, num_workers=num_workers).train

    reference = fresh()
    batches(reference)  # epoch 0
    expected = list(reference)  # epoch 1
    expected_next = list(reference)  # epoch 2
    expected_after = list(reference)  # epoch 3

    run = fresh()
    batches(run)
    it = iter(run)
    for _ in range(3):
        next(it)
    state = run.state_dict()
    torch.save(state, tmp_path / "state.pt")  # as a trainer's checkpoint would
    saved = torch.load(tmp_path / "state.pt", weights_only=True)

    resumed = fresh()
    resumed.load_state_dict(saved)
    rest = list(resumed)
    assert len(rest) == len(expected) - 3
    for (x, y), (xe, ye) in zip(rest, expected[3:]):
        assert torch.equal(x, xe) and torch.equal(y, ye)
    for (x, y), (xe, ye) in zip(list(resumed), expected_next):
        assert torch.equal(x, xe) and torch.equal(y, ye)
    # between epochs, the state resumes at the next epoch
    torch.save(resumed.state_dict(), tmp_path / "between.pt")
    between = fresh()
    between.load_state_dict(torch.load(tmp_path / "between.pt", weights_only=True))
    after = list(between)
    assert len(after) == len(expected_after)
    for (x, y), (xe, ye) in zip(after, expected_after):
        assert torch.equal(x, xe) and torch.equal(y, ye)
    with pytest.raises(ValueError, match=r"`state` must be a dict from ArrayLoader.state_dict\(\)"):
        resumed.load_state_dict({"generator_state": torch.zeros(1), "batches_done": 99})
    small = fresh(batch_size=10)
    it = iter(small)
    for _ in range(20):
        next(it)
    with pytest.raises(ValueError, match=r"`state` says 20 batches were served but an epoch has 15"):
        resumed.load_state_dict(small.state_dict())
    del it


def test_workers_give_the_same_batches():
    single = batches(load_data("digits", resize=16, generator=3, num_workers=0).train)
    workers = batches(load_data("digits", resize=16, generator=3, num_workers=2).train)
    assert torch.equal(single[0], workers[0]) and torch.equal(single[1], workers[1])


def test_eval_loaders_do_not_consume_the_generator():
    bundle = load_data("digits", generator=0)
    state = bundle.test.generator.get_state()
    batches(bundle.test)
    assert torch.equal(state, bundle.test.generator.get_state())
    assert not bundle.test.random and bundle.train.random


def test_array_dataset_works_with_a_plain_dataloader():
    ds = ArrayDataset(
        torch.arange(48, dtype=torch.uint8).view(3, 1, 4, 4),
        torch.tensor([2, 0, 1]),
        make_transform("none", image_size=(4, 4), channels=1, mean=(0.5,), std=(0.5,)),
    )
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    torch.testing.assert_close(x, (torch.arange(48).view(3, 1, 4, 4).float() / 255 - 0.5) / 0.5)
    assert y.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"`images` must be uint8 \(N, C, H, W\), got torch.float32"):
        ArrayDataset(torch.zeros(3, 1, 4, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`images` has 3 images but `labels` has 2 labels"):
        ArrayDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
