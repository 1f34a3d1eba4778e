"""What an attack measured: one `Cell` per (model, condition), and the `AttackResult` that
holds them with everything needed to read and repeat it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..stats import mean_ci, wilson

#: the conditions of a table row: the plain prompt, and the attack
CONDITIONS = ("plain", "attack")


@dataclass(frozen=True)
class Cell:
    """The generations of one condition on one model, and the evaluator's score of each.

    `model`: ``unedited``, ``edited`` or ``given`` (the pipeline as passed, without an edit
    folder); `condition`: ``plain`` (the concept's own word in the held-out prompts) or
    ``attack``; `prompts`/`seeds`: per image (what a replay regenerates); `scores` [n]: the
    evaluator's presence score of each image; an image shows the concept when its score reaches
    `threshold`. `presence` is that share, with its 95% Wilson interval."""

    model: str
    condition: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    scores: tuple[float, ...]
    threshold: float
    wall_seconds: float = 0.0

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def present(self) -> int:
        return int((np.asarray(self.scores) >= self.threshold).sum())

    @property
    def presence(self) -> float:
        return self.present / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.present, self.n)

    @property
    def mean_score(self) -> tuple[float, float, float]:
        """(mean, low, high): the mean score with its 95% normal interval."""
        return mean_ci(self.scores)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        mean, mlo, mhi = self.mean_score
        return {"model": self.model, "condition": self.condition, "n": self.n, "presence": self.presence,
                "interval": [lo, hi], "mean_score": mean, "mean_score_interval": [mlo, mhi],
                "threshold": self.threshold, "wall_seconds": self.wall_seconds, "prompts": list(self.prompts),
                "seeds": list(self.seeds), "scores": list(self.scores)}

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(d["model"], d["condition"], tuple(d["prompts"]), tuple(int(s) for s in d["seeds"]),
                   tuple(float(s) for s in d["scores"]), float(d["threshold"]), float(d.get("wall_seconds", 0.0)))


@dataclass(frozen=True)
class AttackResult:
    """An attack on one concept: its cells (per model, the plain prompt and the attack), the
    adversarial artifact per model (``OUT/<model>/adversarial.safetensors``), the budget, and
    the settings (model, edit, evaluator, sampling, seeds) that make it repeatable."""

    kind: str
    concept: str
    cells: tuple[Cell, ...]
    budget: dict
    settings: dict
    artifacts: dict = field(default_factory=dict)  # model -> {file, details}
    optimization: dict = field(default_factory=dict)  # model -> {steps, losses, wall_seconds}
    out_dir: str | None = None

    def cell(self, model: str, condition: str) -> Cell:
        for c in self.cells:
            if c.model == model and c.condition == condition:
                return c
        raise KeyError(f"no cell for {model} / {condition}")

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(c.model for c in self.cells))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "concept": self.concept, "budget": dict(self.budget),
                "settings": self.settings, "cells": [c.to_dict() for c in self.cells],
                "artifacts": self.artifacts, "optimization": self.optimization, "out_dir": self.out_dir}

    @classmethod
    def from_dict(cls, d: dict) -> "AttackResult":
        return cls(d["kind"], d["concept"], tuple(Cell.from_dict(c) for c in d["cells"]), d["budget"], d["settings"],
                   d.get("artifacts", {}), d.get("optimization", {}), d.get("out_dir"))

    def table(self) -> str:
        """A markdown table: per model, presence under the plain prompt and under the attack."""
        rows = ["| model | plain prompt | attack | n | optimization s |", "|---|---|---|---|---|"]
        for m in self.models:
            plain, hit = self.cell(m, "plain"), self.cell(m, "attack")
            wall = self.optimization.get(m, {}).get("wall_seconds")
            rows.append(f"| {m} | {fmt(plain)} | {fmt(hit)} | {hit.n} | {'' if wall is None else f'{wall:.1f}'} |")
        return "\n".join(rows)


def fmt(cell: Cell) -> str:
    """``0.953 [0.87, 0.98]``: presence and its 95% interval."""
    lo, hi = cell.interval
    return f"{cell.presence:.3f} [{lo:.2f}, {hi:.2f}]"
