"""The evaluator interface: images + a text -> one presence score per image.

Images are accepted as a list of PIL images, a numpy array or a torch tensor
(`[N, H, W, C]` or `[N, C, H, W]`, uint8 in [0, 255] or float in [0, 1]: what
diffusers returns for output_type "pil", "np" and "pt"). Scores are cached per
(image bytes, text) on the evaluator object, so scoring the same image twice,
e.g. the unchanged baseline of a causal curve, costs nothing.
"""

from __future__ import annotations

import hashlib
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..errors import DitlocError

ImagesLike = Union[Image.Image, np.ndarray, torch.Tensor, Sequence]


def _array_to_uint8(x: np.ndarray) -> np.ndarray:
    """One image array, [H, W, C] or [C, H, W], as uint8 [H, W, 3]."""
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3:
        raise DitlocError(f"an image must have 2 or 3 dimensions, got shape {tuple(x.shape)}")
    if x.shape[-1] not in (1, 3, 4) and x.shape[0] in (1, 3, 4):
        x = x.transpose(1, 2, 0)  # [C, H, W] -> [H, W, C]
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise DitlocError(
                f"float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                "for [-1, 1] images pass (x + 1) / 2, for [0, 255] pass x.astype(uint8)"
            )
        x = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x[..., :3])  # [H, W, 3] (alpha dropped)


def to_pil_images(images: ImagesLike) -> list[Image.Image]:
    """Any accepted image input as a list of RGB PIL images."""
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, torch.Tensor):
        images = images.detach().to("cpu")
        images = images.float().numpy() if images.is_floating_point() else images.numpy()
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            images = images[None]
        if images.ndim != 4:
            raise DitlocError(f"images must be [N, H, W, C] or [N, C, H, W], got shape {tuple(images.shape)}")
        return [Image.fromarray(_array_to_uint8(x)) for x in images]
    if isinstance(images, (list, tuple)):
        out = []
        for im in images:
            out.extend(to_pil_images(im))
        return out
    raise DitlocError(f"cannot read images from a {type(images).__name__}; give PIL images, a numpy array or a torch tensor")


def image_key(image: Image.Image) -> str:
    """A hash of the image's pixels (and size): the cache key."""
    h = hashlib.sha1(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class Evaluator:
    """Scores the presence of a concept (given as a text) in images.

    Subclasses implement `_score_batch(images, texts)` for at most
    `batch_size` images, each with its own text, and may override `check_text`;
    `score` adds input handling, batching and the per-(image, text) cache.
    """

    #: name in `get_evaluator`
    kind: str = ""

    def __init__(self, *, batch_size: int = 16):
        if batch_size < 1:
            raise DitlocError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self._cache: dict[tuple[str, str], float] = {}

    def score(self, images: ImagesLike, text: str | Sequence[str] | None = None) -> np.ndarray:
        """Presence score of `text` in each image: float64 [N]. `text` is one
        string for all images, or one per image."""
        pil = to_pil_images(images)
        texts = list(text) if isinstance(text, (list, tuple)) else [text] * len(pil)
        if len(texts) != len(pil):
            raise DitlocError(f"got {len(pil)} images but {len(texts)} texts; give one text or one per image")
        texts = [self.check_text(t) for t in texts]
        keys = [(image_key(im), t) for im, t in zip(pil, texts)]
        todo: dict[tuple[str, str], int] = {}  # key -> first index that needs it
        for i, k in enumerate(keys):
            if k not in self._cache and k not in todo:
                todo[k] = i
        pending = list(todo.items())
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            values = self._score_batch([pil[i] for _, i in chunk], [texts[i] for _, i in chunk])  # [B]
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            if len(values) != len(chunk):
                raise RuntimeError(f"{type(self).__name__}._score_batch returned {len(values)} scores for {len(chunk)} images")
            for (k, _), v in zip(chunk, values):
                self._cache[k] = float(v)
        return np.array([self._cache[k] for k in keys], dtype=np.float64)  # [N]

    __call__ = score

    def check_text(self, text) -> str:
        """`text` as this evaluator scores it (the cache's text); a DitlocError if it
        cannot use it. Callers check their texts with it before generating any image."""
        if not isinstance(text, str) or not text.strip():
            raise DitlocError(f"{type(self).__name__} needs a non-empty text to score against, got {text!r}")
        return text

    def check_image_size(self, width: int, height: int) -> None:
        """A DitlocError if this evaluator cannot score images of this size (callers check
        before generating any image); any size by default."""

    def _score_batch(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    #: whether :meth:`score_tensor` is differentiable (gradient-ranked search)
    differentiable = False

    def score_tensor(self, images, text: str):
        """Presence of `text` in images given as a tensor [N, 3, H, W] in [0, 1], differentiable
        in the pixels (a torch tensor [N]). Evaluators that cannot say so refuse."""
        raise DitlocError(f"the {type(self).__name__} evaluator is not differentiable; "
                          "use the search's rank='generation'")

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def cache_size(self) -> int:
        return len(self._cache)


def resolve_device_dtype(model: torch.nn.Module, device, dtype) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run on: the arguments, else where the model already is."""
    p = next(model.parameters())
    return torch.device(device) if device is not None else p.device, dtype if dtype is not None else p.dtype
