"""One registry of model families: a family is a function building a classifier by name.

A name ``prefix:model`` goes to the family registered with that prefix (``timm:resnet26d``);
a bare name goes to the first bare-name family that lists it (``resnet20``, ``resnet18``).
Adding a family is one decorated function::

    @register_family("mine", names=lambda: ["tiny"])
    def build_mine(name: str, request: ModelRequest) -> nn.Module: ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from adasap.errors import UserError, quote
from adasap.registry import Registry


@dataclass(frozen=True)
class ModelRequest:
    """What the caller wants the classifier to take and produce."""

    num_classes: int
    in_channels: int
    image_size: int
    pretrained: bool = False


Builder = Callable[[str, ModelRequest], nn.Module]


@dataclass(frozen=True)
class ModelFamily:
    """``build(name, request)`` for every name in ``names()``; ``bare``: reachable unprefixed."""

    prefix: str
    build: Builder
    names: Callable[[], Iterable[str]]
    bare: bool


_FAMILIES: Registry[ModelFamily] = Registry("model family")


def register_family(
    prefix: str, *, names: Callable[[], Iterable[str]], bare: bool = False
) -> Callable[[Builder], Builder]:
    """Register ``build(name, request)`` as the family ``prefix`` (names ``prefix:<name>``).

    ``names`` lists the models the family builds (called only when needed, so a family of an
    optional library imports it lazily); with ``bare`` they are reachable without the prefix.
    """

    def decorate(build: Builder) -> Builder:
        _FAMILIES.add(prefix, ModelFamily(prefix, build, names, bare))
        return build

    return decorate


def families() -> dict[str, ModelFamily]:
    return {prefix: _FAMILIES.get(prefix) for prefix in _FAMILIES}


def resolve(name: str) -> tuple[ModelFamily, str] | None:
    """The family building ``name`` and the name within it; ``None`` for an unknown bare name."""
    key = name.strip()
    prefix, sep, rest = key.partition(":")
    if sep:
        # Not the registry's message: prefixes as written ("timm:"), bare names offered too.
        if prefix.lower() not in _FAMILIES:
            raise UserError(
                f"unknown model family {quote(prefix)} in {quote(name)}: use one of "
                f"{', '.join(f + ':' for f in _FAMILIES)} or a bare name such as resnet18"
            )
        return _FAMILIES.get(prefix.lower()), rest.strip()
    for family in map(_FAMILIES.get, _FAMILIES):
        if family.bare and key.lower() in family.names():
            return family, key.lower()
    return None
