"""What each optimized attack learns, and how it conditions the model.

- :class:`Inversion` (textual inversion, the CCE attack): `k` new input vectors per text
  encoder in the concept's place, started at the mean of the concept's own token vectors.
- :class:`Tokens` (UnlearnDiffAtk-style): `k` discrete tokens per text encoder, before the
  prompt or in the concept's place. Continuous vectors are optimized and, at every step,
  projected to their nearest vocabulary tokens (cosine); the model reads the projected tokens
  and the gradient passes straight through to the vectors, so the loss is always that of a
  real prompt; the result is the last projection.
- :class:`Conditioning` (the upper bound): additive changes of the text states the transformer
  reads at the concept's positions (one per position, shared by every prompt) and, in families
  with a pooled text vector, of that vector; they start at zero (the plain prompt).

Each gives the differentiable conditioning of a batch of prompts for training
(:meth:`text`), the pipeline call for generation (:meth:`call`), and its artifact (tensors +
metadata) that a replay turns back into the same calls.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import DitlocError
from . import slots


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt().clamp_min(1e-12))


class Plain:
    """The prompts as they are (the plain prompt, and the prompts attack)."""

    kind = "prompts"

    def call(self, prompts: list[str], values=None):
        return contextlib.nullcontext(), {"prompt": list(prompts)}


class _Injected:
    """Shared by the attacks that feed learned input vectors to the text encoders (:mod:`.slots`)."""

    kind = ""

    def __init__(self, adapter, kw: dict, concept: str, placement: str, placeholder: slots.Placeholder):
        self.adapter, self.kw, self.concept, self.placement = adapter, kw, concept, placement
        self.placeholder = placeholder
        self.encoders = {name: (tokenizer, slots.embedding_table(encoder))
                         for name, encoder, tokenizer, _ in adapter.text_encoders()}

    def prompts(self, prompts: list[str]) -> list[str]:
        return slots.slotted(prompts, self.concept, self.placement, self.placeholder.phrase)

    def lrs(self, lr: float) -> dict[str, float]:
        return {name: lr * _rms(table) for name, (_, table) in self.encoders.items()}

    def vectors(self, leaves: dict) -> dict:
        """The input vectors the encoders read, per encoder [k, d]."""
        return leaves

    def text(self, leaves: dict, prompts: list[str]) -> dict:
        with slots.injected(self.adapter, self.placeholder, self.vectors(leaves)):
            return self.adapter.encode_text(self.prompts(prompts), self.kw)

    def call(self, prompts: list[str], values: dict):
        return slots.injected(self.adapter, self.placeholder, values), {"prompt": self.prompts(prompts)}

    def _concept_ids(self, tokenizer) -> list[int]:
        return slots.token_ids(tokenizer, self.concept)


class Inversion(_Injected):
    kind = "inversion"

    def init(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        for name, (tokenizer, table) in self.encoders.items():
            ids = tokenizer(f"a {self.concept}", add_special_tokens=False)["input_ids"][
                len(tokenizer("a", add_special_tokens=False)["input_ids"]):]
            start = table[torch.tensor(ids)].float().mean(0)  # [d]
            out[name] = start.expand(self.placeholder.k, -1).clone()  # [k, d]
        return out

    def artifact(self, leaves: dict) -> tuple[dict, dict]:
        tensors = {f"vectors.{n}": v.detach().cpu().contiguous() for n, v in leaves.items()}
        return tensors, {"placeholder": self.placeholder.to_dict(), "placement": self.placement}

    @staticmethod
    def values(tensors: dict) -> dict:
        return {k.removeprefix("vectors."): v for k, v in tensors.items() if k.startswith("vectors.")}


class Tokens(_Injected):
    kind = "tokens"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.candidates = {name: slots.vocabulary(tokenizer, table, exclude=self._concept_ids(tokenizer))
                           for name, (tokenizer, table) in self.encoders.items()}

    def init(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        for name, (_, table) in self.encoders.items():
            cands = self.candidates[name]
            pick = cands[torch.randint(len(cands), (self.placeholder.k,), generator=generator)]
            out[name] = table[pick].float().clone()  # [k, d]
        return out

    def ids(self, leaves: dict) -> dict[str, torch.Tensor]:
        return {name: slots.nearest(v.detach(), self.encoders[name][1], self.candidates[name])
                for name, v in leaves.items()}

    def vectors(self, leaves: dict) -> dict:
        """The projected tokens' vectors in the forward, the gradient straight through to `leaves`."""
        out = {}
        for name, ids in self.ids(leaves).items():
            z = leaves[name]
            rows = self.encoders[name][1][ids.to(self.encoders[name][1].device)].to(z.device, z.dtype)
            out[name] = z + (rows - z).detach()
        return out

    def artifact(self, leaves: dict) -> tuple[dict, dict]:
        ids = self.ids(leaves)
        tensors, texts, exact = {}, {}, {}
        for name, chosen in ids.items():
            tokenizer, table = self.encoders[name]
            tensors[f"ids.{name}"] = chosen.to(torch.int64).cpu()
            tensors[f"vectors.{name}"] = table[chosen.to(table.device)].detach().cpu().contiguous()
            texts[name] = slots.decode(tokenizer, chosen.tolist())
            exact[name] = tokenizer(texts[name], add_special_tokens=False)["input_ids"] == chosen.tolist()
        meta = {"placeholder": self.placeholder.to_dict(), "placement": self.placement, "tokens": texts,
                "retokenizes": exact}
        return tensors, meta

    values = staticmethod(Inversion.values)

    def adversarial_prompts(self, prompts: list[str], meta: dict) -> dict[str, list[str]]:
        """Per text encoder, the prompts as text with the chosen tokens in place (what a user would type;
        exact where ``meta["retokenizes"]`` says the tokenizer reads them back as the same ids)."""
        return {name: slots.slotted(prompts, self.concept, self.placement, words)
                for name, words in meta["tokens"].items()}


class Conditioning:
    """Additive changes of the text states at the concept's positions (and of the pooled vector)."""

    kind = "conditioning"

    def __init__(self, adapter, kw: dict, concept: str, prompts: list[str]):
        self.adapter, self.kw, self.concept = adapter, kw, concept
        self._positions: dict[str, list[int]] = {}
        self._encoded: dict[str, dict] = {}
        self.positions(prompts)  # every prompt must hold the concept the same number of times

    def positions(self, prompts: list[str]) -> torch.Tensor:
        """[P, m]: the concept's positions in the text sequence the transformer reads, per prompt."""
        for p in prompts:
            if p not in self._positions:
                self._positions[p] = list(self.adapter.concept_span(p, self.concept, self.kw).positions)
        counts = {len(self._positions[p]) for p in prompts}
        if len(counts) != 1:
            raise DitlocError(f"the prompts hold the concept {self.concept!r} at different numbers of text positions "
                              f"({sorted(counts)}); give prompts that hold it once")
        return torch.tensor([self._positions[p] for p in prompts])

    @torch.no_grad()
    def encoded(self, prompts: list[str]) -> dict:
        """The prompts' own conditioning (no gradient; each prompt encoded once)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._encoded]
        if todo:
            text = self.adapter.encode_text(todo, self.kw)
            for i, p in enumerate(todo):
                self._encoded[p] = {k: v[i : i + 1].detach() for k, v in text.items()}
        return {k: torch.cat([self._encoded[p][k] for p in prompts]) for k in self._encoded[prompts[0]]}

    def init(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        some = next(iter(self._positions))
        base = self.encoded([some])
        m = len(self._positions[some])
        out = {"states": torch.zeros(m, base["embeds"].shape[-1])}  # [m, D]
        if "pooled" in base:
            out["pooled"] = torch.zeros(base["pooled"].shape[-1])  # [D_pooled]
        return out

    def lrs(self, lr: float) -> dict[str, float]:
        prompts = list(self._positions)
        base = self.encoded(prompts)
        embeds = base["embeds"]
        if base.get("mask") is not None:  # the states the model reads, not the padding
            embeds = embeds[base["mask"].bool()]
        out = {"states": lr * _rms(embeds)}
        if "pooled" in base:
            out["pooled"] = lr * _rms(base["pooled"])
        return out

    def apply(self, text: dict, positions: torch.Tensor, values: dict) -> dict:
        """`text` with the changes added at `positions` [B, m] of each row."""
        embeds = text["embeds"]  # [B, L, D]
        b, m = positions.shape
        rows = torch.arange(b, device=embeds.device).repeat_interleave(m)  # [B*m]
        cols = positions.reshape(-1).to(embeds.device)
        delta = values["states"].to(embeds.device, embeds.dtype).repeat(b, 1)  # [B*m, D]
        out = dict(text, embeds=embeds.index_put((rows, cols), embeds[rows, cols] + delta))
        if "pooled" in values:
            out["pooled"] = text["pooled"] + values["pooled"].to(text["pooled"].device, text["pooled"].dtype)
        return out

    def text(self, leaves: dict, prompts: list[str]) -> dict:
        return self.apply(self.encoded(prompts), self.positions(prompts), leaves)

    def call(self, prompts: list[str], values: dict):
        text = self.apply(self.encoded(prompts), self.positions(prompts), values)
        return contextlib.nullcontext(), self.adapter.prompt_embeds_kwargs(text)

    def artifact(self, leaves: dict) -> tuple[dict, dict]:
        tensors = {k: v.detach().cpu().contiguous() for k, v in leaves.items()}
        return tensors, {"positions_per_prompt": int(tensors["states"].shape[0]),
                         "state_change_rms": _rms(tensors["states"])}

    @staticmethod
    def values(tensors: dict) -> dict:
        return {k: v for k, v in tensors.items() if k in ("states", "pooled")}
