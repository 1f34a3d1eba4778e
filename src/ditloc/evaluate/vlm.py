"""A vision-language model as a yes/no judge of concept presence.

Presence is read from the next-token distribution after the question, not from
generated text: p = P(yes) / (P(yes) + P(no)), where P(yes) sums the
probabilities of the tokens that spell "yes" ("yes", "Yes", with and without a
leading space, whichever are single tokens), likewise for "no". This is smooth,
needs no parsing and is defined for every image.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import DitlocError
from .base import Evaluator, resolve_device_dtype
from .clip import _load

DEFAULT_QUESTION = "Does this image show {concept}? Answer yes or no."


def single_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Ids of the spellings of `words` (as given, with a leading space) that are one
    known token (the unknown token spells nothing)."""
    ids: set[int] = set()
    for w in words:
        for variant in (w, " " + w):
            enc = tokenizer.encode(variant, add_special_tokens=False)
            if len(enc) == 1 and enc[0] != tokenizer.unk_token_id:
                ids.add(int(enc[0]))
    return sorted(ids)


def yes_probability(logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> torch.Tensor:
    """P(yes) / (P(yes) + P(no)) from next-token logits [B, V] -> [B]."""
    yes = torch.logsumexp(logits[:, list(yes_ids)].float(), dim=-1)  # [B]
    no = torch.logsumexp(logits[:, list(no_ids)].float(), dim=-1)  # [B]
    return torch.sigmoid(yes - no)  # [B]


def _load_vlm(path: str):
    """AutoModelForImageTextToText, or AutoModelForVision2Seq where that is what knows the model."""
    import transformers

    reason = "no auto class for vision-language models in this transformers"
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        try:
            return cls.from_pretrained(path)
        except ValueError as e:  # this auto class does not know the architecture: try the next
            reason = " ".join(str(e).split())[:300]
        except OSError as e:
            reason = " ".join(str(e).split())[:300]
            break
    raise DitlocError(f"cannot load a vision-language model from {path!r} ({reason})")


class VLMJudge(Evaluator):
    """Ask a transformers vision-language model whether each image shows the concept.

    `model`: a directory / hub id (loaded with AutoModelForImageTextToText, or
    AutoModelForVision2Seq on older transformers, and AutoProcessor), or a
    loaded model with its `processor`. `question` has one `{concept}` slot.
    `chat_template`: wrap the question in the processor's chat template (None:
    when the processor has one). Without it the question is sent as is and
    must contain the image token the processor expects.
    """

    kind = "vlm"

    def __init__(self, model, *, processor=None, question: str = DEFAULT_QUESTION,
                 yes: Sequence[str] = ("yes", "Yes"), no: Sequence[str] = ("no", "No"),
                 chat_template: bool | None = None, device=None, dtype=None, batch_size: int = 4):
        from transformers import AutoProcessor

        super().__init__(batch_size=batch_size)
        if question.count("{concept}") != 1:
            raise DitlocError(f"question {question!r} needs exactly one {{concept}} slot")
        if isinstance(model, (str, Path)):
            processor = processor or _load("processor", AutoProcessor.from_pretrained, str(model))
            model = _load_vlm(str(model))
        if processor is None:
            raise DitlocError("a loaded vision-language model needs its processor")
        self.device, self.dtype = resolve_device_dtype(model, device, dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.processor = processor
        self.question = question
        tokenizer = processor.tokenizer
        self.yes_ids, self.no_ids = single_token_ids(tokenizer, yes), single_token_ids(tokenizer, no)
        if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
            raise DitlocError(
                f"the tokenizer must spell {list(yes)} and {list(no)} as single, different tokens "
                f"(got yes ids {self.yes_ids}, no ids {self.no_ids}); pass other words with yes=/no="
            )
        has_template = getattr(processor, "chat_template", None) is not None
        if chat_template and not has_template:
            raise DitlocError("chat_template=True but the processor has no chat template")
        self.chat_template = has_template if chat_template is None else chat_template
        params = inspect.signature(self.model.forward).parameters
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def prompt(self, text: str) -> str:
        """The exact text sent with each image for the concept `text`."""
        question = self.question.replace("{concept}", text)
        if not self.chat_template:
            return question
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def next_token_logits(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        """Logits of the token after each prompt, float32 [B, V] (prompts left-padded)."""
        tokenizer = self.processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"  # last position = the next token's
        try:
            inputs = self.processor(images=images, text=[self.prompt(t) for t in texts], return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        logits = self.model(**inputs, **self._keep_last).logits  # [B, L or 1, V]
        return logits[:, -1].float()  # [B, V]

    def _score_batch(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        return yes_probability(self.next_token_logits(images, texts), self.yes_ids, self.no_ids).cpu().numpy()
