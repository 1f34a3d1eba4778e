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


def get_adapter(pipe, **options) -> Adapter:
    """The adapter for `pipe`'s transformer class. `options` are family settings
    (e.g. SD3's `text_stream`); an option the family does not have, or a value it
    does not take, is an error naming the valid ones."""
    transformer = getattr(pipe, "transformer", None)
    name = type(transformer).__name__ if transformer is not None else type(pipe).__name__
    for adapter in ADAPTERS:
        if name in adapter.transformer_classes:
            unknown = [k for k in options if k not in adapter.options]
            if unknown:
                valid = ", ".join(adapter.options) or "none"
                raise DitlocError(f"{adapter.family} has no option {unknown[0]!r} (its options: {valid})")
            return adapter(pipe, **options)
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
