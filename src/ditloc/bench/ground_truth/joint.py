"""Joint attention in the ground truth: the pooled text vector and the two block streams.

A joint-attention model (FLUX, SD3) reads the prompt twice: its text tokens in the
joint sequence of every block, and a pooled text vector that reaches every block
through the modulation. Withholding a concept from a set of blocks gives those
blocks the clean prompt's tokens and, by default, gives *every* block the clean
prompt's pooled vector (`pooled=None` in `ditloc.generate`). For such models the
ground truth also measures, per concept (each condition `n_images` held-out images):

    pooled only         no block withheld, every block given the clean pooled vector
    <set>, text only    the set's text tokens withheld, the pooled vector left full
                        (best single block, best pair, greedy 4, each stream, all blocks)
    <stream>            every block of one stream withheld (e.g. all double.*, all single.*),
                        with the clean pooled vector and text only
    all blocks          with the clean pooled vector: exactly the clean prompt's image

Stored in ``joint.jsonl``: one line per (concept, blocks, pooled), with every
image's score, so a rerun resumes. The pooled vector's share of an erasure is
the paired difference presence(text only) - presence(default) over the same
images (prompts and seeds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DitlocError
from ...stats import mean_ci
from ..store import ResultStore
from .metrics import OracleResult, _in_order

JOINT_FILE = "joint.jsonl"
CLEAN, FULL = "clean", "full"


@dataclass(frozen=True)
class JointCondition:
    """One measured condition: `blocks` withheld, the pooled vector from the clean or
    full prompt. `label` names it in the tables."""

    label: str
    blocks: frozenset
    pooled: str  # CLEAN or FULL

    @property
    def key(self) -> tuple[frozenset, str]:
        return self.blocks, self.pooled


def streams(blocks: Sequence[str]) -> dict[str, list[str]]:
    """The blocks grouped by the name before the first dot (FLUX: double, single), in
    model order; empty when the model has one kind of block."""
    groups: dict[str, list[str]] = {}
    for b in blocks:
        groups.setdefault(b.split(".")[0], []).append(b)
    return groups if len(groups) > 1 else {}


def joint_conditions(blocks: Sequence[str], oracle: OracleResult) -> list[JointCondition]:
    """The extra conditions of one concept, given its search result (best sets), each
    with its label; labels may share a (blocks, pooled) key."""
    every = frozenset(blocks)
    out = [JointCondition("pooled only", frozenset(), CLEAN)]
    named = [("best block", oracle.greedy[0] if oracle.greedy else ()),
             ("best pair", oracle.best_pair or ()),
             ("greedy 4", oracle.greedy[-1] if oracle.greedy else ())]
    for label, s in named:
        if s:
            out.append(JointCondition(f"{label}, text only", frozenset(s), FULL))
    for name, group in streams(blocks).items():
        out += [JointCondition(f"all {name}", frozenset(group), CLEAN),
                JointCondition(f"all {name}, text only", frozenset(group), FULL)]
    out += [JointCondition("all blocks", every, CLEAN), JointCondition("all blocks, text only", every, FULL)]
    return out  # two labels may name one set (greedy 4 = all blocks): it is measured once


def read_joint(out) -> dict[tuple[str, str], dict[tuple[frozenset, str], list[float]]]:
    """Every measured joint condition: (category, concept) -> (blocks, pooled) -> per-image scores."""
    path = Path(out) / JOINT_FILE
    found: dict[tuple[str, str], dict[tuple[frozenset, str], list[float]]] = {}
    for n, r in enumerate(ResultStore.read(path), 1):
        try:
            if r["pooled"] not in (CLEAN, FULL):
                raise ValueError
            key = (frozenset(r["blocks"]), r["pooled"])
            found.setdefault((r["category"], r["concept"]), {}).setdefault(key, [float(s) for s in r["scores"]])
        except (KeyError, TypeError, ValueError):
            raise DitlocError(f"{path}:{n}: not a joint-condition record; move the file away and rerun the same "
                              "command to recompute") from None
    return found


def _ci(values) -> dict:
    mean, low, high = mean_ci(values)
    return {"mean": mean, "low": low, "high": high, "n": len(list(values))}


def joint_summary(blocks: Sequence[str], oracle: OracleResult, baseline: Sequence[float],
                  measured: Mapping[frozenset, Sequence[float]],
                  joint: Mapping[tuple[frozenset, str], Sequence[float]]) -> dict | None:
    """One concept's joint-attention results (None while any condition is missing):
    each condition's presence and drop (95% CI over images), and for every set
    measured both ways the pooled vector's share: presence(text only) - presence(default),
    paired over the same images."""
    def scores_of(key: tuple[frozenset, str]):
        found = joint.get(key)
        if found is None and key[1] == CLEAN and key[0]:  # the ordinary condition (conditions.jsonl)
            found = measured.get(key[0])
        return found

    conditions = joint_conditions(blocks, oracle)
    if any(scores_of(c.key) is None for c in conditions):
        return None
    base = np.asarray(baseline, dtype=np.float64)
    rows = []
    for c in conditions:
        scores = np.asarray(scores_of(c.key), dtype=np.float64)
        row = {"label": c.label, "blocks": _in_order(c.blocks, blocks), "pooled": c.pooled,
               "presence": _ci(scores), "drop": _ci(base - scores)}
        if c.pooled == FULL:
            default = scores_of((c.blocks, CLEAN))
            if default is not None:
                row["pooled_share"] = _ci(scores - np.asarray(default, dtype=np.float64))
        rows.append(row)
    by_stream = {}
    for name, group in streams(blocks).items():
        drops = [d for b, d in zip(oracle.blocks, oracle.single_drops) if b in group]
        withheld = np.asarray(scores_of((frozenset(group), CLEAN)), dtype=np.float64)
        by_stream[name] = {"blocks": len(group), "all_withheld_drop": _ci(base - withheld),
                           "mean_single_drop": float(np.mean(drops)), "max_single_drop": float(np.max(drops))}
    best = oracle.best_singles[0] if oracle.best_singles else None
    return {"conditions": rows, "streams": by_stream,
            "best_block_stream": best.split(".")[0] if best and by_stream else None}
