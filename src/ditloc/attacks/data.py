"""An attack's prompts, seeds and images of the concept.

Prompts come from the probe set (the toy set on the toy models, LocK's otherwise): the
category that holds the concept gives the training prompts (its localization templates) the
optimized attacks fit, and the held-out prompts (its evaluation templates) every table cell is
generated from; a concept in no category gets a few generic templates. User prompts join the
training prompts (and the prompts attack). Held-out images take seeds no training image takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DitlocError

#: templates for a concept no probe-set category holds
GENERIC_TRAIN = ("a picture of {concept}", "a photo of {concept}", "an image showing {concept}", "{concept}")
GENERIC_HELD_OUT = ("a drawing of {concept}", "there is {concept}", "a painting of {concept}",
                    "{concept} in a picture")
#: held-out generation seeds start here (training images are drawn with seeds far below)
HELD_OUT_SEED = 1_000_000_000


@dataclass(frozen=True)
class Carriers:
    """The concept's prompts: `train` (fitted by the optimized attacks; with the user's), `held_out`
    (every table cell), the probe-set category and its evaluation text (None outside the probe set)."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]
    user: tuple[str, ...]
    category: str | None
    eval_text: str | None

    @property
    def everything(self) -> list[str]:
        """The prompts attack: every template of the category, both splits, and the user's prompts."""
        return list(dict.fromkeys(self.train + self.held_out))

    def to_dict(self) -> dict:
        return {"category": self.category, "eval_text": self.eval_text, "train": list(self.train),
                "held_out": list(self.held_out), "user": list(self.user)}


def carriers(probe_set: str, concept: str, user_prompts=None) -> Carriers:
    """The prompts of `concept` in the probe set `probe_set` (see the module doc)."""
    from ..probes import load_probe_set
    from ..probes.core import fill
    from ..text import find_occurrences

    user = tuple(str(p).strip() for p in user_prompts or ())
    for i, p in enumerate(user):
        if not find_occurrences(p, concept):
            raise DitlocError(f"prompt {i + 1} ({p!r}) does not contain the concept {concept!r}")
    key = concept.strip().lower()
    for category in load_probe_set(probe_set).categories:
        for c in category.concepts:
            if c.name.lower() == key:
                train = tuple(category.prompts(c, "localization"))
                held = tuple(category.prompts(c, "evaluation"))
                return Carriers(tuple(dict.fromkeys(train + user)), held, user, category.name,
                                category.eval_text_for(c))
    train = tuple(fill(t, concept) for t in GENERIC_TRAIN)
    held = tuple(fill(t, concept) for t in GENERIC_HELD_OUT)
    return Carriers(tuple(dict.fromkeys(train + user)), held, user, None, None)


def held_out_seeds(seeds, n: int | None) -> list[int]:
    """Explicit seeds (a list), or `n` seeds derived from a base seed (an int)."""
    if isinstance(seeds, (list, tuple)):
        out = [int(s) for s in seeds]
        if not out:
            raise DitlocError("seeds is empty; pass a base seed or at least one seed")
        if n is not None and n != len(out):
            raise DitlocError(f"n_images ({n}) and the number of seeds ({len(out)}) differ; give one of them")
        return out
    return [HELD_OUT_SEED + int(seeds) * 100_003 + i for i in range(64 if n is None else int(n))]


def spread(prompts, n: int) -> list[str]:
    """`n` prompts going round `prompts` (image i takes prompt i mod len)."""
    prompts = list(prompts)
    return [prompts[i % len(prompts)] for i in range(n)]


def check_image_folder(directory, size: tuple[int, int] | None) -> list[Path]:
    """The images of a folder (refused: missing, empty, not RGB, or, with `size` (h, w), another
    size); reads only their headers, so it runs before any model loads."""
    from PIL import Image, UnidentifiedImageError

    from ..edit.data import image_files

    files = image_files(directory)
    for path in files:
        try:
            with Image.open(path) as im:
                mode, (w, h) = im.mode, im.size
        except (UnidentifiedImageError, OSError) as e:
            raise DitlocError(f"cannot read image {path}: {e}") from None
        if mode != "RGB":
            raise DitlocError(f"{path} is {mode}; convert the images to RGB")
        if size is not None and (h, w) != tuple(size):
            raise DitlocError(f"{path} is {w}x{h}; the model generates {size[1]}x{size[0]}, resize the images")
    return files


def concept_latents(pipe, adapter, kw: dict, images, prompts: list[str], n: int, seed: int, out: Path | None):
    """The images of the concept the optimized attacks fit, as latents [N, C, h, w], and per image
    the index of its prompt in `prompts` (None: any prompt) and a record.

    `images`: a folder (every image, at the model's size), a tensor [N, 3, h, w] in [-1, 1], or
    None: `n` images drawn by `pipe` (the unedited model), image i from prompt i mod len
    (cached in `out`, so a rerun fits the same images)."""
    from ..edit.data import encode_images, load_image_folder
    from ..edit.jobs import _cached_latents

    h, w = int(kw.get("height") or adapter.image_size()[0]), int(kw.get("width") or adapter.image_size()[1])
    if images is None:
        drawn = spread(prompts, n)
        latents = _cached_latents(out, "concept_latents", pipe, drawn, 1, seed, kw)
        pairs = torch.tensor([i % len(prompts) for i in range(n)])
        return latents.to(pipe.transformer.dtype), pairs, {"drawn": n, "prompts": drawn, "seed": seed}
    if isinstance(images, (str, Path)):
        check_image_folder(images, (h, w))
        pixels, records = load_image_folder(images, (h, w))
        record = {"folder": str(images), "files": records}
    else:
        pixels = images
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (h, w):
            raise DitlocError(f"images must be [N, 3, {h}, {w}], got {list(pixels.shape)}")
        record = {"tensor": list(pixels.shape)}
    latents = encode_images(pipe, pixels).to(pipe.transformer.device, pipe.transformer.dtype)
    return latents, None, record
