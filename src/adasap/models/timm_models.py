"""timm classifiers as ``timm:<name>`` (the optional extra ``pip install adasap[timm]``)."""

from __future__ import annotations

import difflib
from types import ModuleType
from typing import Any, NoReturn

from torch import nn

from adasap.errors import UserError, exception_reason, quote
from adasap.models.registry import ModelRequest, register_family


def _timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise UserError(
            "timm models need the timm package: pip install adasap[timm] (or pip install timm)"
        ) from None
    return timm


def timm_names() -> list[str]:
    return list(_timm().list_models())


def _default_image_size(timm: ModuleType, name: str) -> tuple[int, int] | None:
    """The ``(height, width)`` that timm builds ``name`` for when it fixes the input size at
    construction (vision transformers' position embeddings, attention windows and pools); None
    for a model that takes any size (a CNN), which has no ``img_size`` argument.

    timm's own rule (``_update_default_model_kwargs``): a model whose default pretrained config
    has ``fixed_input_size`` gets ``img_size`` from it, so such a constructor takes it."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as exc:  # a weights tag the architecture does not have
        raise UserError(
            f"unknown timm model {quote(name)} ({exception_reason(exc)}): drop the tag after "
            "the dot or see timm.list_pretrained()"
        ) from None
    if cfg is None or not getattr(cfg, "fixed_input_size", False) or cfg.input_size is None:
        return None
    height, width = cfg.input_size[-2:]
    return int(height), int(width)


@register_family("timm", names=timm_names)
def build_timm(name: str, request: ModelRequest) -> nn.Module:
    """``timm.create_model`` with our classes and channels; timm adapts pretrained stems and
    heads itself (``in_chans``, ``num_classes``), and models with a fixed input size (vision
    transformers) are built for ``image_size`` (timm resamples pretrained position
    embeddings)."""
    timm = _timm()
    if not timm.is_model(name.partition(".")[0]):  # names may carry a weights tag
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UserError(f"unknown timm model {quote(name)}: {hint or 'see timm.list_models()'}")
    default_size = _default_image_size(timm, name)
    size = (request.image_size, request.image_size)
    extra: dict[str, Any] = {"img_size": size} if default_size is not None else {}
    try:
        # exportable: layers that trace and export to ONNX (no scripted or fused ops)
        return timm.create_model(
            name,
            pretrained=request.pretrained,
            num_classes=request.num_classes,
            in_chans=request.in_channels,
            exportable=True,
            **extra,
        )
    except (RuntimeError, ValueError, AssertionError, ArithmeticError) as exc:
        # timm builds every model at its default size, so a failure at another size is the
        # size's: window, patch or pool arithmetic that does not fit (negative dimensions,
        # zero divisions, bare assertions)
        if default_size is None or default_size == size:
            if not (request.pretrained and isinstance(exc, RuntimeError)):
                raise
            _fetch_failed(name, exc)
        raise UserError(
            f"timm:{name} cannot be built for {request.image_size}px images "
            f"({exception_reason(exc)}): pick another model or image size (its default is "
            f"{default_size[0]} px), e.g. resnet18"
        ) from None
    except OSError as exc:
        if not request.pretrained:
            raise
        _fetch_failed(name, exc)


def _fetch_failed(name: str, exc: BaseException) -> NoReturn:
    """The :class:`UserError` for pretrained weights that timm could not fetch."""
    raise UserError(
        f"cannot fetch pretrained weights for timm:{name} ({exception_reason(exc)}): connect to "
        "the internet or set HF_HUB_OFFLINE=1 with the weights in the Hugging Face cache"
    ) from None
