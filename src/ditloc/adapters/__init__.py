"""Model-family adapters; `get_adapter(pipe)` picks one from the transformer class."""

from __future__ import annotations

from ..errors import BadOption, UnsupportedModel
from .base import Adapter
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sana import SanaAdapter
from .sd3 import SD3Adapter

ADAPTERS: tuple[type[Adapter], ...] = (PixArtAdapter, SanaAdapter, FluxAdapter, SD3Adapter)


def supported_families() -> list[str]:
    return [f"{a.family} ({', '.join(a.transformer_classes)})" for a in ADAPTERS]


def adapter_class(transformer_class: str) -> type[Adapter] | None:
    """The adapter serving a transformer class (by name, e.g. from a model_index.json), or None."""
    return next((a for a in ADAPTERS if transformer_class in a.transformer_classes), None)


def check_adapter_options(options, transformer_class: str | None = None) -> None:
    """Check adapter options before a model loads. With the transformer class known (a model
    directory's model_index.json names it), against its family's options; otherwise (or for a
    family ditloc does not support) an option no family has, or a value none takes, is refused."""
    options = dict(options)
    adapter = adapter_class(transformer_class) if transformer_class else None
    if adapter is not None:
        adapter.check_options(options)
        return
    for name, value in options.items():
        families = [a for a in ADAPTERS if name in a.options]
        if not families:
            valid = "; ".join(f"{a.family}: {', '.join(a.options)}" for a in ADAPTERS if a.options) or "none"
            raise BadOption(f"no model family has option {name!r} (options by family: {valid})")
        if value is not None and not any(value in a.options[name] for a in families):
            valid = sorted({v for a in families for v in a.options[name]})
            raise BadOption(f"option {name} must be one of {', '.join(valid)}; got {value!r}")


def get_adapter(pipe, **options) -> Adapter:
    """The adapter for `pipe`'s transformer class. `options` are family settings
    (e.g. SD3's `text_stream`); an option the family does not have, or a value it
    does not take, is an error naming the valid ones (`Adapter.check_options`)."""
    transformer = getattr(pipe, "transformer", None)
    name = type(transformer).__name__ if transformer is not None else type(pipe).__name__
    adapter = adapter_class(name)
    if adapter is not None:
        # one adapter per pipeline, transformer and options: every job on `pipe` shares it
        key = (id(transformer), adapter, tuple(sorted((k, repr(v)) for k, v in options.items())))
        cache = getattr(pipe, "__dict__", {}).setdefault("_ditloc_adapters", {})
        if key not in cache:
            cache.clear()  # a new transformer or other options: the old adapters are stale
            cache[key] = adapter(pipe, **options)
        return cache[key]
    raise UnsupportedModel(
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
    "adapter_class",
    "check_adapter_options",
    "get_adapter",
    "supported_families",
]
