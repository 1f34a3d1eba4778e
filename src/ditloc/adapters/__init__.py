"""Model-family adapters; `get_adapter(pipe)` picks one from the transformer class."""

from __future__ import annotations

from ..errors import DitlocError
from .base import Adapter
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sana import SanaAdapter
from .sd3 import SD3Adapter

ADAPTERS: tuple[type[Adapter], ...] = (PixArtAdapter, SanaAdapter, FluxAdapter, SD3Adapter)


def supported_families() -> list[str]:
    return [f"{a.family} ({', '.join(a.transformer_classes)})" for a in ADAPTERS]


def get_adapter(pipe) -> Adapter:
    transformer = getattr(pipe, "transformer", None)
    name = type(transformer).__name__ if transformer is not None else type(pipe).__name__
    for adapter in ADAPTERS:
        if name in adapter.transformer_classes:
            return adapter(pipe)
    raise DitlocError(
        f"unsupported model {type(pipe).__name__} with {name}; supported families: "
        + "; ".join(supported_families())
    )


__all__ = [
    "ADAPTERS",
    "Adapter",
    "FluxAdapter",
    "PixArtAdapter",
    "SD3Adapter",
    "SanaAdapter",
    "get_adapter",
    "supported_families",
]
