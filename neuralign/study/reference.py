"""The paper's reference numbers: Tatro et al. (2020, arXiv:2009.02439), Table 1, and the scale it was run at.

:data:`PAPER_TABLE1` holds the table as data, :func:`paper_row` looks a row up by architecture and data set (the
data set's usual spellings understood, through :func:`neuralign.experiments.data.canonical_dataset`), and
:data:`PAPER_MODEL_SIZES` and :data:`PAPER_SCALE` describe the paper's models and protocol for the report's note on
the difference in scale (:func:`neuralign.study.report.write_report`).
"""

from __future__ import annotations

from neuralign.experiments.data import canonical_dataset

__all__ = ["PAPER_MODEL_SIZES", "PAPER_SCALE", "PAPER_TABLE1", "paper_row"]

#: Tatro et al. (2020), Table 1 (test accuracy in %, mean ± std over 3 pairs, quadratic Bezier curves, 65 points):
#: ``PAPER_TABLE1[arch][dataset]`` maps a row label of :data:`neuralign.study.report.SETTING_LABELS` to the end-point
#: accuracy (a string) or to ``(avg, min)`` strings; GoogLeNet has no PAM rows. Usable as ``paper_row`` of
#: :func:`neuralign.study.report.write_report`.
PAPER_TABLE1: dict[str, dict[str, dict[str, str | tuple[str, str]]]] = {
    "tinyten": {
        "cifar10": {
            "Endpoints": "89.0 ± 0.1",
            "Unaligned": ("87.4 ± 0.1", "82.8 ± 0.5"),
            "PAM Unaligned": ("87.6 ± 0.1", "84.0 ± 0.3"),
            "PAM Aligned": ("88.4 ± 0.1", "87.6 ± 0.2"),
            "Aligned": ("88.5 ± 0.1", "87.8 ± 0.1"),
        },
        "cifar100": {
            "Endpoints": "58.1 ± 0.5",
            "Unaligned": ("56.0 ± 0.2", "53.2 ± 1.1"),
            "PAM Unaligned": ("57.3 ± 0.2", "55.9 ± 0.9"),
            "PAM Aligned": ("58.8 ± 0.1", "57.7 ± 0.3"),
            "Aligned": ("58.7 ± 0.2", "57.7 ± 0.4"),
        },
        "tinyimagenet": {
            "Endpoints": "34.2 ± 0.2",
            "Unaligned": ("32.5 ± 0.1", "30.0 ± 0.3"),
            "PAM Unaligned": ("33.6 ± 0.1", "32.5 ± 0.1"),
            "PAM Aligned": ("34.2 ± 0.1", "33.4 ± 0.2"),
            "Aligned": ("34.4 ± 0.1", "33.7 ± 0.1"),
        },
    },
    "resnet32": {
        "cifar10": {
            "Endpoints": "92.9 ± 0.1",
            "Unaligned": ("92.2 ± 0.1", "89.1 ± 0.2"),
            "PAM Unaligned": ("92.4 ± 0.1", "89.9 ± 0.2"),
            "PAM Aligned": ("92.7 ± 0.0", "92.1 ± 0.1"),
            "Aligned": ("92.7 ± 0.1", "92.2 ± 0.0"),
        },
        "cifar100": {
            "Endpoints": "67.1 ± 0.5",
            "Unaligned": ("66.5 ± 0.2", "64.7 ± 0.4"),
            "PAM Unaligned": ("67.0 ± 0.1", "66.1 ± 0.1"),
            "PAM Aligned": ("67.6 ± 0.4", "66.8 ± 0.1"),
            "Aligned": ("67.7 ± 0.1", "66.6 ± 0.1"),
        },
        "tinyimagenet": {
            "Endpoints": "50.2 ± 0.0",
            "Unaligned": ("48.2 ± 0.1", "45.2 ± 0.1"),
            "PAM Unaligned": ("48.5 ± 0.1", "46.6 ± 0.1"),
            "PAM Aligned": ("49.2 ± 0.4", "47.9 ± 0.6"),
            "Aligned": ("49.5 ± 0.3", "48.8 ± 0.4"),
        },
    },
    "googlenet": {
        "cifar10": {
            "Endpoints": "93.4 ± 0.0",
            "Unaligned": ("93.3 ± 0.0", "92.1 ± 0.1"),
            "Aligned": ("93.4 ± 0.0", "93.1 ± 0.0"),
        },
        "cifar100": {
            "Endpoints": "73.2 ± 0.4",
            "Unaligned": ("73.1 ± 0.4", "69.8 ± 0.3"),
            "Aligned": ("73.4 ± 0.3", "72.9 ± 0.3"),
        },
        "tinyimagenet": {
            "Endpoints": "51.6 ± 0.2",
            "Unaligned": ("51.9 ± 0.1", "48.7 ± 0.4"),
            "Aligned": ("52.4 ± 0.2", "51.4 ± 0.3"),
        },
    },
}

#: Parameter counts of the paper's architectures (Tatro et al. 2020, Table 1), by the keys of :data:`PAPER_TABLE1`.
PAPER_MODEL_SIZES: dict[str, str] = {"tinyten": "0.09M", "resnet32": "0.47M", "googlenet": "10.24M"}

#: The paper's protocol, for the report's note on the difference in scale (one sentence, no final full stop).
PAPER_SCALE = (
    "The paper trains each end point and each curve for 250 epochs on the full training set (PAM: per outer "
    "iteration 20 permutation epochs and 250 curve epochs), re-estimates batch norm on the full training set at "
    "each of 65 points and reports mean ± std over 3 pairs"
)


def paper_row(arch: str, dataset: str) -> dict[str, str | tuple[str, str]] | None:
    """The rows of :data:`PAPER_TABLE1` for an architecture and a data set, or None if the paper has none.

    Names are matched case-insensitively; a data set may be given in any spelling that
    :func:`neuralign.experiments.data.canonical_dataset` understands (``"CIFAR-10"``, ``"tiny_imagenet"``,
    ``"tin"``).

    Examples
    --------
    >>> paper_row("TinyTen", "CIFAR-10")["Aligned"]
    ('88.5 ± 0.1', '87.8 ± 0.1')
    >>> paper_row("resnet20", "cifar10") is None
    True
    """
    arch_key = str(arch).strip().lower()
    data_key = canonical_dataset(str(dataset)) or str(dataset).strip().lower()
    row = PAPER_TABLE1.get(arch_key, {}).get(data_key)
    return None if row is None else dict(row)
