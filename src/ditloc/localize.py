"""Localize: rank a DiT's blocks by how much a concept's text tokens contribute
to the image tokens (method.md §1), measured on the ordinary sampling trajectory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import write_json
from ._version import __version__
from ._run import chunks, effective, generators, model_record, prepare
from .errors import DitlocError
from .hooks import instrument
from .processors import VARIANTS, Probe, RunState
from .tokens import ConceptSpan


@dataclass(frozen=True)
class Localization:
    """Block scores for one concept.

    `per_sample_step` [blocks, steps, samples] holds every measured value C(b, t, p)
    (samples are prompt x seed, prompt-major); `per_head_step` [blocks, steps,
    samples, heads] the per-head breakdown. Everything else is a mean of these.
    """

    concept: str
    blocks: tuple[str, ...]
    per_sample_step: torch.Tensor  # [blocks, steps, samples]
    per_head_step: torch.Tensor  # [blocks, steps, samples, heads]
    spans: tuple[ConceptSpan, ...]  # one per prompt
    settings: dict = field(default_factory=dict)

    @property
    def scores(self) -> torch.Tensor:
        """[blocks] mean over steps and samples."""
        return self.per_sample_step.mean(dim=(1, 2))

    @property
    def per_step(self) -> torch.Tensor:
        """[blocks, steps] mean over samples."""
        return self.per_sample_step.mean(dim=2)

    @property
    def per_sample(self) -> torch.Tensor:
        """[blocks, samples] mean over steps."""
        return self.per_sample_step.mean(dim=1)

    @property
    def per_head(self) -> torch.Tensor:
        """[blocks, heads] mean over steps and samples."""
        return self.per_head_step.mean(dim=(1, 2))

    @property
    def ranking(self) -> list[str]:
        """Block names, highest score first (ties keep model order)."""
        order = torch.argsort(-self.scores, stable=True).tolist()
        return [self.blocks[i] for i in order]

    def top(self, k: int) -> list[str]:
        """The k highest-scoring blocks, best first."""
        if not isinstance(k, int) or k <= 0 or k > len(self.blocks):
            raise DitlocError(f"k must be between 1 and {len(self.blocks)} (the number of blocks), got {k}")
        return self.ranking[:k]

    def to_dict(self) -> dict:
        return {
            "format": "ditloc.localization/1",
            "ditloc_version": __version__,
            "concept": self.concept,
            "blocks": list(self.blocks),
            "scores": self.scores.tolist(),
            "ranking": self.ranking,
            "per_step": self.per_step.tolist(),
            "per_head": self.per_head.tolist(),
            "per_sample_step": self.per_sample_step.tolist(),
            "per_head_step": self.per_head_step.tolist(),
            "spans": [s.to_dict() for s in self.spans],
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Localization":
        try:
            return cls(
                concept=d["concept"],
                blocks=tuple(d["blocks"]),
                per_sample_step=torch.tensor(d["per_sample_step"], dtype=torch.float32),
                per_head_step=torch.tensor(d["per_head_step"], dtype=torch.float32),
                spans=tuple(ConceptSpan.from_dict(s) for s in d["spans"]),
                settings=d.get("settings", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DitlocError(f"not a ditloc localization file (missing or bad field: {e})") from None

    def save(self, path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "Localization":
        path = Path(path)
        if not path.is_file():
            raise DitlocError(f"localization file {str(path)!r} does not exist; run `ditloc localize` first")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DitlocError(f"cannot read localization file {str(path)!r}: {e}") from None
        return cls.from_dict(d)


def _padded_positions(spans: list[ConceptSpan]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s.positions) for s in spans)
    pos = torch.zeros(len(spans), width, dtype=torch.long)
    valid = torch.zeros(len(spans), width, dtype=torch.bool)
    for i, s in enumerate(spans):
        pos[i, : len(s.positions)] = torch.tensor(s.positions)
        valid[i, : len(s.positions)] = True
    return pos, valid


@torch.no_grad()
def localize(
    pipe,
    prompts,
    concept: str,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float | None = None,
    seed=0,
    max_sequence_length: int | None = None,
    variant: str = "attn_value_out",
    out_bias: bool = False,
    batch_size: int | None = 8,
    generator_device="cpu",
    adapter_options: dict | None = None,
    progress=None,
    **pipeline_kwargs,
) -> Localization:
    """Score every block by the concept's attention contribution (method.md §1).

    The trajectory of each (prompt, seed) is exactly the one
    ``pipe(prompt, num_inference_steps=N, guidance_scale=G,
    generator=torch.Generator(generator_device).manual_seed(seed), max_sequence_length=L)``
    samples; ``None`` means the pipeline's own default. Extra keyword arguments
    go to the pipeline call. Only the conditional half of a CFG batch is measured.
    """
    if variant not in VARIANTS:
        raise DitlocError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    adapter, prompts, seeds, kw = prepare(
        pipe, prompts, seed, adapter_options=adapter_options, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, max_sequence_length=max_sequence_length, pipeline_kwargs=pipeline_kwargs,
    )
    spans = [adapter.concept_span(p, concept, kw) for p in prompts]  # validates before any compute
    samples = [(i, s) for i in range(len(prompts)) for s in seeds]
    state = RunState(adapter=adapter)
    totals, heads = [], []
    done = 0
    with instrument(adapter, state):
        for chunk in chunks(samples, batch_size):
            pos, valid = _padded_positions([spans[i] for i, _ in chunk])
            state.probe = Probe(variant=variant, out_bias=out_bias, positions=pos, valid=valid)
            state.begin_call(len(chunk))
            pipe(
                prompt=[prompts[i] for i, _ in chunk],
                generator=generators([s for _, s in chunk], generator_device),
                output_type="latent",
                **kw,
            )
            records = state.probe.records
            n_blocks, n_steps = len(adapter.block_names()), state.step + 1
            missing = [(b, t) for b in range(n_blocks) for t in range(n_steps) if (b, t) not in records]
            if missing:
                raise RuntimeError(f"no measurement for (block, step) {missing[0]}; is the text attention bypassed?")
            totals.append(
                torch.stack([torch.stack([records[(b, t)][0] for t in range(n_steps)]) for b in range(n_blocks)]).cpu()
            )  # [blocks, steps, n]
            heads.append(
                torch.stack([torch.stack([records[(b, t)][1] for t in range(n_steps)]) for b in range(n_blocks)]).cpu()
            )  # [blocks, steps, n, H]
            done += len(chunk)
            if progress is not None:
                progress(done, len(samples))
    state.probe = None
    settings = {
        "model": model_record(pipe),
        "family": adapter.family,
        "adapter_options": dict(adapter_options or {}),
        "prompts": prompts,
        "seeds": seeds,
        "num_inference_steps": int(num_inference_steps),
        "guidance_scale": effective(adapter, kw, "guidance_scale"),
        "max_sequence_length": effective(adapter, kw, "max_sequence_length"),
        "variant": variant,
        "out_bias": bool(out_bias),
        "generator_device": str(generator_device),
        "pipeline_kwargs": {k: v for k, v in kw.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    return Localization(
        concept=concept,
        blocks=tuple(adapter.block_names()),
        per_sample_step=torch.cat(totals, dim=2).float(),
        per_head_step=torch.cat(heads, dim=2).float(),
        spans=tuple(spans),
        settings=settings,
    )
