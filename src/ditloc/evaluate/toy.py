"""The toy world's oracle classifier as an evaluator (plays CLIP's part there)."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from ..errors import DitlocError
from ..toy import world
from .base import Evaluator


def parse_toy_concept(text: str) -> tuple[str, str]:
    """A toy concept -> (category, oracle label). Accepts "category: value"
    (the toy probe set's evaluation text), "category=value" or a bare value;
    the hazard is "hazard"/"present" or "absent", a missing character "none"."""
    m = re.fullmatch(r"\s*(\w+)\s*[:=]\s*(\w+)\s*", text)
    if m:
        category, value = m.group(1).lower(), m.group(2).lower()
    else:
        value = text.strip().lower()
        try:
            category = world.concept_category(value)
        except KeyError:
            raise DitlocError(
                f"{text!r} is not a toy concept; write 'category: value', e.g. 'shape: star', 'hazard: present'"
            ) from None
    if category not in world.CATEGORIES:
        raise DitlocError(f"unknown toy category {category!r}; the toy categories are {', '.join(world.CATEGORIES)}")
    if category == "hazard":
        value = {"hazard": "present"}.get(value, value)
        labels = ("present", "absent")
    else:
        labels = world.CATEGORIES[category] + (("none",) if category == "character" else ())
    if value not in labels:
        raise DitlocError(f"{value!r} is not a toy {category}; use one of {', '.join(labels)}")
    return category, value


class ToyOracle(Evaluator):
    """Presence = the oracle's probability of the concept's label in its category
    (32x32 toy-world images). `hard`: 1.0 where that label is the oracle's most
    probable one (its classification), else 0.0."""

    kind = "toy"

    def __init__(self, oracle=None, *, hard: bool = False, batch_size: int = 256):
        from ..toy.oracle import load_oracle

        super().__init__(batch_size=batch_size)
        self.oracle = oracle if oracle is not None else load_oracle()
        self.hard = hard

    def check_text(self, text) -> str:
        if not isinstance(text, str):
            raise DitlocError(f"give the toy concept as a string such as 'shape: star', got {text!r}")
        category, label = parse_toy_concept(text)
        return f"{category}: {label}"

    def check_image_size(self, width: int, height: int) -> None:
        size = world.IMAGE_SIZE
        if (width, height) != (size, size):
            raise DitlocError(f"the toy oracle reads {size}x{size} images, got {width}x{height}")

    @property
    def differentiable(self) -> bool:
        return not self.hard

    def score_tensor(self, images, text: str):
        """The oracle's probability of the label, differentiable in the pixels [N, 3, 32, 32] in [0, 1]."""
        if self.hard:
            return super().score_tensor(images, text)
        category, label = self.check_text(text).split(": ")
        net = self.oracle.net
        param = next(net.parameters())
        logits = net(images.to(param.device, param.dtype) * 2 - 1)[category]  # [N, n_labels]
        return logits.softmax(-1)[:, self.oracle.classes[category].index(label)]

    def _score_batch(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        for im in images:
            self.check_image_size(*im.size)
        pixels = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # [B, 32, 32, 3]
        probs = self.oracle.classify(pixels).probs  # category -> [B, n_labels]
        out = np.empty(len(images))
        for i, text in enumerate(texts):
            category, label = text.split(": ")
            p, j = probs[category][i], self.oracle.classes[category].index(label)  # [n_labels], label index
            out[i] = float(p.argmax() == j) if self.hard else p[j]
        return out
