"""Models ditloc knows by name, and how a pipeline says it is one of them.

A known model (the shipped toys) carries a key in its transformer's config, ``_ditloc_model``,
naming it. diffusers keeps that key through a copy of the directory, ``save_pretrained`` and
``from_pretrained``, so a re-saved or moved toy keeps its sampling arguments, its default
evaluator and its probe set. Packages that define such models (``ditloc.toy``) register them
here; the layers below (run options, localization, editing) ask this module about a pipeline
and never import the package that defined it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import DitlocError

#: the transformer config key that names a known model
MARKER = "_ditloc_model"


@dataclass(frozen=True)
class KnownModel:
    """A model ditloc knows: how it is sampled, judged and made."""

    name: str
    #: `pipe(...)` arguments it was trained for; every ditloc run of it passes them unless the caller sets them
    call_defaults: Mapping[str, Any]
    #: the call argument that sets its classifier-free guidance scale
    guidance_argument: str
    #: what to do when its directory is missing
    how_to_make: str = ""
    #: its default evaluator (a zero-argument factory), None for none
    evaluator: Callable[[], Any] | None = None
    #: the probe set whose categories hold its concepts
    probe_set: str = "lock"
    #: its directory (a zero-argument function, so that an environment variable can move it)
    directory: Callable[[], Path] | None = None


_KNOWN: dict[str, KnownModel] = {}


def register(model: KnownModel) -> None:
    """Make `model` known by its name (a second registration of the name replaces the first)."""
    _KNOWN[model.name] = model


def known_models() -> Mapping[str, KnownModel]:
    return MappingProxyType(_KNOWN)


def known_model(name: str) -> KnownModel:
    """The known model called `name`; an unknown name is a one-line error listing the known ones."""
    if name not in _KNOWN:
        raise DitlocError(f"unknown model {name!r}; the known models are {', '.join(_KNOWN) or 'none'}")
    return _KNOWN[name]


def mark(pipe, name: str) -> None:
    """Write `name` into `pipe`'s transformer config, so that `model_of` finds it (and a
    `save_pretrained` keeps it)."""
    known_model(name)
    pipe.transformer.register_to_config(**{MARKER: name})


def model_of(pipe) -> KnownModel | None:
    """The known model `pipe` is, by the key in its transformer's config; None for any other."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    name = config.get(MARKER) if isinstance(config, Mapping) else None
    return _KNOWN.get(name) if isinstance(name, str) else None


def call_defaults(pipe) -> dict:
    """The `pipe(...)` arguments `pipe`'s known model was trained for ({} for any other pipeline)."""
    model = model_of(pipe)
    return dict(model.call_defaults) if model is not None else {}


def default_evaluator(pipe):
    """The evaluator a pipeline has without being given one: its known model's (the toys' oracle),
    else None (pass one, or use the self objective)."""
    model = model_of(pipe)
    return model.evaluator() if model is not None and model.evaluator is not None else None


def probe_set_name(pipe) -> str:
    """The probe set whose categories hold `pipe`'s concepts: its known model's, else LocK's."""
    model = model_of(pipe)
    return model.probe_set if model is not None else "lock"
