"""Settings dataclasses as flat key spaces, typed by their own annotations.

A settings dataclass (``PruneSettings`` holding an ``OptimizerSettings``, say) is read through
:func:`dataclasses.fields` and :func:`typing.get_type_hints`: a new field is a new key, with no
schema to edit. A field annotated with a dataclass is a section: its fields join the parent's
flat key space, so ``{"keep": 0.3, "rho_max": 0.4}`` sets fields at two depths.

Values are checked the same way from Python (:func:`check_field_types`, messages spelled
``True``/``None``) and from config files or flags (:func:`check_flat`, spelled ``true``/``null``):
ints count as floats, ``bool`` never counts as a number, and a ``tuple[str, ...]`` field takes a
list or tuple of strings.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import types
from collections.abc import Collection, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from adasap.errors import UserError

NoneType = type(None)
# What a field may hold: classes (NoneType for None), or list[X] / tuple[X, ...] for sequences.
Types = tuple[Any, ...]
Settings = TypeVar("Settings")

_SEQUENCES = (list, tuple, collections.abc.Sequence)
_NAMES = {str: "a string", int: "an integer", float: "a number"}
_PLURALS = {str: "strings", int: "integers", float: "numbers"}
_SPELLING = {
    False: {bool: "True or False", NoneType: "None"},  # Python values
    True: {bool: "true or false", NoneType: "null"},  # config files and flags
}


def allowed_types(hint: Any) -> Types:
    """The types a value annotated with ``hint`` may have (``Literal`` values give theirs)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return tuple(dict.fromkeys(t for arg in get_args(hint) for t in allowed_types(arg)))
    if origin is Literal:
        return tuple(dict.fromkeys(type(value) for value in get_args(hint)))
    if origin in _SEQUENCES:
        return (hint,)
    if hint is Any:
        return (object,)
    if hint is None:
        return (NoneType,)
    return (origin or hint,)


@functools.cache
def field_types(cls: type) -> dict[str, Types]:
    """Field name -> allowed types, for one dataclass (nested sections not expanded)."""
    hints = get_type_hints(cls)
    return {f.name: allowed_types(hints[f.name]) for f in dataclasses.fields(cls)}


def _section(allowed: Types) -> type | None:
    """The settings dataclass a field holds, when it is a section of the flat key space."""
    (only, *rest) = allowed
    return only if not rest and isinstance(only, type) and dataclasses.is_dataclass(only) else None


def _items(form: Any) -> Types:
    return tuple(t for arg in get_args(form) if arg is not Ellipsis for t in allowed_types(arg))


def _accepts(form: Any, value: Any) -> bool:
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
    """Raise :class:`UserError` naming the first field of ``settings`` whose value has the
    wrong type; a section is checked to be its dataclass, not field by field."""
    for f in dataclasses.fields(settings):
        allowed = field_types(type(settings))[f.name]
        value = getattr(settings, f.name)
        if not accepts(allowed, value):
            example = f.default is not dataclasses.MISSING
            raise UserError(
                f"{f.name} must be {describe(allowed)}, got {value!r} ({type(value).__name__})"
                + (f": pass e.g. {f.name}={f.default!r}" if example else "")
            )


def flat_schema(cls: type, omit: Collection[str] = ()) -> dict[str, Types]:
    """Key -> allowed types for ``cls`` and its sections, less the fields named in ``omit``."""
    schema: dict[str, Types] = {}
    for name, allowed in field_types(cls).items():
        if name in omit:
            continue
        section = _section(allowed)
        entries = flat_schema(section, omit) if section is not None else {name: allowed}
        clash = entries.keys() & schema.keys()
        if clash:
            raise TypeError(f"{cls.__name__}: two fields make the flat key(s) {sorted(clash)}")
        schema.update(entries)
    return schema


def to_flat(settings: Any, omit: Collection[str] = ()) -> dict[str, Any]:
    """``settings`` as one flat mapping of JSON/YAML values (sequences become lists)."""
    flat: dict[str, Any] = {}
    for name, allowed in field_types(type(settings)).items():
        if name in omit:
            continue
        value = getattr(settings, name)
        if _section(allowed) is not None:
            flat.update(to_flat(value, omit))
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
    lists to tuples for tuples); :class:`UserError` for an unknown key or a wrong type, prefixed
    with ``source`` (say, the file) when given."""
    try:
        unknown = sorted(set(values) - set(schema))
        if unknown:
            raise UserError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}: allowed keys are "
                f"{', '.join(sorted(schema))}"
            )
        for key, value in values.items():
            if not accepts(schema[key], value):
                raise UserError(
                    f"config key {key!r} must be {describe(schema[key], config=True)}, "
                    f"got {value!r}"
                )
        return {key: _convert(schema[key], value) for key, value in values.items()}
    except UserError as exc:
        if source is None:
            raise
        raise UserError(f"{source}: {exc}") from None


def _replace(settings: Settings, values: Mapping[str, Any]) -> Settings:
    changes = {}
    for name, allowed in field_types(type(settings)).items():
        if _section(allowed) is not None:
            changes[name] = _replace(getattr(settings, name), values)
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

    Only keys and types are checked here; ranges are the settings' own ``validate()``.
    """
    return _replace(base, check_flat(values, flat_schema(type(base), omit), source))
