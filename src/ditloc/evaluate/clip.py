"""CLIP-based presence: image-text similarity (CLIP score) and style similarity
to reference images.

Any checkpoint with `get_image_features` / `get_text_features` works (CLIP,
and its relatives); give a local directory or a hub id that is in the local
cache (with HF_HUB_OFFLINE=1 nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DitlocError
from .base import Evaluator, ImagesLike, resolve_device_dtype, to_pil_images

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def _pooled(out) -> torch.Tensor:
    """`get_*_features` returns the projected embedding (transformers 4) or an
    output whose `pooler_output` holds it (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _load(what: str, loader, source):
    try:
        return loader(source)
    except (OSError, ValueError, KeyError) as e:
        reason = " ".join(str(e).split())[:300]
        raise DitlocError(
            f"cannot load the {what} from {str(source)!r} ({reason}); give a local directory saved with "
            "save_pretrained or a hub id in the local cache"
        ) from None


class ClipEncoder:
    """A CLIP model with its tokenizer and image processor: unit-norm image and
    text embeddings. Give `model` as a path / hub id, or as a loaded model
    together with `tokenizer` and `image_processor`."""

    def __init__(self, model, *, tokenizer=None, image_processor=None, device=None, dtype=None):
        from transformers import AutoImageProcessor, AutoModel

        self.path = str(model) if isinstance(model, (str, Path)) else None  # None: given loaded
        if self.path is not None:
            model = _load("CLIP model", AutoModel.from_pretrained, self.path)
            image_processor = image_processor or _load("image processor", AutoImageProcessor.from_pretrained, self.path)
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise DitlocError(f"{type(model).__name__} has no get_image_features/get_text_features; give a CLIP-like model")
        if image_processor is None:
            raise DitlocError("a loaded CLIP model needs its image_processor (or give the model's directory instead)")
        self.device, self.dtype = resolve_device_dtype(model, device, dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.image_processor = image_processor
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if self.path is None:
                raise DitlocError("a loaded CLIP model needs its tokenizer to score texts")
            self._tokenizer = _load("tokenizer", AutoTokenizer.from_pretrained, self.path)
        return self._tokenizer

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit-norm image embeddings, float32 [N, D]."""
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]  # [N, 3, h, w]
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)  # [N, D]

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings, float32 [T, D] (texts truncated to the model's length)."""
        config = getattr(self.model.config, "text_config", self.model.config)
        max_length = min(self.tokenizer.model_max_length, getattr(config, "max_position_embeddings", 77))
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = self.model.get_text_features(
            input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device)
        )
        return F.normalize(_pooled(out).float(), dim=-1)  # [T, D]


class ClipScore(Evaluator):
    """Cosine similarity between CLIP embeddings of each image and the text.

    `scale=None` gives the raw cosine in [-1, 1]; `scale=100` gives the
    CLIPScore of torchmetrics, 100 * max(cos, 0) (Hessel et al. use 2.5).
    """

    kind = "clip"

    def __init__(self, model=DEFAULT_CLIP, *, tokenizer=None, image_processor=None, device=None, dtype=None,
                 scale: float | None = None, batch_size: int = 32):
        super().__init__(batch_size=batch_size)
        self.encoder = ClipEncoder(model, tokenizer=tokenizer, image_processor=image_processor, device=device, dtype=dtype)
        self.scale = scale
        self._text_cache: dict[str, torch.Tensor] = {}  # text -> [D]

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """[T, D], each text embedded once per evaluator."""
        new = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if new:
            for t, e in zip(new, self.encoder.embed_texts(new)):
                self._text_cache[t] = e
        return torch.stack([self._text_cache[t] for t in texts])

    def _score_batch(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        image_emb = self.encoder.embed_images(images)  # [B, D]
        text_emb = self.text_embeddings(texts)  # [B, D]
        cos = (image_emb * text_emb).sum(-1)  # [B]
        if self.scale is not None:
            cos = self.scale * cos.clamp(min=0)
        return cos.cpu().numpy()


class StyleSimilarity(Evaluator):
    """Mean cosine similarity of CLIP image embeddings to reference images of a style.

    `references`: images (any accepted form) used for every text, or a mapping
    concept -> images, in which case the text picks the references.
    """

    kind = "style"

    def __init__(self, model=DEFAULT_CLIP, references: Sequence | Mapping[str, ImagesLike] | None = None, *,
                 image_processor=None, device=None, dtype=None, batch_size: int = 32):
        super().__init__(batch_size=batch_size)
        if references is None or (not isinstance(references, (np.ndarray, torch.Tensor)) and len(references) == 0):
            raise DitlocError("StyleSimilarity needs reference images of the style: references=[images] or {concept: [images]}")
        self.encoder = ClipEncoder(model, image_processor=image_processor, device=device, dtype=dtype)
        if isinstance(references, Mapping):
            self.references = {k: self._embed_references(v, k) for k, v in references.items()}
        else:
            self.references = {"": self._embed_references(references, "")}

    def _embed_references(self, images: ImagesLike, name: str) -> torch.Tensor:
        pil = to_pil_images(images)
        if not pil:
            raise DitlocError(f"no reference images for {name!r}" if name else "the reference image list is empty")
        return torch.cat([self.encoder.embed_images(pil[i : i + self.batch_size])
                          for i in range(0, len(pil), self.batch_size)])  # [R, D]

    def check_text(self, text) -> str:
        if "" in self.references:  # one reference set: the text does not matter
            return ""
        if text not in self.references:
            raise DitlocError(f"no reference images for {text!r}; references were given for {', '.join(map(repr, self.references))}")
        return text

    def _score_batch(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        image_emb = self.encoder.embed_images(images)  # [B, D]
        scores = [(image_emb[i] @ self.references[t].T).mean() for i, t in enumerate(texts)]  # B x []
        return torch.stack(scores).cpu().numpy()
