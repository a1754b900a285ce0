"""timm classifiers as ``timm:<name>`` (the optional extra ``pip install adasap[timm]``)."""

from __future__ import annotations

import difflib
from types import ModuleType

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


@register_family("timm", names=timm_names)
def build_timm(name: str, request: ModelRequest) -> nn.Module:
    """``timm.create_model`` with our classes and channels; timm adapts pretrained stems and
    heads itself (``in_chans``, ``num_classes``)."""
    timm = _timm()
    if not timm.is_model(name.partition(".")[0]):  # names may carry a weights tag
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UserError(f"unknown timm model {quote(name)}: {hint or 'see timm.list_models()'}")
    try:
        # exportable: layers that trace and export to ONNX (no scripted or fused ops)
        return timm.create_model(
            name,
            pretrained=request.pretrained,
            num_classes=request.num_classes,
            in_chans=request.in_channels,
            exportable=True,
        )
    except (OSError, RuntimeError) as exc:
        if not request.pretrained:
            raise
        reason = exception_reason(exc)
        raise UserError(
            f"cannot fetch pretrained weights for timm:{name} ({reason}): connect to the "
            "internet or set HF_HUB_OFFLINE=1 with the weights in the Hugging Face cache"
        ) from None
