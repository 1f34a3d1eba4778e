"""Ground-truth settings, the plan of concepts, and the run directory's record."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DitlocError
from ..plan import BenchSettings, ConceptPlan, plan_bench, slugify

FORMAT = "ditloc.ground_truth/1"
SETTINGS_FILE = "ground_truth.json"
STORE_FILE = "conditions.jsonl"
LOCALIZATIONS_FILE = "localizations.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
#: the localization methods a ground truth can judge: block scores and the set-level
#: search with the toy oracle's soft presence ("search") or the model as its own judge ("search-self"): the
#: exhaustive greedy (every candidate set generated) at SEARCH_STEPS; "search-gradient" and "search-gradient-self":
#: the default `SearchConfig` (gradient-ranked steps, its own search steps)
METHODS = ("contribution", "patch", "attribution", "search", "search-self", "search-gradient", "search-gradient-self")
SEARCH_METHODS = {"search": "evaluator", "search-self": "self", "search-gradient": "evaluator",
                  "search-gradient-self": "self"}
PAIRED_REFERENCE = "search"  # the summary pairs every other method's regrets with this one's
#: the search runs on its own prompts, not the held-out ones it is judged on: SEARCH_PROMPTS of the concept's
#: localization prompts (evenly spread) x SEARCH_SEEDS, at SEARCH_STEPS sampling steps
SEARCH_PROMPTS = 6
SEARCH_SEEDS = (0, 1)
SEARCH_STEPS = 10
MAX_K = 4  # the greedy search's largest set
REGRET_KS = (1, 2, 4)
HALF = 0.5  # the oracle's minimal K: presence below HALF x baseline
AUTO_K_FRACTION = 0.5  # a method's automatic K: `score_mass_k(scores, AUTO_K_FRACTION)`
STRONG_DROP = 0.3  # hit@1 is summarized over concepts whose best single block drops presence this much
TIE = 1e-9  # drops this close count as equal
#: screening (`GroundTruthSettings.screen`): a condition stopped at its screen is one whose full-count presence
#: is below the best completed one with probability at most SCREEN_DELTA (Hoeffding, sampling without replacement)
SCREEN_DELTA = 0.02
SCREEN_SEED = 0  # the screen's images: one fixed uniform draw of the condition's images
SCREEN_FIRST = 3  # a raced step measures its most promising conditions on all images first


# --------------------------------------------------------------------------
# Settings and plan
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class GroundTruthSettings:
    """What to measure. `categories` / `concepts` / `methods` select the work (a rerun
    into the same directory may select more); the other fields decide the numbers and
    must not change in a run directory (see `record`).

    `n_images` held-out images per condition: the toy probe set's evaluation prompts
    (15 per concept) x seeds 0, 1, ... until there are `n_images` (see `samples`).
    `blocks` restricts the search to those blocks (None: every block of the model);
    meant for quick checks, since the search costs 1 + n + n(n-1)/2 + ... conditions.

    `screen`: race the pairs and each greedy step's sets (`_Run.race`): the SCREEN_FIRST most
    promising on all images, then, where a screen can pay, the rest on `screen` of their images,
    completed to `n_images` only while they can still be the step's best (`screen_margin`);
    None measures every one on all its images. The best pair and every greedy set are always
    measured on all images, so the oracle's sets and drops are those of the full search unless
    a condition is stopped wrongly (at most SCREEN_DELTA each). A setting of the run, not of
    the numbers: a rerun may change it, and a condition stopped at its screen is completed
    whenever a later step needs all its images.
    """

    model: str = "toy"
    categories: tuple[str, ...] = ()
    concepts: tuple[str, ...] = ()
    methods: tuple[str, ...] = METHODS
    steps: int = 20
    n_images: int = 32
    guidance_scale: float | None = None
    max_sequence_length: int | None = 32
    localize_seed: int = 0
    batch_size: int = 64
    localize_batch_size: int = 8
    blocks: tuple[str, ...] | None = None
    screen: int | None = None

    def __post_init__(self):
        for name in ("categories", "concepts", "methods"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(self.blocks))
            if len(self.blocks) < 2 or len(set(self.blocks)) != len(self.blocks):
                raise DitlocError(f"blocks must be at least 2 distinct block names, got {list(self.blocks)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise DitlocError(f"unknown method {unknown[0]!r}; use one or more of {', '.join(METHODS)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise DitlocError(f"methods must be distinct names among {', '.join(METHODS)}, got {list(self.methods)}")
        for name in ("steps", "n_images", "batch_size", "localize_batch_size"):
            if int(getattr(self, name)) < 1:
                raise DitlocError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.screen is not None and not 1 <= int(self.screen) < int(self.n_images):
            raise DitlocError(f"screen must be between 1 and n-images - 1 ({int(self.n_images) - 1}), got {self.screen}")

    def record(self) -> dict:
        """The settings that decide the numbers (ground_truth.json's "settings")."""
        return {
            "model": self.model, "probes": "toy", "evaluator": "toy", "steps": int(self.steps),
            "n_images": int(self.n_images), "guidance_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length, "localize_seed": int(self.localize_seed),
            "batch_size": int(self.batch_size), "localize_batch_size": int(self.localize_batch_size),
            "blocks": list(self.blocks) if self.blocks is not None else None, "max_k": MAX_K,
        }

    @property
    def bench_settings(self) -> BenchSettings:
        """The same generation settings as a bench's (its plan and RunOptions)."""
        return BenchSettings(model=self.model, probes="toy", ks=(1,), seeds=(0,), evaluator="toy",
                             categories=self.categories, steps=self.steps, guidance_scale=self.guidance_scale,
                             max_sequence_length=self.max_sequence_length, localize_seeds=(self.localize_seed,),
                             batch_size=self.batch_size)

    @property
    def run_options(self):
        return self.bench_settings.run_options


def samples(n_prompts: int, n_images: int) -> list[tuple[int, int]]:
    """The (prompt index, seed) of each image of a condition, in generation order: every
    prompt x seeds 0..F-1 (prompt-major), then the first R prompts x seed F, where
    n_images = F * n_prompts + R. Fewer images than prompts: the first n_images prompts, seed 0."""
    full, rest = divmod(n_images, n_prompts)
    return [(p, s) for p in range(n_prompts) for s in range(full)] + [(p, full) for p in range(rest)]


def sample_calls(c: ConceptPlan, n_images: int) -> list[tuple[ConceptPlan, list[int]]]:
    """The generation calls, (plan, seeds), whose images are a condition's `samples(...)`, in its order:
    every prompt x seeds 0..F-1, then the first R prompts at seed F."""
    full, rest = divmod(n_images, len(c.evaluation_prompts))
    calls = [(c, list(range(full)))] if full else []
    if rest:
        calls.append((dataclasses.replace(c, evaluation_prompts=c.evaluation_prompts[:rest],
                                          clean_prompts=c.clean_prompts[:rest]), [full]))
    return calls


def screen_indices(n_images: int, screen: int) -> list[int]:
    """Which of a condition's `n_images` images (indices into `samples`' order) its screen
    measures: one fixed uniform draw of `screen` of them, in sample order."""
    rng = np.random.default_rng(SCREEN_SEED)
    return sorted(int(i) for i in rng.choice(int(n_images), size=int(screen), replace=False))


def screen_margin(screen: int, delta: float = SCREEN_DELTA) -> float:
    """How far above the best completed presence a screened mean must lie to stop there:
    the mean of `screen` of the n images (drawn without replacement, scores in [0, 1])
    exceeds the mean of all n by this much with probability at most `delta` (Hoeffding 1963,
    Theorem 4)."""
    return math.sqrt(math.log(1.0 / delta) / (2.0 * int(screen)))


def plan_ground_truth(settings: GroundTruthSettings, probes=None) -> tuple[ConceptPlan, ...]:
    """The toy concepts `settings` selects, with their prompts; every name is checked
    here (and the methods' availability), before any model runs."""
    from ...probes import load_probe_set

    probes = probes if probes is not None else load_probe_set("toy")
    for category in settings.categories:
        if category not in probes.category_names:
            raise DitlocError(f"unknown category {category!r}; the toy categories are "
                              f"{', '.join(probes.category_names)}")
    concepts = plan_bench(settings.bench_settings, probes).concepts
    if settings.concepts:
        names = {c.concept: c for c in concepts}
        for name in settings.concepts:
            if name not in names:
                where = f"of the categories {', '.join(settings.categories)}" if settings.categories else "in the toy world"
                raise DitlocError(f"no concept {name!r} {where}; choose among {', '.join(names)}")
        concepts = tuple(c for c in concepts if c.concept in set(settings.concepts))
    return tuple(concepts)


def search_prompt_indices(n: int, k: int = SEARCH_PROMPTS) -> list[int]:
    """`k` indices evenly spread over `n` localization prompts (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def localization_file(category: str, slug: str, method: str) -> str:
    """Where a concept's localization by `method` lies, relative to the run directory."""
    return f"localizations/{slugify(category)}/{slug}.{method}.json"


def _concept_record(c: ConceptPlan, n_images: int) -> dict:
    return {"category": c.category, "concept": c.concept, "slug": c.slug, "eval_text": c.eval_text,
            "localization_prompts": list(c.localization_prompts), "evaluation_prompts": list(c.evaluation_prompts),
            "clean_prompts": list(c.clean_prompts),
            "samples": [list(s) for s in samples(len(c.evaluation_prompts), n_images)]}


def _read_record(out: Path) -> dict | None:
    path = out / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DitlocError(f"cannot read {path}: {e}; restore it or use a new --out directory") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("settings"), dict):
        raise DitlocError(f"{path} is not a {FORMAT} settings file; use a new --out directory")
    return record


def check_ground_truth_dir(out, settings: GroundTruthSettings) -> bool:
    """Refuse a directory that holds a ground truth measured with other settings (a
    different selection of concepts or methods is fine: it adds to the directory).
    True when it holds one with these settings (a rerun resumes it)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise DitlocError(f"{out} is a file; pass a directory (it is created if missing)")
    record = _read_record(Path(out))
    if record is None:
        return False
    old, new = record["settings"], settings.record()
    diffs = [f"{k}: {old.get(k)!r} there, {v!r} here" for k, v in new.items() if old.get(k) != v]
    if diffs:
        raise DitlocError(f"{out} holds a ground truth with other settings ({'; '.join(diffs[:3])}); rerun with the "
                          "same settings to resume, or use a new --out directory")
    return True
