"""Localize: rank a DiT's blocks for a concept, measured on the ordinary sampling
trajectory, by one of three methods:

- ``contribution`` (method.md §1): how much the concept's text tokens contribute
  to the image tokens' attention output (where the concept is *read*);
- ``patch`` (§7): how far withholding the concept from the block alone moves the
  model's prediction toward the clean prompt's (where reading it *matters*);
- ``attribution`` (§7): a first-order estimate of ``patch`` for every block from
  one backward pass per step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import write_json
from ._version import __version__
from .engine import CAUSAL_METHODS, METHODS, VARIANTS, CausalProbe, Probe, Session, instrument
from .errors import DitlocError
from .options import RunOptions, as_prompt_list, as_seed_list, chunks, model_record
from .tokens import ConceptSpan


def minimal_k_of(scores, fraction: float = 0.5) -> int:
    """`Localization.minimal_k` of block scores [blocks] (a tensor or a sequence)."""
    if not 0 < fraction <= 1:
        raise DitlocError(f"fraction must be in (0, 1], got {fraction}")
    scores = torch.as_tensor(scores, dtype=torch.float64)
    positive = torch.sort(scores.clamp_min(0), descending=True, stable=True).values
    total = float(positive.sum())
    if total <= 0:
        return 1
    reached = (torch.cumsum(positive, 0) >= fraction * total - 1e-12 * total).nonzero()
    return int(reached[0]) + 1


@dataclass(frozen=True)
class Localization:
    """Block scores for one concept.

    `per_sample_step` [blocks, steps, samples] holds every measured value (the
    contribution C(b, t, p) or the causal effect E(b, t, p); samples are prompt x
    seed, prompt-major); `per_head_step` [blocks, steps, samples, heads] the
    per-head breakdown (contribution only; zero heads otherwise). Everything else
    is a mean of these. `settings["method"]` says which method measured them.
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

    @property
    def method(self) -> str:
        return self.settings.get("method", "contribution")

    def minimal_k(self, fraction: float = 0.5) -> int:
        """Automatic K from the scores alone (no oracle, no evaluator): the smallest K
        whose top-K blocks hold `fraction` of the positive score mass. Blocks with
        negative scores (withholding them strengthens the concept) hold none."""
        return minimal_k_of(self.scores, fraction)

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


@torch.no_grad()
def localize(
    pipe,
    prompts,
    concept: str,
    *,
    method: str = "contribution",
    clean_prompts=None,
    seed=0,
    variant: str = "attn_value_out",
    out_bias: bool = False,
    batch_size: int | None = 8,
    block_batch: int | None = None,
    options: RunOptions | None = None,
    progress=None,
    **run,
) -> Localization:
    """Score every block for `concept` (method.md §1, §7).

    The trajectory of each (prompt, seed) is exactly the one
    ``pipe(prompt, num_inference_steps=N, guidance_scale=G,
    generator=torch.Generator(generator_device).manual_seed(seed), max_sequence_length=L)``
    samples. `options` (:class:`~ditloc.options.RunOptions`) says how the pipeline
    is called; keyword arguments override its fields (``num_inference_steps``,
    ``guidance_scale``, ...) or are passed to the pipeline.

    `method`: ``contribution`` (default; `variant`, `out_bias` choose its form),
    ``patch`` or ``attribution``. The causal methods compare with `clean_prompts`
    (one per prompt; default: the prompt with the concept removed). Cost per
    denoising step, in conditional-row forwards: contribution none extra; patch
    1 + blocks (batched `block_batch` blocks per forward); attribution 2 forwards
    and one backward. Only the conditional half of a CFG batch is measured.
    """
    if method not in METHODS:
        raise DitlocError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if variant not in VARIANTS:
        raise DitlocError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if block_batch is not None and (not isinstance(block_batch, int) or block_batch < 1):
        raise DitlocError(f"block_batch must be a positive integer, got {block_batch!r}")
    opts = RunOptions.of(options, **run)
    prompts, seeds = as_prompt_list(prompts), as_seed_list(seed)
    resolved = opts.resolve(pipe)
    adapter, kw = resolved.adapter, resolved.call_kwargs
    spans = [adapter.concept_span(p, concept, kw) for p in prompts]  # validates before any compute
    causal = method in CAUSAL_METHODS
    clean: list[str] | None = None
    if causal:
        from .intervene import clean_prompt_list

        clean = clean_prompt_list(prompts, concept, clean_prompts)
    samples = [(i, s) for i in range(len(prompts)) for s in seeds]
    n_blocks = len(adapter.block_names())
    session = Session()
    totals, heads = [], []
    done = 0
    with instrument(adapter, session):
        for chunk in chunks(samples, batch_size):
            call = dict(prompt=[prompts[i] for i, _ in chunk], generator=resolved.generators([s for _, s in chunk]),
                        output_type="latent", **kw)
            if causal:
                text = adapter.encode_text([clean[i] for i, _ in chunk], kw)
                measure = CausalProbe(adapter, session, method, text, block_batch)
                session.begin_call(len(chunk))
                with measure.installed():
                    pipe(**call)
                total = measure.stacked(n_blocks, session.forwards)  # [blocks, steps, n]
                per_head = total.new_zeros(*total.shape, 0)
            else:
                probe = Probe.for_spans([spans[i] for i, _ in chunk], variant, out_bias).to(pipe._execution_device)
                session.begin_call(len(chunk), probe=probe)
                pipe(**call)
                total, per_head = probe.stacked(n_blocks, session.forwards)  # [blocks, steps, n], [.., H]
            totals.append(total)
            heads.append(per_head)
            done += len(chunk)
            if progress is not None:
                progress(done, len(samples))
    record = resolved.record()
    settings = {
        "method": method,
        "model": model_record(pipe),
        "family": adapter.family,
        "adapter_options": record["adapter_options"],
        "prompts": prompts,
        "seeds": seeds,
        "num_inference_steps": record["num_inference_steps"],
        "guidance_scale": record["guidance_scale"],
        "max_sequence_length": record["max_sequence_length"],
        "generator_device": record["generator_device"],
        "pipeline_kwargs": record["pipeline_kwargs"],
    }
    if causal:
        settings["clean_prompts"] = clean
    else:
        settings["variant"] = variant
        settings["out_bias"] = bool(out_bias)
    return Localization(
        concept=concept,
        blocks=tuple(adapter.block_names()),
        per_sample_step=torch.cat(totals, dim=2).float(),
        per_head_step=torch.cat(heads, dim=2).float(),
        spans=tuple(spans),
        settings=settings,
    )
