"""The bench's plan: settings, the concepts and prompts they select, the units of
work, and the blocks each control withholds.

The work is cut into *units*, each done whole or not at all:

    localize/<category>/<concept>[/<method>]       -> localizations/<category>/<concept>[.<method>].json
    generate/<category>/<concept>/baseline/k0      -> one row per prompt x seed
    generate/<category>/<concept>/<control>[@<method>]/k<K>
                                                   -> one row per prompt x seed (control: top, random, bottom)

The localization method (`BenchSettings.methods`: contribution, patch,
attribution, search) decides the top-K and bottom-K blocks; the default method,
contribution, leaves names without a suffix. A set-level search's top-K is its
searched set S_K, and it has no bottom-K (`NO_BOTTOM`). Random-K blocks do not depend on
the method: they are drawn from a seed derived from the concept and K, so every
unit is computed the same way whoever runs it and whenever.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._version import __version__
from ..errors import DitlocError

FORMAT = "ditloc.bench/1"
BASELINE = "baseline"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: the withholding conditions compared for every K (top-K against random-K and bottom-K)
CONTROLS = ("top", "random", "bottom")
#: the method whose names carry no suffix (and the only one of runs made before `methods` existed)
DEFAULT_METHOD = "contribution"
#: methods without a bottom-K control: a set-level search ranks block *sets*, and its per-block scores are
#: the single-block drops it happened to generate (zero for the others), so its "bottom K" would be model order
NO_BOTTOM = ("search",)


def method_controls(method: str) -> tuple[str, ...]:
    """The controls whose blocks `method`'s localization chooses: top and bottom; top only for a
    set-level search (see NO_BOTTOM). Random-K belongs to no method."""
    return tuple(c for c in CONTROLS if c != "random" and not (c == "bottom" and method in NO_BOTTOM))


@dataclass(frozen=True)
class BenchSettings:
    """Everything that decides a benchmark's numbers (written to RUN/bench.json).

    `categories` empty means every category of the probe set; the limits
    (`concepts_per_category`, `localization_prompts`, `evaluation_prompts`) take
    the first N in the probe set's order; None means all. `localize_seeds` are the
    seeds of the localization trajectories; `seeds` are the evaluation seeds.
    `contribution_terms`: what the contribution method measures (`ditloc.engine.CONTRIBUTION_TERMS`).
    """

    model: str
    probes: str
    ks: tuple[int, ...]
    seeds: tuple[int, ...]
    evaluator: str
    evaluator_model: str | None = None
    references: str | None = None
    categories: tuple[str, ...] = ()
    concepts_per_category: int | None = None
    localization_prompts: int | None = None
    evaluation_prompts: int | None = None
    steps: int = 20
    guidance_scale: float | None = None
    max_sequence_length: int | None = None
    localize_seeds: tuple[int, ...] = (0,)
    contribution_terms: str = "attn_value_out"
    batch_size: int = 8
    dtype: str | None = None
    adapter_options: dict = dataclasses.field(default_factory=dict)  # model-family settings (--adapter-option)
    methods: tuple[str, ...] = (DEFAULT_METHOD,)  # localization methods compared (top/bottom-K per method)
    #: other `pipe(...)` arguments (--height, --width, --pipeline-arg), checked against the pipeline before any unit
    pipeline_kwargs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        from ..engine import CONTRIBUTION_TERMS
        from ..evaluate import EVALUATORS
        from ..localization import METHODS

        methods = tuple(self.methods)
        unknown = [m for m in methods if m not in METHODS]
        if not methods or unknown or len(set(methods)) != len(methods):
            raise DitlocError(f"methods must be distinct names among {', '.join(METHODS)}; got {list(self.methods)}")
        object.__setattr__(self, "methods", methods)

        ks = tuple(int(k) for k in self.ks)
        if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
            raise DitlocError(f"K values must be distinct positive integers, e.g. 1,2,4,8; got {list(self.ks)}")
        object.__setattr__(self, "ks", tuple(sorted(ks)))
        for name in ("seeds", "localize_seeds"):
            seeds = tuple(int(s) for s in getattr(self, name))
            if not seeds or len(set(seeds)) != len(seeds):
                raise DitlocError(f"{name.replace('_', '-')} must be distinct integers, e.g. 0,1,2; "
                                  f"got {list(getattr(self, name))}")
            object.__setattr__(self, name, seeds)
        object.__setattr__(self, "categories", tuple(self.categories))
        if self.evaluator not in EVALUATORS:
            raise DitlocError(f"unknown evaluator {self.evaluator!r}; use one of {', '.join(EVALUATORS)}")
        if self.evaluator == "vlm" and not self.evaluator_model:
            raise DitlocError("the vlm evaluator needs --evaluator-model PATH (a vision-language model directory)")
        if self.evaluator in ("clip", "style") and not self.evaluator_model and os.environ.get("HF_HUB_OFFLINE"):
            raise DitlocError(f"the {self.evaluator} evaluator needs --evaluator-model PATH offline (HF_HUB_OFFLINE "
                              "is set, so its default hub model cannot be downloaded)")
        if self.evaluator == "style" and not self.references:
            raise DitlocError("the style evaluator needs --references DIR (one folder of images per concept)")
        if self.contribution_terms not in CONTRIBUTION_TERMS:
            raise DitlocError(f"unknown contribution terms {self.contribution_terms!r}; choose one of "
                              f"{', '.join(CONTRIBUTION_TERMS)}")
        for name in ("concepts_per_category", "localization_prompts", "evaluation_prompts"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise DitlocError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if int(self.steps) < 1 or int(self.batch_size) < 1:
            raise DitlocError(f"steps and batch size must be positive, got {self.steps} and {self.batch_size}")
        if not all(isinstance(key, str) for key in self.pipeline_kwargs):
            raise DitlocError(f"pipeline arguments are named by strings, got {list(self.pipeline_kwargs)}")

    @classmethod
    def defaults(cls) -> dict:
        """The settings' default values (to_dict form): what a bench.json written before a setting existed ran with."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    @property
    def run_options(self):
        """How every unit calls the pipeline (one RunOptions for localize and generate)."""
        from ..options import RunOptions

        return RunOptions(num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                          max_sequence_length=self.max_sequence_length, adapter_options=dict(self.adapter_options),
                          pipeline_kwargs=dict(self.pipeline_kwargs))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class ConceptPlan:
    """One concept's prompts, as the benchmark uses them."""

    category: str
    concept: str  # the name: what localization looks for
    slug: str  # its file-name form
    localization_prompts: tuple[str, ...]
    evaluation_prompts: tuple[str, ...]
    clean_prompts: tuple[str, ...]  # one per evaluation prompt
    eval_text: str
    localization_clean_prompts: tuple[str, ...] = ()  # one per localization prompt (causal methods)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def localization_path(self) -> str:
        """Relative to the run directory (the default method's)."""
        return localization_path(self.category, self.slug)

    def localization_file(self, method: str) -> str:
        """Where `method`'s localization lies, relative to the run directory."""
        return localization_path(self.category, self.slug, method)


@dataclass(frozen=True)
class Unit:
    """The smallest piece of work that is recorded: one localization, or the
    images (all evaluation prompts x seeds) of one condition of one concept."""

    kind: str  # "localize" | "generate"
    concept: ConceptPlan
    control: str = ""  # generate: "baseline" or one of CONTROLS
    k: int = 0  # 0 for localize and baseline
    method: str = ""  # localize, top, bottom: the localization method; "" for baseline and random

    @property
    def _suffix(self) -> str:
        return "" if self.method in ("", DEFAULT_METHOD) else self.method

    @property
    def id(self) -> str:
        head = f"{self.kind}/{self.concept.category}/{self.concept.concept}"
        if self.kind == "localize":
            return f"{head}/{self._suffix}" if self._suffix else head
        control = f"{self.control}@{self._suffix}" if self._suffix else self.control
        return f"{head}/{control}/k{self.k}"

    @property
    def image_dir(self) -> str:
        """Relative to the run directory."""
        c = self.concept
        control = f"{self.control}-{self._suffix}" if self._suffix else self.control
        condition = BASELINE if self.control == BASELINE else f"{control}-k{self.k}"
        return f"images/{slugify(c.category)}/{c.slug}/{condition}"


@dataclass(frozen=True)
class BenchPlan:
    """The settings resolved against a probe set: the concepts and their units, in order."""

    settings: BenchSettings
    concepts: tuple[ConceptPlan, ...]
    probes_sha256: str | None  # of the probe file; None for a built-in set

    def localize_units(self) -> list[Unit]:
        return [Unit("localize", c, method=m) for c in self.concepts for m in self.settings.methods]

    def generate_units(self) -> list[Unit]:
        units = []
        for c in self.concepts:
            units.append(Unit("generate", c, BASELINE, 0))
            for k in self.settings.ks:
                for control in CONTROLS:
                    methods = [""] if control == "random" else [
                        m for m in self.settings.methods if control in method_controls(m)]
                    units += [Unit("generate", c, control, k, m) for m in methods]
        return units

    def units(self) -> list[Unit]:
        return self.localize_units() + self.generate_units()

    def record(self) -> dict:
        """The content of bench.json."""
        concepts: dict[str, list[str]] = {}
        for c in self.concepts:
            concepts.setdefault(c.category, []).append(c.concept)
        return {
            "format": FORMAT,
            "ditloc_version": __version__,
            "settings": self.settings.to_dict(),
            "probes_sha256": self.probes_sha256,
            "concepts": concepts,
        }


def slugify(name: str) -> str:
    """A name as a file-name component ("Claude Monet" -> "claude-monet")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "x"


def localization_path(category: str, slug: str, method: str = DEFAULT_METHOD) -> str:
    """Where `method`'s localization of the concept with file name `slug` lies, relative to the run directory."""
    suffix = "" if method == DEFAULT_METHOD else f".{method}"
    return f"localizations/{slugify(category)}/{slug}{suffix}.json"


def plan_bench(settings: BenchSettings, probes=None) -> BenchPlan:
    """The concepts and prompts `settings` select (`probes`: a loaded ProbeSet, else
    loaded from `settings.probes`). Every prompt is checked here, before any model runs."""
    from ..probes import load_probe_set

    probes = probes if probes is not None else load_probe_set(settings.probes)
    sha = None
    if settings.probes not in ("lock", "toy") and Path(settings.probes).is_file():
        sha = hashlib.sha256(Path(settings.probes).read_bytes()).hexdigest()
    names = settings.categories or tuple(probes.category_names)
    concepts, slugs = [], {}
    for category in names:
        chosen = probes.concepts(category)[: settings.concepts_per_category]
        for name in chosen:
            loc = probes.prompts(category, name, "localization")[: settings.localization_prompts]
            evl = probes.prompts(category, name, "evaluation")[: settings.evaluation_prompts]
            slug = slugify(name)
            if (category, slug) in slugs:
                raise DitlocError(f"concepts {slugs[category, slug]!r} and {name!r} of {category!r} have the same file "
                                  "name; rename one in the probe file")
            slugs[category, slug] = name
            concepts.append(ConceptPlan(
                category=category, concept=name, slug=slug, localization_prompts=tuple(loc),
                evaluation_prompts=tuple(evl), clean_prompts=tuple(probes.clean_prompt(category, name, p) for p in evl),
                eval_text=probes.eval_text(category, name),
                localization_clean_prompts=tuple(probes.clean_prompt(category, name, p) for p in loc),
            ))
    if not concepts:
        raise DitlocError("the selection has no concepts; check --categories and --concepts-per-category")
    _check_evaluator_files(settings, concepts)
    return BenchPlan(settings, tuple(concepts), sha)


def reference_folder(root: Path, concept: ConceptPlan) -> Path | None:
    """A concept's folder of style references: `root/<name>` or `root/<file-name form>`."""
    return next((root / n for n in (concept.concept, concept.slug) if (root / n).is_dir()), None)


def _check_evaluator_files(settings: BenchSettings, concepts: list[ConceptPlan]) -> None:
    """The evaluator's local files exist (before any model loads)."""
    model = settings.evaluator_model
    if model and Path(model).expanduser().exists() and not Path(model).expanduser().is_dir():
        raise DitlocError(f"--evaluator-model {model} is a file; give the model's directory or a cached hub id")
    if model and model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise DitlocError(f"evaluator model directory {model!r} does not exist")
    if settings.evaluator != "style" or not settings.references:
        return
    root = Path(settings.references)
    if not root.is_dir():
        raise DitlocError(f"references directory {str(root)!r} does not exist; give one folder of images per concept")
    for c in concepts:
        folder = reference_folder(root, c)
        if folder is None or not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
            raise DitlocError(f"no reference images for {c.concept!r}: put them in {root / c.concept} "
                              f"or {root / c.slug}")


def derived_seed(*parts) -> int:
    """A seed that depends only on `parts` (not on Python's hash salt, the process or the run)."""
    text = "\0".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def random_blocks(blocks: list[str], k: int, rng: np.random.Generator) -> list[str]:
    """K of `blocks` drawn at random from `rng` without replacement, in model order
    (one `rng.choice` of K indices: the same draw as `rng.choice(blocks, k, replace=False)`)."""
    return [blocks[i] for i in sorted(rng.choice(len(blocks), size=k, replace=False).tolist())]


def control_blocks(loc, control: str, k: int, category: str, concept: str) -> list[str]:
    """The K blocks a control withholds: the top-K of the localization (a search's S_K), the
    bottom-K (not for a search: NO_BOTTOM), or K blocks drawn at random (model order) from a
    seed derived from the concept and K."""
    blocks = list(loc.blocks)
    if not 1 <= k <= len(blocks):
        raise DitlocError(f"K must be between 1 and {len(blocks)} (the number of blocks), got {k}")
    if control == "top":
        return loc.top(k)
    if control == "bottom":
        if loc.search is not None:
            raise DitlocError("a set-level search has no bottom-K (it ranks block sets, not single blocks); "
                              "compare its top-K with random-K")
        return loc.ranking[-k:]
    if control == "random":
        return random_blocks(blocks, k, np.random.default_rng(derived_seed("random-k", category, concept, k)))
    raise DitlocError(f"unknown control {control!r}; use one of {', '.join(CONTROLS)}")
