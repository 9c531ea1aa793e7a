r"""A byte-level language-modelling corpus that needs no download: the Python documentation topics shipped with the
interpreter (``pydoc_data.topics``), cut into next-token windows for :class:`~neuralign.experiments.models.TinyLM`.

``pydoc_data/topics.py`` is part of the Python standard library: a dict of about 80 topics of the Python language
reference (``"specialnames"``, ``"compound"``, ``"formatstrings"``, ...) as plain English text, about 465 KB in
Python 3.11, generated from the Python documentation for ``help()``. Its licence is the Python Software Foundation
License Version 2 (SPDX ``PSF-2.0``), which covers the Python software and its documentation; code examples in the
documentation are dual licensed under PSF-2.0 and the Zero-Clause BSD licence (``0BSD``) since Python 3.8.6
(https://docs.python.org/3/license.html). neuralign ships none of this text: it reads it from the running
interpreter, so the corpus is that Python version's (recorded, with its SHA-256, in the provenance).

The topics repeat one another (``"compound"`` holds the text of ``"for"``, ``"while"``, ``"try"``, ...): a split by
topic puts the same sentences in both splits (571 of the 916 test windows of 65 bytes occurred verbatim in the
training text, measured). The split is therefore by paragraph, with duplicates removed: the topics' texts, in name
order, are cut at blank lines into paragraphs, a paragraph seen before is dropped (about 20% of the bytes), and a
paragraph goes to the test split when the SHA-256 of its UTF-8 bytes, read as an integer, is divisible by
:data:`TEST_SHARDS`, else to the training split. Each split is its paragraphs in order, joined by blank lines, and
:func:`byte_windows` cuts it into windows of ``context_length + 1`` bytes whose inputs are the first
``context_length`` bytes and targets the last (next-token prediction, Bengio et al. 2003). In Python 3.11.7, 8 of
the 595 test windows of 65 bytes still occur verbatim in the training text (near-duplicate paragraphs).

References
----------
.. [1] Y. Bengio, R. Ducharme, P. Vincent, C. Jauvin, "A Neural Probabilistic Language Model", JMLR 3, 2003.
.. [2] Python Software Foundation, "History and License" (PSF License Version 2; Zero-Clause BSD for the code
   examples in the documentation), https://docs.python.org/3/license.html.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from neuralign._validate import check_int
from neuralign.errors import DataError

__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "TEST_SHARDS",
    "TEXT_DATASETS",
    "TextCorpus",
    "TokenIds",
    "byte_windows",
    "parse_text_dataset",
    "pydoc_corpus",
]

#: Context length (tokens per window) of ``"pydoc"``; ``"pydoc:T"`` asks for ``T``.
DEFAULT_CONTEXT_LENGTH = 64
#: One paragraph in this many (by its SHA-256) goes to the test split.
TEST_SHARDS = 10
#: Names of the text datasets (each also ``"<name>:<context length>"``).
TEXT_DATASETS = ("pydoc",)

_LICENSE = (
    "PSF-2.0 (Python Software Foundation License Version 2; code examples in the documentation also 0BSD, "
    "https://docs.python.org/3/license.html)"
)


@dataclass(frozen=True)
class TextCorpus:
    """A text corpus split into training and test bytes by paragraph.

    Attributes
    ----------
    name : str
        The dataset's name (``"pydoc"``).
    train, test : bytes
        The splits' UTF-8 bytes: their paragraphs joined by blank lines.
    train_paragraphs, test_paragraphs : tuple of str
        The distinct paragraphs of each split (no paragraph in both), in the order they appear.
    provenance : dict
        Source module, Python version, licence, the corpus's SHA-256 and the split rule.
    """

    name: str
    train: bytes
    test: bytes
    train_paragraphs: tuple[str, ...]
    test_paragraphs: tuple[str, ...]
    provenance: dict[str, Any] = field(default_factory=dict)


class TokenIds:
    """Batch transform of token sequences: uint8 ``(B, T)`` byte values -> int64 ``(B, T)`` token ids.

    Deterministic (``random`` is False, so loaders that do not shuffle never draw from their generator); the
    ``generator`` argument is accepted for the :class:`~neuralign.experiments.data.ArrayDataset` interface.
    """

    random = False

    def __call__(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return tokens.to(torch.int64)

    def __repr__(self) -> str:
        return "TokenIds()"


def parse_text_dataset(name: str) -> tuple[str, int] | None:
    """``(dataset, context_length)`` of a text dataset name such as ``"pydoc"`` or ``"pydoc:128"``; ``None`` if
    ``name`` names no text dataset (case and surrounding white space ignored).

    Raises
    ------
    ValueError
        If the context length after ``:`` is not an integer >= 1.

    Examples
    --------
    >>> parse_text_dataset("pydoc"), parse_text_dataset("PyDoc:128"), parse_text_dataset("cifar10")
    (('pydoc', 64), ('pydoc', 128), None)
    """
    key, sep, rest = name.strip().lower().partition(":")
    if key not in TEXT_DATASETS:
        return None
    if not sep:
        return key, DEFAULT_CONTEXT_LENGTH
    if not re.fullmatch(r"\d+", rest) or int(rest) < 1:
        raise ValueError(f"dataset {name!r}: the context length after ':' must be an integer >= 1, got {rest!r}")
    return key, int(rest)


def pydoc_corpus() -> TextCorpus:
    """The Python documentation topics of the running interpreter (``pydoc_data.topics``), de-duplicated and split
    by paragraph (see the module's notes).

    Returns
    -------
    TextCorpus
        In Python 3.11.7: 79 topics, 464,970 characters; 2,078 distinct paragraphs (1,856 training, 222 test);
        335,953 training and 38,121 test bytes.

    Raises
    ------
    DataError
        If this Python has no ``pydoc_data`` (some distributions package it apart from the interpreter).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise DataError(
            f"the text dataset 'pydoc' reads pydoc_data.topics from the Python standard library, which this Python "
            f"({sys.version.split()[0]}) lacks: {exc}"
        ) from exc
    digest = hashlib.sha256()
    seen: set[str] = set()
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for name in sorted(topics):
        digest.update(name.encode("utf-8") + b"\0" + topics[name].encode("utf-8") + b"\0")
        for paragraph in topics[name].split("\n\n"):
            paragraph = paragraph.strip("\n")
            if not paragraph.strip() or paragraph in seen:
                continue
            seen.add(paragraph)
            shard = int(hashlib.sha256(paragraph.encode("utf-8")).hexdigest(), 16) % TEST_SHARDS
            splits["test" if shard == 0 else "train"].append(paragraph)
    provenance = {
        "source": "python",
        "module": "pydoc_data.topics",
        "python": sys.version.split()[0],
        "license": _LICENSE,
        "sha256": digest.hexdigest()[:16],
        "split": f"distinct paragraphs; test when SHA-256(paragraph) % {TEST_SHARDS} == 0",
        "topics": len(topics),
        "paragraphs": {k: len(v) for k, v in splits.items()},
    }
    train, test = ("\n\n".join(splits[k]).encode("utf-8") for k in ("train", "test"))
    return TextCorpus("pydoc", train, test, tuple(splits["train"]), tuple(splits["test"]), provenance)


def byte_windows(data: bytes, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut bytes into next-token windows: inputs ``data[k T : k T + T]``, targets ``data[k T + 1 : k T + T + 1]``.

    Consecutive windows share one byte (the last target of one is the first input of the next), so every byte
    after the first is a target exactly once; the ``< T`` bytes left at the end are dropped.

    Parameters
    ----------
    data : bytes
        The text's bytes.
    context_length : int
        ``T``, tokens per window (>= 1).

    Returns
    -------
    inputs : torch.Tensor
        uint8 ``(N, T)`` with ``N = (len(data) - 1) // T``.
    targets : torch.Tensor
        int64 ``(N, T)``.

    Raises
    ------
    TypeError
        If ``data`` is not bytes.
    ValueError
        If ``context_length`` < 1 or ``data`` holds fewer than ``context_length + 1`` bytes.

    Examples
    --------
    >>> x, y = byte_windows(b"abcdefg", 3)
    >>> x.tolist(), y.tolist()
    ([[97, 98, 99], [100, 101, 102]], [[98, 99, 100], [101, 102, 103]])
    """
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"`data` must be bytes, got {type(data).__name__}")
    t = check_int(context_length, "context_length", minimum=1)
    n = (len(data) - 1) // t
    if n < 1:
        raise ValueError(f"`data` holds {len(data)} bytes, fewer than `context_length` + 1 = {t + 1}")
    flat = torch.frombuffer(bytearray(data[: n * t + 1]), dtype=torch.uint8)
    inputs = flat[:-1].reshape(n, t).clone()
    targets = flat[1:].reshape(n, t).to(torch.int64)
    return inputs, targets
