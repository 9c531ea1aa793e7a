"""Option objects: small frozen dataclasses that define, validate and document a group of options once.

A function with more than a handful of options takes one of these (as ``torch.optim`` takes parameter groups, or
``scipy.optimize`` an ``options=`` dict, made typed), and the study's configuration holds the same objects, so an
option is never re-typed in another layer. This module gives them one behaviour:

- ``to_dict()`` / ``from_dict()``: JSON-able nested dicts (tuples become lists; a field that holds one of several
  option classes, such as PAM's P-step, is written with its ``method`` name);
- ``replace(**changes)``: a validated copy; an unknown name raises ``ValueError`` listing the known ones;
- :func:`set_path`: a copy with one nested field changed by a dotted path (``"pam.step.lr"``), the command line's
  ``--set KEY=VALUE``;
- :func:`resolve_options`: ``options`` and keyword overrides of a function, merged into one validated object.

A field that holds option objects declares them in its metadata with :func:`nested`: one class (``nested(PGD)``)
or several, chosen by name (``nested(LinearizedStep, BirkhoffStep, ...)``, each class with a ``method`` class
variable). Such a field may also allow ``None`` (``optional=True``: e.g. no verification).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["Options", "nested", "renamed_keywords", "resolve_options", "set_path", "setting_paths"]

T = TypeVar("T", bound="Options")


def nested(*classes: type, optional: bool = False, default: Any = dataclasses.MISSING,
           named: tuple[Any, ...] = ()) -> Any:  # fmt: skip
    """A dataclass field holding an option object of one of ``classes`` (``None`` too with ``optional``).

    ``named``: instances that a method's name stands for in this field instead of its class's defaults (e.g. PAM on
    a curve backtracks its linearised step, so ``"linearized"`` there means ``LinearizedStep(backtrack=True)``).
    """
    kwargs: dict[str, Any] = {"metadata": {"options": classes, "optional": optional, "named": named}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def _choices(field: dataclasses.Field) -> tuple[type, ...] | None:
    return field.metadata.get("options")


def _by_name(classes: tuple[type, ...]) -> dict[str, type]:
    return {getattr(c, "method", c.__name__): c for c in classes}


def _encode(value: Any, classes: tuple[type, ...] | None) -> Any:
    if isinstance(value, Options):
        out = value.to_dict()
        if classes is not None and len(classes) > 1:
            out = {"method": type(value).method, **out}
        return out
    if isinstance(value, tuple):
        return [_encode(v, None) for v in value]
    if isinstance(value, Mapping):
        return {k: _encode(v, None) for k, v in value.items()}
    return value


def _decode_option(value: Any, field: dataclasses.Field, owner: str) -> Any:
    classes = _choices(field)
    if classes is None or value is None or isinstance(value, Options):
        return value
    named = _by_name(classes)
    if isinstance(value, str):  # a method's name: its default settings (in this field)
        if value not in named:
            raise ValueError(f"unknown {owner}.{field.name} {value!r}; expected one of {sorted(named)}")
        given = [v for v in field.metadata.get("named", ()) if type(v) is named[value]]
        return given[0] if given else named[value]()
    if isinstance(value, Mapping):
        data = dict(value)
        if len(classes) > 1:
            method = data.pop("method", None)
            if method not in named:
                raise ValueError(f"`{owner}.{field.name}` needs a `method` among {sorted(named)}, got {method!r}")
            return named[method].from_dict(data)
        return classes[0].from_dict(data)
    return value


class Options:
    """Base class of the frozen option dataclasses (see the module documentation)."""

    def _check(self, name: str, check: Any, **bounds: Any) -> None:
        """Validate the field ``name`` with ``check(value, name, **bounds)`` (a :mod:`neuralign._validate` helper)
        and keep what it returns (``10`` for a float option becomes ``10.0``, a NumPy integer an ``int``)."""
        object.__setattr__(self, name, check(getattr(self, name), name, **bounds))

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-able dict (nested option objects as dicts)."""
        return {f.name: _encode(getattr(self, f.name), _choices(f)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        """Inverse of :meth:`to_dict`; missing names take their defaults, unknown ones raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__} options must be a dict, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} options {unknown}; expected some of {sorted(known)}")
        values = {k: _decode_option(v, known[k], cls.__name__) for k, v in data.items()}
        return cls(**values)

    def replace(self: T, **changes: Any) -> T:
        """A copy with ``changes`` (validated like a new object); unknown names raise ``ValueError``."""
        known = {f.name: f for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = sorted(k for k in changes if k not in known)
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} options {unknown}; expected some of {sorted(known)}")
        values = {k: _decode_option(v, known[k], type(self).__name__) for k, v in changes.items()}
        return dataclasses.replace(self, **values)  # type: ignore[type-var]


def setting_paths(cls: type, prefix: str = "") -> list[str]:
    """The dotted paths of every setting of the option class ``cls``, nested groups expanded (a field of several
    option classes lists each class's fields as ``<field>.<field of that class>``, once each).

    >>> from neuralign.attacks import PGD
    >>> setting_paths(PGD)
    ['eps', 'alpha', 'steps', 'random_start']
    """
    out: list[str] = []
    for f in dataclasses.fields(cls):
        classes = _choices(f)
        if not classes:
            out.append(prefix + f.name)
            continue
        out.append(prefix + f.name)  # the group itself (a method's name, or None/true/false where optional)
        for c in classes:
            out += [p for p in setting_paths(c, f"{prefix}{f.name}.") if p not in out]
    return out


def set_path(options: T, path: str, value: Any, *, _full: str | None = None) -> T:
    """A copy of ``options`` with the field at the dotted ``path`` set to ``value``.

    A path through an option field that holds ``None`` first takes that field's default class (its only class,
    or the first). A string value for a field of several option classes picks one by name, with its defaults.

    Raises
    ------
    ValueError
        Naming the unknown part of the path and the names known there.

    Examples
    --------
    >>> from neuralign.attacks import PGD
    >>> set_path(PGD(), "steps", 7).steps
    7
    """
    full = path if _full is None else _full
    head, _, rest = path.partition(".")
    known = {f.name: f for f in dataclasses.fields(options)}  # type: ignore[arg-type]
    if head not in known:
        raise ValueError(f"unknown setting {full!r}: {type(options).__name__} has no {head!r}; expected one of "
                         f"{sorted(known)}")  # fmt: skip
    if not rest:
        return options.replace(**{head: value})
    current = getattr(options, head)
    classes = _choices(known[head])
    if current is None and classes:
        current = classes[0]()
    if not isinstance(current, Options):
        raise ValueError(f"unknown setting {full!r}: {head!r} is a value, not a group of settings")
    return options.replace(**{head: set_path(current, rest, value, _full=full)})


def resolve_options(cls: type[T], options: T | None, overrides: Mapping[str, Any], *, where: str) -> T:
    """``options`` (or ``cls()``) with the keyword ``overrides`` of a function applied, validated once.

    Raises
    ------
    TypeError
        If ``options`` is not a ``cls``.
    ValueError
        For a keyword that is not an option of ``cls`` (``where`` names the function).
    """
    if options is None:
        options = cls()
    elif not isinstance(options, cls):
        raise TypeError(f"`options` of {where} must be a {cls.__name__}, got {type(options).__name__}")
    if not overrides:
        return options
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword arguments {unknown}; its options are {sorted(known)}")
    return options.replace(**overrides)


def renamed_keywords(given: Mapping[str, Any], renames: Mapping[str, str], *, where: str) -> dict[str, Any]:
    """The keyword arguments ``given`` under the names of before neuralign 0.2 (``renames``: old -> new), as
    ``{new: value}``, each with a :class:`DeprecationWarning` naming the new name.

    Raises
    ------
    TypeError
        For a keyword that is neither current nor an old name (as Python would for an unknown keyword).
    """
    unknown = sorted(k for k in given if k not in renames)
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword arguments {unknown}")
    import warnings

    out = {}
    for old, value in given.items():
        warnings.warn(f"{where}(): `{old}` is deprecated since neuralign 0.2; use `{renames[old]}`",
                      DeprecationWarning, stacklevel=3)  # fmt: skip
        out[renames[old]] = value
    return out
