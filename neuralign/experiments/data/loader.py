"""In-memory datasets and the resumable batch loader: :class:`ArrayDataset` and :class:`ArrayLoader`.

An :class:`ArrayDataset` holds a whole split in memory as uint8 images ``(N, C, H, W)`` with int64 labels; an
:class:`ArrayLoader` gathers a batch of its images and augments the whole batch at once (e.g. with a
:class:`~neuralign.experiments.data.augment.BatchTransform`), yielding ``(images float32 (B, C, H, W), labels int64
(B,))``.

Reproducibility
    A training loader draws one *epoch seed* from its ``generator`` at the start of each epoch; the shuffled
    order comes from that seed and the augmentation of batch ``k`` from ``stable_seed("batch", epoch_seed, k)``.
    The data of an epoch is therefore a pure function of the generator state at the epoch's start, whatever
    ``num_workers``. Iteration runs on torchdata's ``StatefulDataLoader`` (batches built in the calling process or
    in worker processes); its state, returned by :meth:`ArrayLoader.state_dict`, holds that generator state and
    the number of batches already served, so that a trainer resumed from a checkpoint replays exactly the
    remaining batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from neuralign._utils import as_generator, stable_seed
from neuralign._validate import check_int
from neuralign.experiments.data.augment import to_float

__all__ = ["ArrayDataset", "ArrayLoader"]


class ArrayDataset(Dataset):
    """Images held in memory as uint8 ``(N, C, H, W)`` with int64 labels, transformed on the fly as tensors; or
    token sequences, uint8 ``(N, T)`` with int64 ``(N, T)`` next-token targets (a text dataset).

    Parameters
    ----------
    images : torch.Tensor
        uint8 ``(N, C, H, W)``, or uint8 ``(N, T)`` token sequences.
    labels : torch.Tensor
        Integer ``(N,)``, or ``(N, T)`` (one target per token) with token sequences; stored as int64.
    transform : callable, optional
        ``transform(images, generator) -> float images`` on a batch, e.g. a :class:`BatchTransform`; ``None``
        only converts to float in [0, 1]. Token sequences take :class:`~neuralign.experiments.data.text.TokenIds`
        (int64 token ids).
    generator : torch.Generator, optional
        Used by ``__getitem__`` (per-sample access from a plain ``DataLoader``); ``None`` uses torch's global RNG.
        :class:`ArrayLoader` passes its own per-batch generators instead.

    Notes
    -----
    ``ds[i]`` returns ``(image float32 (C, H, W), label int64 scalar)`` so that the dataset works with a plain
    ``torch.utils.data.DataLoader``; :meth:`get_batch` is the fast path used by :class:`ArrayLoader`.
    ``source_indices`` holds, for each image, its index in the split it was loaded from (so that subsets stay
    traceable).

    Examples
    --------
    >>> import torch
    >>> ds = ArrayDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    >>> x, y = ds.get_batch(torch.tensor([0, 3]))
    >>> x.shape, y.tolist()
    (torch.Size([2, 1, 8, 8]), [0, 1])
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[..., torch.Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
        source_indices: torch.Tensor | None = None,
    ) -> None:
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError(
                f"`images` and `labels` must be torch tensors, got {type(images).__name__} and {type(labels).__name__}"
            )
        if images.dtype != torch.uint8 or images.dim() not in (2, 4):
            raise ValueError(
                f"`images` must be uint8 (N, C, H, W), got {images.dtype} of shape {tuple(images.shape)} (or uint8 "
                "(N, T) token sequences)"
            )
        shape = "(N,)" if images.dim() == 4 else "(N, T)"
        if (labels.dim() != (1 if images.dim() == 4 else 2) or labels.is_floating_point() or labels.is_complex()
                or labels.dtype == torch.bool):  # fmt: skip
            raise ValueError(
                f"`labels` must be an integer {shape} tensor, got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        if images.dim() == 2 and labels.shape != images.shape:
            raise ValueError(
                f"`labels` must have one target per token, shape {tuple(images.shape)}, got {tuple(labels.shape)}"
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"`images` has {images.shape[0]} images but `labels` has {labels.shape[0]} labels")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.transform = transform
        self.generator = generator
        if source_indices is None:
            source_indices = torch.arange(images.shape[0])
        self.source_indices = source_indices.to(torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([int(index)]), generator=self.generator)
        return x[0], y[0]

    def get_batch(
        self, indices: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``indices`` transformed as one batch (float32 ``(B, C, H, W)``) and their int64 labels."""
        images = self.images.index_select(0, indices)
        x = self.transform(images, generator) if self.transform is not None else to_float(images)
        return x, self.labels.index_select(0, indices)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ArrayDataset:
        """A new dataset with the images ``indices`` (in that order), the same transform and generator."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ArrayDataset(
            self.images.index_select(0, idx),
            self.labels.index_select(0, idx),
            self.transform,
            generator=self.generator,
            source_indices=self.source_indices.index_select(0, idx),
        )

    def with_transform(self, transform: Callable[..., torch.Tensor] | None) -> ArrayDataset:
        """The same images and labels (shared, not copied) with another transform."""
        return ArrayDataset(
            self.images, self.labels, transform, generator=self.generator, source_indices=self.source_indices
        )


class _EpochBatches(Dataset):
    """Item ``(epoch_seed, k)`` is batch ``k`` of the epoch drawn with ``epoch_seed``: a pure function, safe in workers.

    The order is ``randperm(N)`` from ``stable_seed("order", epoch_seed)`` (the dataset order without shuffling)
    and batch ``k`` is augmented with a generator seeded with ``stable_seed("batch", epoch_seed, k)``. The order of
    the last epoch seen is cached, so that each process computes it once per epoch.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, shuffle: bool) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self._order: tuple[int | None, torch.Tensor] | None = None

    def _order_for(self, epoch_seed: int | None) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch_seed:
            n = len(self.dataset)
            if self.shuffle:
                gen = torch.Generator().manual_seed(stable_seed("order", epoch_seed))
                self._order = (epoch_seed, torch.randperm(n, generator=gen))
            else:
                self._order = (epoch_seed, torch.arange(n))
        return self._order[1]

    def __getitem__(self, key: tuple[int | None, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch_seed, k = key
        idx = self._order_for(epoch_seed)[k * self.batch_size : (k + 1) * self.batch_size]
        gen = None
        if epoch_seed is not None:
            gen = torch.Generator().manual_seed(stable_seed("batch", epoch_seed, k))
        return self.dataset.get_batch(idx, generator=gen)


class _EpochSampler:
    """Yields ``(epoch_seed, k)`` for the batches of one epoch; the stateful part of :class:`ArrayLoader`.

    ``StatefulDataLoader`` saves and restores iteration (main process and workers) but knows nothing of our epoch
    seed, which is drawn from the loader's :attr:`ArrayLoader.generator` at the start of each epoch. This sampler
    draws it and its :meth:`state_dict` records the generator state at the epoch's start and the batches handed
    out, so that a restored epoch draws the same seed and continues after its last served batch.
    """

    def __init__(self, n_batches: int, random: bool, generator: torch.Generator) -> None:
        self.n_batches, self.random, self.generator = n_batches, random, generator
        self._epoch_start_state: torch.Tensor | None = None
        self._batches_done = 0
        self._resume_from = 0

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[int | None, int]]:
        start, self._resume_from = self._resume_from, 0
        # until the epoch's first batch is asked for, the state is "the current generator, `start` batches done"
        self._epoch_start_state, self._batches_done = None, start
        return self._epoch(start)

    def _epoch(self, start: int) -> Iterator[tuple[int | None, int]]:
        epoch_seed: int | None = None
        if self.random:
            self._epoch_start_state = self.generator.get_state()
            epoch_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
        for k in range(start, self.n_batches):
            self._batches_done = k + 1
            yield epoch_seed, k
        self._epoch_start_state = None
        self._batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        state = self.generator.get_state() if self._epoch_start_state is None else self._epoch_start_state.clone()
        return {"generator_state": state, "batches_done": self._batches_done}

    def check_state(self, state: object) -> int:
        if not isinstance(state, Mapping) or "generator_state" not in state or "batches_done" not in state:
            raise ValueError("`state` must be a dict from ArrayLoader.state_dict()")
        done = int(state["batches_done"])
        if not 0 <= done <= self.n_batches:
            raise ValueError(f"`state` says {done} batches were served but an epoch has {self.n_batches}")
        return done

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._resume_from = self.check_state(state)
        self.generator.set_state(state["generator_state"])
        self._epoch_start_state = None
        self._batches_done = 0


def _as_is(batch: Any) -> Any:
    return batch


class ArrayLoader:
    """Iterate an :class:`ArrayDataset` in batches, augmenting each batch at once; resumable mid-epoch.

    Parameters
    ----------
    dataset : ArrayDataset
        The images; its ``transform`` is applied to each batch.
    batch_size : int
        Images per batch.
    shuffle : bool
        Draw a new random order each epoch (otherwise the dataset order).
    drop_last : bool
        Drop the last incomplete batch.
    generator : torch.Generator or int or None
        Source of the epoch seeds (shuffling and augmentation); an int seeds a new generator, ``None`` seeds one
        from torch's global RNG. Exposed as :attr:`generator`.
    num_workers : int
        ``0`` builds batches in the calling process; more builds whole batches in that many worker processes
        (the data are the same: each batch depends only on the epoch seed and its index).
    pin_memory : bool
        Pin batches in page-locked memory (only when CUDA is available).

    Notes
    -----
    Iteration and its saved state are those of torchdata's ``StatefulDataLoader`` over whole batches. Each epoch
    that shuffles or augments draws one epoch seed from :attr:`generator`; the order is ``randperm(N)`` from a
    generator seeded with it and batch ``k`` is augmented with a generator seeded with
    ``stable_seed("batch", epoch_seed, k)``. A loader that neither shuffles nor augments never touches the
    generator, and no loader touches torch's global RNG. Iteration yields
    ``(images float32 (B, C, H, W), labels int64 (B,))``.

    To resume, save :meth:`state_dict` with the model and call :meth:`load_state_dict` after rebuilding the loader
    with the same data and ``num_workers``: the next ``iter(loader)`` continues the interrupted epoch after its
    last served batch, then the following epochs are those of the uninterrupted run.

    Examples
    --------
    >>> import torch
    >>> ds = ArrayDataset(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.arange(10))
    >>> loader = ArrayLoader(ds, batch_size=4, shuffle=True, generator=0)
    >>> len(loader), sorted(torch.cat([y for _, y in loader]).tolist()) == list(range(10))
    (3, True)
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        *,
        batch_size: int = 128,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if not isinstance(dataset, ArrayDataset):
            raise TypeError(f"`dataset` must be an ArrayDataset, got {type(dataset).__name__}")
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        num_workers = check_int(num_workers, "num_workers", minimum=0)
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.generator = as_generator(generator)
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self._sampler = _EpochSampler(len(self), self.random, self.generator)
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch function in its constructor
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            self._loader = StatefulDataLoader(
                _EpochBatches(dataset, batch_size, self.shuffle),
                batch_size=None,
                sampler=self._sampler,
                num_workers=num_workers,
                collate_fn=_as_is,
                pin_memory=self.pin_memory and torch.cuda.is_available(),
                # the loader's own seed only seeds worker RNGs, which the batches never use; a private generator
                # keeps it off torch's global RNG
                generator=torch.Generator(),
            )

    @property
    def random(self) -> bool:
        """Whether the loader shuffles or augments (and so consumes its generator)."""
        transform = self.dataset.transform
        return self.shuffle or bool(getattr(transform, "random", transform is not None))

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self._loader)

    def state_dict(self) -> dict[str, Any]:
        """The ``StatefulDataLoader`` state: where the epoch stands, with the generator state at its start.

        Between epochs, the current generator state and no batch served. The dict holds tensors, ints, bools,
        ``None``, strings, lists and dicts, so it can be saved with ``torch.save`` and read back with
        ``weights_only=True``.
        """
        return self._loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: the next iteration replays that epoch from its first unserved batch."""
        main = state.get("_snapshot", {}).get("_main_snapshot", state) if isinstance(state, Mapping) else None
        if not isinstance(main, Mapping) or "_index_sampler_state" not in main:
            raise ValueError("`state` must be a dict from ArrayLoader.state_dict()")
        self._sampler.check_state(main["_index_sampler_state"])
        workers = main.get("_num_workers", 0)
        if workers != self.num_workers:
            raise ValueError(f"`state` was saved with num_workers={workers} but this loader has {self.num_workers}")
        self._loader.load_state_dict(dict(state))
