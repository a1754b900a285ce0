"""Settings dataclasses as flat key spaces, typed by their own annotations.

A settings dataclass (``PruneSettings`` holding a ``PrunerSettings``, say) is read through
:func:`dataclasses.fields` and :func:`typing.get_type_hints`: a new field is a new key, with no
schema to edit. A field annotated with a dataclass is a section: its fields join the parent's
flat key space, so ``{"keep": 0.3, "rho_max": 0.4}`` sets fields at two depths. A section
declared with :func:`section` may leave some of its fields out of that key space, for the
parent to set (a run's ``seed`` is also its pruner's).

Values are checked the same way from Python (:func:`check_field_types`, messages spelled
``True``/``None``) and from config files or flags (:func:`check_flat`, spelled ``true``/``null``):
ints count as floats, ``bool`` never counts as a number, a ``tuple[str, ...]`` field takes a
list or tuple of strings, and a ``Literal[...]`` field takes only its values.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import types
from collections.abc import Collection, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from adasap.errors import UserError, quote

NoneType = type(None)
# What a field may hold: classes (NoneType for None), list[X] / tuple[X, ...] for sequences, or
# Literal[...] for a set of values.
Types = tuple[Any, ...]
Settings = TypeVar("Settings")
# dataclasses.field metadata: the fields of a section left out of the flat key space
_OMIT = "adasap.settings.omit"

_SEQUENCES = (list, tuple, collections.abc.Sequence)
_NAMES = {str: "a string", int: "an integer", float: "a number"}
_PLURALS = {str: "strings", int: "integers", float: "numbers"}
_MAX_KEYS = 10  # unknown keys a message lists
_SPELLING = {
    False: {bool: "True or False", NoneType: "None"},  # Python values
    True: {bool: "true or false", NoneType: "null"},  # config files and flags
}


def allowed_types(hint: Any) -> Types:
    """The types a value annotated with ``hint`` may have (a ``Literal`` is kept whole)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return tuple(dict.fromkeys(t for arg in get_args(hint) for t in allowed_types(arg)))
    if origin in (Literal, *_SEQUENCES):
        return (hint,)
    if hint is Any:
        return (object,)
    if hint is None:
        return (NoneType,)
    return (origin or hint,)


def section(cls: type, *, omit: Collection[str] = ()) -> Any:
    """A section field holding ``cls()`` by default, with the fields named in ``omit`` left out of
    the flat key space: the parent holds keys of the same names and sets those fields itself."""
    return dataclasses.field(default_factory=cls, metadata={_OMIT: frozenset(omit)})


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Types, type | None, frozenset[str]], ...]:
    """Per field of one dataclass: its name, allowed types, and when it is a section, the
    section's dataclass and the fields that :func:`section` leaves out (else None and none)."""
    hints = get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        allowed = allowed_types(hints[f.name])
        (only, *rest) = allowed
        is_section = not rest and isinstance(only, type) and dataclasses.is_dataclass(only)
        hidden = f.metadata.get(_OMIT, frozenset())
        rows.append((f.name, allowed, only if is_section else None, hidden))
    return tuple(rows)


def _items(form: Any) -> Types:
    return tuple(t for arg in get_args(form) if arg is not Ellipsis for t in allowed_types(arg))


def _accepts(form: Any, value: Any) -> bool:
    if get_origin(form) is Literal:  # by value, and of the value's own type (True is not 1)
        return any(type(value) is type(v) and value == v for v in get_args(form))
    if form is NoneType:
        return value is None
    if form in (int, float) and isinstance(value, bool):
        return False
    if form is float:
        return isinstance(value, int | float)
    if get_origin(form) in _SEQUENCES:
        items = _items(form) or (object,)
        return isinstance(value, list | tuple) and all(
            any(_accepts(t, v) for t in items) for v in value
        )
    return isinstance(value, form)


def accepts(allowed: Types, value: Any) -> bool:
    """Whether ``value`` is one of the ``allowed`` types."""
    return any(_accepts(form, value) for form in allowed)


def _name(form: Any, config: bool) -> str:
    spelled = _SPELLING[config].get(form) or _NAMES.get(form)
    if spelled is not None:
        return spelled
    if get_origin(form) is Literal:
        values = get_args(form)
        return repr(values[0]) if len(values) == 1 else "one of " + ", ".join(map(repr, values))
    if get_origin(form) in _SEQUENCES:
        items = _items(form)
        if items and all(t in _PLURALS for t in items):
            return "a list of " + " or ".join(_PLURALS[t] for t in items)
        return "a list"
    name = getattr(form, "__name__", str(form))
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def describe(allowed: Types, *, config: bool = False) -> str:
    """``allowed`` in words, as Python values or (``config=True``) as config file values."""
    return " or ".join(_name(form, config) for form in allowed)


def check_field_types(settings: Any) -> None:
    """Raise :class:`UserError` naming the first field of ``settings`` (or of its sections) whose
    value has the wrong type, or is not one of a ``Literal`` field's values."""
    defaults = {f.name: f.default for f in dataclasses.fields(settings)}
    for name, allowed, section, _ in _fields(type(settings)):
        value = getattr(settings, name)
        if not accepts(allowed, value):
            example = defaults[name] is not dataclasses.MISSING
            # a Literal's values are named already: its type and an example would only repeat them
            literal = any(get_origin(form) is Literal for form in allowed)
            raise UserError(
                f"{name} must be {describe(allowed)}, got {quote(value)}"
                + ("" if literal else f" ({type(value).__name__})")
                + (f": pass e.g. {name}={defaults[name]!r}" if example and not literal else "")
            )
        if section is not None:
            check_field_types(value)


def flat_schema(cls: type, omit: Collection[str] = ()) -> dict[str, Types]:
    """Key -> allowed types for ``cls`` and its sections, less the fields named in ``omit``."""
    schema: dict[str, Types] = {}
    for name, allowed, section, hidden in _fields(cls):
        if name in omit:
            continue
        entries = flat_schema(section, {*omit, *hidden}) if section else {name: allowed}
        clash = entries.keys() & schema.keys()
        if clash:
            raise TypeError(f"{cls.__name__}: two fields make the flat key(s) {sorted(clash)}")
        schema.update(entries)
    return schema


def to_flat(settings: Any, omit: Collection[str] = ()) -> dict[str, Any]:
    """``settings`` as one flat mapping of JSON/YAML values (sequences become lists)."""
    flat: dict[str, Any] = {}
    for name, _, section, hidden in _fields(type(settings)):
        if name in omit:
            continue
        value = getattr(settings, name)
        if section is not None:
            flat.update(to_flat(value, {*omit, *hidden}))
        else:
            flat[name] = list(value) if isinstance(value, list | tuple) else value
    return flat


def _convert(allowed: Types, value: Any) -> Any:
    """Ints as floats for a number field; a list as the sequence type of a sequence field."""
    if float in allowed and int not in allowed and isinstance(value, int):
        return float(value)
    for form in allowed:
        origin = get_origin(form)
        if origin in _SEQUENCES and isinstance(value, list | tuple):
            return (origin if origin in (list, tuple) else tuple)(value)
    return value


def check_flat(
    values: Mapping[str, Any], schema: Mapping[str, Types], source: str | None = None
) -> dict[str, Any]:
    """``values`` with known keys and allowed types, converted (ints to floats for numbers,
    lists to tuples for tuples); :class:`UserError` for an unknown key, a wrong type or a value
    not among a ``Literal``'s, prefixed with ``source`` (say, the file) when given."""
    try:
        unknown = sorted(set(values) - set(schema))
        if unknown:
            raise UserError(
                f"unknown config key(s) {', '.join(map(quote, unknown[:_MAX_KEYS]))}"
                + (f" and {len(unknown) - _MAX_KEYS} more" if len(unknown) > _MAX_KEYS else "")
                + f": allowed keys are {', '.join(sorted(schema))}"
            )
        for key, value in values.items():
            if not accepts(schema[key], value):
                raise UserError(
                    f"config key {key!r} must be {describe(schema[key], config=True)}, "
                    f"got {quote(value)}"
                )
        return {key: _convert(schema[key], value) for key, value in values.items()}
    except UserError as exc:
        if source is None:
            raise
        raise UserError(f"{source}: {exc}") from None


def replace_flat(
    settings: Settings, values: Mapping[str, Any], omit: Collection[str] = ()
) -> Settings:
    """``settings`` with the flat ``values`` (keys of :func:`flat_schema`) put in place at any
    depth, unchecked; fields left out by ``omit`` or by a :func:`section` are not set."""
    changes = {}
    for name, _, section, hidden in _fields(type(settings)):
        if name in omit:
            continue
        if section is not None:
            changes[name] = replace_flat(getattr(settings, name), values, {*omit, *hidden})
        elif name in values:
            changes[name] = values[name]
    return dataclasses.replace(settings, **changes)


def from_flat(
    base: Settings,
    values: Mapping[str, Any],
    omit: Collection[str] = (),
    source: str | None = None,
) -> Settings:
    """``base`` with the flat ``values`` put in place, at any depth, after :func:`check_flat`.

    Only keys and types are checked here; ranges are the settings' own ``validate()`` (or a
    section's ``__post_init__``, which runs as it is rebuilt here).
    """
    return replace_flat(base, check_flat(values, flat_schema(type(base), omit), source), omit)
