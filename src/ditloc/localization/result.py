"""The one result type every caller of localization reads: `Localization`, block
scores of one concept and, for the set-level search, the searched
block sets and their presence curve (`SetSearch`).

A block a localization did not measure (a search that pruned its candidates scores
only those) holds NaN, never 0: 0 means "measured, no effect". JSON has no NaN, so a
saved file holds null there, read back as NaN (`nan_to_none`, `none_to_nan`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import write_json
from .._version import __version__
from ..errors import DitlocError
from ..tokens import ConceptSpan

#: automatic K (`Localization.k_auto`): the smallest K whose blocks, withheld, lower the concept's presence
#: by at least this fraction of its baseline (the ground truth's own definition of the oracle's minimal K:
#: presence at most half); without a measured curve, the smallest top K holding this fraction of the
#: positive score mass (`score_mass_k`)
AUTO_K_DROP = 0.5


@dataclass(frozen=True)
class SetSearch:
    """What a set-level search found.

    `sets[K-1]`: the K-block set with the largest presence drop the search found, blocks in
    the order they entered; `presence[K-1]`: its mean presence, `baseline` the unedited one
    (both in the objective's units: an evaluator's soft score, or the model's own judgement
    scaled so unedited images read 1 and the clean prompt's 0); `evaluated`: every block set
    scored, as (blocks, presence); `cost`: generations (one per set and image batch, at
    `settings["search_steps"]` steps) and seconds.
    """

    objective: str
    baseline: float
    sets: tuple[tuple[str, ...], ...]
    presence: tuple[float, ...]
    evaluated: tuple[tuple[tuple[str, ...], float], ...] = ()
    cost: dict = field(default_factory=dict)

    @property
    def curve(self) -> list[float]:
        """Presence drop of S_K for K = 1..max_k (baseline - presence)."""
        return [self.baseline - p for p in self.presence]

    @property
    def relative_curve(self) -> list[float]:
        """The drop as a fraction of the baseline (0 when the baseline is not positive)."""
        return [d / self.baseline if self.baseline > 0 else 0.0 for d in self.curve]

    @property
    def max_k(self) -> int:
        return len(self.sets)

    def k_for_drop(self, drop: float = AUTO_K_DROP) -> int | None:
        """The smallest K whose set lowers presence by at least `drop` x the baseline (a relative
        drop: 0.5 halves it, 0.9 removes 90%); None: no K up to max_k does."""
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 < drop <= 1:
            raise DitlocError(f"the drop must be a fraction of the baseline in (0, 1], got {drop!r}")
        for k, r in enumerate(self.relative_curve, start=1):
            if r >= drop - 1e-12:
                return k
        return None

    def to_dict(self) -> dict:
        return {
            "objective": self.objective,
            "baseline": self.baseline,
            "sets": [list(s) for s in self.sets],
            "presence": list(self.presence),
            "curve": self.curve,
            "relative_curve": self.relative_curve,
            "auto_k": self.k_for_drop(AUTO_K_DROP),  # None: no K up to max_k halves presence
            "evaluated": [[list(s), p] for s, p in self.evaluated],
            "cost": self.cost,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SetSearch":
        return cls(objective=d["objective"], baseline=float(d["baseline"]),
                   sets=tuple(tuple(s) for s in d["sets"]), presence=tuple(float(p) for p in d["presence"]),
                   evaluated=tuple((tuple(s), float(p)) for s, p in d.get("evaluated", [])),
                   cost=dict(d.get("cost", {})))


def nan_to_none(values):
    """`values` (a nested list of floats) with every NaN as None: what JSON can hold for "not measured"."""
    if isinstance(values, (list, tuple)):
        return [nan_to_none(v) for v in values]
    return None if values is None or math.isnan(values) else values


def none_to_nan(values):
    """`nan_to_none` undone: None (JSON null) read back as NaN."""
    if isinstance(values, (list, tuple)):
        return [none_to_nan(v) for v in values]
    return math.nan if values is None else values


def ranking_of(blocks, scores) -> list[str]:
    """`blocks` by score, highest first, ties in the given order; blocks of NaN score (not
    measured) after every measured one, in the given order."""
    values = [math.nan if v is None else float(v) for v in scores]
    # sorted is stable: ties keep the given order
    order = sorted(range(len(values)), key=lambda i: (True, 0.0) if math.isnan(values[i]) else (False, -values[i]))
    return [blocks[i] for i in order]


def score_mass_k(scores, fraction: float = AUTO_K_DROP) -> int:
    """The smallest K whose top-K blocks hold `fraction` of the positive mass of block scores
    [blocks] (a tensor or a sequence); blocks with negative scores (withholding them strengthens
    the concept) and blocks not measured (NaN or None) hold none. 1 when no score is positive."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise DitlocError(f"fraction must be in (0, 1], got {fraction!r}")
    if not torch.is_tensor(scores):
        scores = none_to_nan(list(scores))
    scores = torch.nan_to_num(torch.as_tensor(scores, dtype=torch.float64), nan=0.0)  # unmeasured: no mass
    positive = torch.sort(scores.clamp_min(0), descending=True, stable=True).values
    total = float(positive.sum())
    if total <= 0:
        return 1
    reached = (torch.cumsum(positive, 0) >= fraction * total - 1e-12 * total).nonzero()
    return int(reached[0]) + 1


def unmeasured_blocks(settings: dict, blocks) -> set[str]:
    """The blocks a localization with these settings did not score: a search's scores are
    the single-block drops of its candidates (the others unmeasured), or its attribution
    at the baseline (every block measured), or nothing (`settings["scores"]` None)."""
    if settings.get("method") != "search" or "scores" not in settings:
        return set()
    how = settings["scores"]
    if how is None:
        return set(blocks)
    if isinstance(how, str) and how.startswith("single-block"):
        return set(blocks) - set(settings.get("candidates") or blocks)
    return set()


@dataclass(frozen=True)
class Localization:
    """Block scores for one concept.

    `per_sample_step` [blocks, steps, samples] holds every measured value (the
    contribution C(b, t, p) or the causal effect E(b, t, p); samples are prompt x
    seed, prompt-major); `per_head_step` [blocks, steps, samples, heads] the
    per-head breakdown (contribution only; zero heads otherwise). Everything else
    is a mean of these. `settings["method"]` says which method measured them. A
    block the method did not measure (a search's block outside its candidates) is
    NaN throughout (`measured` is False), never 0.
    """

    concept: str
    blocks: tuple[str, ...]
    per_sample_step: torch.Tensor  # [blocks, steps, samples]
    per_head_step: torch.Tensor  # [blocks, steps, samples, heads]
    spans: tuple[ConceptSpan, ...]  # one per prompt
    settings: dict = field(default_factory=dict)
    search: SetSearch | None = None  # method "search": the searched sets and their curve

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
    def measured(self) -> torch.Tensor:
        """[blocks] bool: False where the block was not measured (its scores NaN)."""
        return ~torch.isnan(self.scores)

    @property
    def ranking(self) -> list[str]:
        """Block names, highest score first (ties keep model order); blocks not measured
        come after every measured one, in model order."""
        return ranking_of(self.blocks, self.scores.tolist())

    @property
    def method(self) -> str:
        return self.settings.get("method", "contribution")

    def top(self, k: int) -> list[str]:
        """The k blocks to act on: for a set-level search the searched k-set (beyond its
        max_k, the largest set then the ranking's next blocks), else the k highest-scoring.
        A block that was not measured (NaN score) is never picked before a measured one:
        the ranking puts every unmeasured block last."""
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0 or k > len(self.blocks):
            raise DitlocError(f"k must be between 1 and {len(self.blocks)} (the number of blocks), got {k}")
        if self.search is not None:
            if k <= self.search.max_k:
                return list(self.search.sets[k - 1])
            chosen = list(self.search.sets[-1])
            return chosen + [b for b in self.ranking if b not in chosen][: k - len(chosen)]
        return self.ranking[:k]

    def k_auto(self) -> int:
        """The K that ``--k auto`` acts on: the smallest K whose blocks, withheld, halve the
        concept's presence. A set-level search measured that: its curve's first K whose
        relative drop reaches AUTO_K_DROP (`SetSearch.k_for_drop`), or its largest set where
        none does. Block scores measure no presence: the smallest top K holding half the
        positive score mass (`score_mass_k`)."""
        if self.search is not None:
            return self.search.k_for_drop(AUTO_K_DROP) or self.search.max_k
        return score_mass_k(self.scores, AUTO_K_DROP)

    def to_dict(self) -> dict:
        return {
            "format": "ditloc.localization/1",
            "ditloc_version": __version__,
            "concept": self.concept,
            "blocks": list(self.blocks),
            "scores": nan_to_none(self.scores.tolist()),  # null: not measured
            "ranking": self.ranking,
            "per_step": nan_to_none(self.per_step.tolist()),
            "per_head": nan_to_none(self.per_head.tolist()),
            "per_sample_step": nan_to_none(self.per_sample_step.tolist()),
            "per_head_step": nan_to_none(self.per_head_step.tolist()),
            "spans": [s.to_dict() for s in self.spans],
            "settings": self.settings,
            "search": None if self.search is None else self.search.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Localization":
        try:
            blocks = tuple(d["blocks"])
            settings = d.get("settings", {})
            per_sample_step = torch.tensor(none_to_nan(d["per_sample_step"]), dtype=torch.float32)
            per_head_step = torch.tensor(none_to_nan(d["per_head_step"]), dtype=torch.float32)
            unmeasured = [i for i, b in enumerate(blocks) if b in unmeasured_blocks(settings, blocks)]
            if unmeasured:  # files written before unmeasured blocks were NaN hold 0 there
                per_sample_step[unmeasured] = math.nan
                per_head_step[unmeasured] = math.nan
            return cls(
                concept=d["concept"],
                blocks=blocks,
                per_sample_step=per_sample_step,
                per_head_step=per_head_step,
                spans=tuple(ConceptSpan.from_dict(s) for s in d["spans"]),
                settings=_current_settings(settings),
                search=None if d.get("search") is None else SetSearch.from_dict(d["search"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
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


def _current_settings(settings: dict) -> dict:
    """A saved localization's settings in today's names (files written before the rename read the same)."""
    settings = dict(settings)
    if "variant" in settings and "contribution_terms" not in settings:
        settings["contribution_terms"] = settings.pop("variant")
    return settings
