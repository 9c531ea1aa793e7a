"""Deprecated alias of :mod:`neuralign.cli` (moved in neuralign 0.2; removed in 0.3)."""

from neuralign.experiments._moved import alias_module

alias_module(__name__, "neuralign.cli")
