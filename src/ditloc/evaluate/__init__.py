"""Presence of a concept in images: one interface, several scorers.

    from ditloc.evaluate import get_evaluator
    clip = get_evaluator("clip", model="path/to/clip")     # or a hub id in the local cache
    clip.score(images, "a painting in the style of Claude Monet")   # float64 [N]
    get_evaluator("style", model="path/to/clip", references=monet_images).score(images)
    get_evaluator("vlm", model="path/to/vlm").score(images, "Snoopy")  # P(yes) vs P(no)
    get_evaluator("toy").score(images, "shape: star")      # the toy world's oracle

Every evaluator takes PIL images, numpy arrays or torch tensors (uint8 or
float in [0, 1], channels first or last), scores in batches and caches each
(image, text) score, so the probe set's `eval_text(...)` can be passed as is.
"""

from __future__ import annotations

from ..errors import DitlocError
from .base import Evaluator, image_key, to_pil_images
from .clip import ClipEncoder, ClipScore, StyleSimilarity
from .toy import ToyOracle, parse_toy_concept
from .vlm import VLMJudge, single_token_ids, yes_probability

#: `get_evaluator` names
EVALUATORS: dict[str, type[Evaluator]] = {
    "clip": ClipScore,
    "style": StyleSimilarity,
    "vlm": VLMJudge,
    "toy": ToyOracle,
}


def get_evaluator(name: str, **kwargs) -> Evaluator:
    """An evaluator by name ("clip", "style", "vlm", "toy"); keyword arguments go to its class."""
    if name not in EVALUATORS:
        raise DitlocError(f"unknown evaluator {name!r}; use one of {', '.join(EVALUATORS)}")
    return EVALUATORS[name](**kwargs)


__all__ = [
    "ClipEncoder",
    "ClipScore",
    "EVALUATORS",
    "Evaluator",
    "StyleSimilarity",
    "ToyOracle",
    "VLMJudge",
    "get_evaluator",
    "image_key",
    "parse_toy_concept",
    "single_token_ids",
    "to_pil_images",
    "yes_probability",
]
