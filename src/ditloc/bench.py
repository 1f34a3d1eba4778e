"""Bench: the causal benchmark of method.md §4 over a probe set, resumable and sharded.

For every concept of the chosen categories: localize it on its localization
prompts; then generate its evaluation prompts (x seeds) plainly (the baseline)
and with the concept withheld from the top-K, a random K and the bottom-K
blocks for every K, and score the concept's presence in every image against
its evaluation text.

The work is cut into *units*, each done whole or not at all:

    localize/<category>/<concept>                  -> localizations/<category>/<concept>.json
    generate/<category>/<concept>/baseline/k0      -> one row per prompt x seed
    generate/<category>/<concept>/<control>/k<K>   -> one row per prompt x seed (control: top, random, bottom)

A finished unit is one JSON line appended, with flush and fsync, to the
process's store ``results.rank<r>.jsonl``. A line cut short by a kill has no
newline: reading ignores it and the next append cuts it off first. A rerun
reads every store in the run directory, skips the units they hold and does the
rest, so a killed run (even ``kill -9``) loses at most the unit in flight and
never writes one twice.

Units are dealt round-robin to the processes of ``accelerate launch`` /
``torchrun`` (localizations first, then, after a barrier, generations). Every
unit is computed the same way whoever runs it (fixed batches, one generator per
image seeded from its seed, random-K blocks drawn from a seed derived from the
concept and K), so any number of processes and any pattern of kills give the
rows an uninterrupted single-process run gives. At the end the first process
merges the stores into ``results.jsonl``: one row per line, in plan order.

``bench.json`` records the settings; a rerun with other settings into the same
directory is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._io import write_atomic
from ._version import __version__
from .errors import DitlocError

FORMAT = "ditloc.bench/1"
SETTINGS_FILE = "bench.json"
RESULTS_FILE = "results.jsonl"
BASELINE = "baseline"
#: the withholding conditions compared for every K (method.md §4: top-K against random-K and bottom-K)
CONTROLS = ("top", "random", "bottom")
#: question the VLM judge is asked, filled with the concept's evaluation text ("an image showing X")
VLM_QUESTION = "Is this {concept}? Answer yes or no."
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------
# Settings, plan, rows
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    """Everything that decides a benchmark's numbers (written to RUN/bench.json).

    `categories` empty means every category of the probe set; the limits
    (`concepts_per_category`, `localization_prompts`, `evaluation_prompts`) take
    the first N in the probe set's order; None means all. `localize_seed` is the
    one seed of the localization trajectories; `seeds` are the evaluation seeds.
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
    localize_seed: int = 0
    variant: str = "attn_value_out"
    batch_size: int = 8
    dtype: str | None = None
    text_stream: str | None = None

    def __post_init__(self):
        from .evaluate import EVALUATORS
        from .processors import VARIANTS

        ks = tuple(int(k) for k in self.ks)
        if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
            raise DitlocError(f"K values must be distinct positive integers, e.g. 1,2,4,8; got {list(self.ks)}")
        object.__setattr__(self, "ks", tuple(sorted(ks)))
        seeds = tuple(int(s) for s in self.seeds)
        if not seeds or len(set(seeds)) != len(seeds):
            raise DitlocError(f"seeds must be distinct integers, e.g. 0,1,2; got {list(self.seeds)}")
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "categories", tuple(self.categories))
        if self.evaluator not in EVALUATORS:
            raise DitlocError(f"unknown evaluator {self.evaluator!r}; use one of {', '.join(EVALUATORS)}")
        if self.evaluator == "vlm" and not self.evaluator_model:
            raise DitlocError("the vlm evaluator needs --evaluator-model PATH (a vision-language model directory)")
        if self.evaluator == "style" and not self.references:
            raise DitlocError("the style evaluator needs --references DIR (one folder of images per concept)")
        if self.variant not in VARIANTS:
            raise DitlocError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        for name in ("concepts_per_category", "localization_prompts", "evaluation_prompts"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise DitlocError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if int(self.steps) < 1 or int(self.batch_size) < 1:
            raise DitlocError(f"steps and batch size must be positive, got {self.steps} and {self.batch_size}")

    @property
    def adapter_options(self) -> dict:
        return {"text_stream": self.text_stream} if self.text_stream else {}

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

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def localization_path(self) -> str:
        """Relative to the run directory."""
        return f"localizations/{slugify(self.category)}/{self.slug}.json"


@dataclass(frozen=True)
class Unit:
    """The smallest piece of work that is recorded: one localization, or the
    images (all evaluation prompts x seeds) of one condition of one concept."""

    kind: str  # "localize" | "generate"
    concept: ConceptPlan
    control: str = ""  # generate: "baseline" or one of CONTROLS
    k: int = 0  # 0 for localize and baseline

    @property
    def id(self) -> str:
        head = f"{self.kind}/{self.concept.category}/{self.concept.concept}"
        return head if self.kind == "localize" else f"{head}/{self.control}/k{self.k}"

    @property
    def image_dir(self) -> str:
        """Relative to the run directory."""
        c = self.concept
        condition = BASELINE if self.control == BASELINE else f"{self.control}-k{self.k}"
        return f"images/{slugify(c.category)}/{c.slug}/{condition}"


@dataclass(frozen=True)
class BenchPlan:
    """The settings resolved against a probe set: the concepts and their units, in order."""

    settings: BenchSettings
    concepts: tuple[ConceptPlan, ...]
    probes_sha256: str | None  # of the probe file; None for a built-in set

    def localize_units(self) -> list[Unit]:
        return [Unit("localize", c) for c in self.concepts]

    def generate_units(self) -> list[Unit]:
        units = []
        for c in self.concepts:
            units.append(Unit("generate", c, BASELINE, 0))
            units += [Unit("generate", c, control, k) for k in self.settings.ks for control in CONTROLS]
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


@dataclass(frozen=True)
class BenchRow:
    """One scored image. Baseline rows have control "baseline", k 0, no blocks and no clean prompt."""

    unit: str
    category: str
    concept: str
    control: str
    k: int
    blocks: tuple[str, ...]
    prompt_index: int
    prompt: str
    clean_prompt: str | None
    seed: int
    eval_text: str
    score: float
    image: str  # PNG path relative to the run directory

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BenchRow":
        return cls(**{**d, "blocks": tuple(d["blocks"])})


def slugify(name: str) -> str:
    """A name as a file-name component ("Claude Monet" -> "claude-monet")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "x"


def plan_bench(settings: BenchSettings, probes=None) -> BenchPlan:
    """The concepts and prompts `settings` select (`probes`: a loaded ProbeSet, else
    loaded from `settings.probes`). Every prompt is checked here, before any model runs."""
    from .probes import load_probe_set

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
            ))
    if not concepts:
        raise DitlocError("the selection has no concepts; check --categories and --concepts-per-category")
    return BenchPlan(settings, tuple(concepts), sha)


# --------------------------------------------------------------------------
# The run directory: settings file and result stores
# --------------------------------------------------------------------------


def check_run_dir(out, plan: BenchPlan) -> bool:
    """Refuse a run directory that holds a benchmark with other settings.
    True when it already holds this one (a rerun resumes it)."""
    path = Path(out) / SETTINGS_FILE
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DitlocError(f"cannot read {path}: {e}; use a new --out directory") from None
    new = plan.record()
    if old.get("format") != FORMAT:
        raise DitlocError(f"{path} is not a {FORMAT} settings file; use a new --out directory")
    diffs = [f"{k}: {old['settings'].get(k)!r} there, {v!r} here" for k, v in new["settings"].items()
             if old.get("settings", {}).get(k) != v]
    for key in ("probes_sha256", "concepts"):
        if old.get(key) != new[key]:
            diffs.append(f"{key} differ" if key == "concepts" else "the probe file changed")
    if diffs:
        raise DitlocError(f"{out} holds a benchmark with other settings ({'; '.join(diffs[:3])}); "
                          "rerun with the same settings to resume, or use a new --out directory")
    return True


class ResultStore:
    """An append-only JSONL file of finished units, one line each (see the module doc)."""

    def __init__(self, path):
        self.path = Path(path)
        self._repaired = False

    @staticmethod
    def read(path) -> list[dict]:
        """The complete lines' records; a last line without its newline (torn by a kill) is ignored."""
        path = Path(path)
        if not path.exists():
            return []
        data = path.read_bytes()
        lines = data.split(b"\n")[:-1]  # the piece after the last newline is torn or empty
        records = []
        for n, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DitlocError(f"{path}:{n}: not a JSON line; the store is damaged (move it away and rerun "
                                  "to recompute its units)") from None
        return records

    def _repair(self) -> None:
        """Cut a torn last line off, so the next record starts on a line of its own."""
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
                    f.flush()
                    os.fsync(f.fileno())
        self._repaired = True

    def append(self, record: dict) -> None:
        if not self._repaired:
            self._repair()
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def store_path(out, rank: int) -> Path:
    return Path(out) / f"results.rank{rank}.jsonl"


def read_units(out) -> dict[str, dict]:
    """Every finished unit in the run directory's stores (any number of ranks): id -> record."""
    done: dict[str, dict] = {}
    for path in sorted(Path(out).glob("results.rank*.jsonl")):
        for record in ResultStore.read(path):
            done.setdefault(record["unit"], record)
    return done


def collect_rows(plan: BenchPlan, done: dict[str, dict]) -> list[BenchRow]:
    """The rows of the finished generation units, in plan order."""
    rows = []
    for unit in plan.generate_units():
        if unit.id in done:
            rows += [BenchRow.from_dict(r) for r in done[unit.id]["rows"]]
    return rows


def read_rows(out) -> list[BenchRow]:
    """The rows of a run directory: results.jsonl, or while the run is unfinished the stores' rows."""
    out = Path(out)
    merged = out / RESULTS_FILE
    if merged.exists():
        return [BenchRow.from_dict(json.loads(line)) for line in merged.read_text().splitlines() if line.strip()]
    rows = []
    for record in read_units(out).values():
        rows += [BenchRow.from_dict(r) for r in record.get("rows", [])]
    return rows


# --------------------------------------------------------------------------
# Choosing blocks, evaluators
# --------------------------------------------------------------------------


def derived_seed(*parts) -> int:
    """A seed that depends only on `parts` (not on Python's hash salt, the process or the run)."""
    text = "\0".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def control_blocks(loc, control: str, k: int, category: str, concept: str) -> list[str]:
    """The K blocks a control withholds: the top-K of the localization, the bottom-K,
    or K blocks drawn at random (model order) from a seed derived from the concept and K."""
    blocks = list(loc.blocks)
    if not 1 <= k <= len(blocks):
        raise DitlocError(f"K must be between 1 and {len(blocks)} (the number of blocks), got {k}")
    if control == "top":
        return loc.top(k)
    if control == "bottom":
        return loc.ranking[-k:]
    if control == "random":
        rng = np.random.default_rng(derived_seed("random-k", category, concept, k))
        return [blocks[i] for i in sorted(rng.choice(len(blocks), size=k, replace=False).tolist())]
    raise DitlocError(f"unknown control {control!r}; use one of {', '.join(CONTROLS)}")


def _reference_images(folder: Path) -> list:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [Image.open(p).convert("RGB") for p in files]


def make_evaluator(settings: BenchSettings, plan: BenchPlan, *, device=None):
    """The settings' presence scorer. Style references: `references/<concept>/` (the
    concept's name or its file-name form) holds images of that concept's style."""
    from .evaluate import get_evaluator

    name = settings.evaluator
    if name == "toy":
        return get_evaluator("toy")
    kwargs = {"model": settings.evaluator_model} if settings.evaluator_model else {}
    if name == "clip":
        return get_evaluator("clip", device=device, **kwargs)
    if name == "vlm":
        return get_evaluator("vlm", device=device, question=VLM_QUESTION, **kwargs)
    root = Path(settings.references)
    if not root.is_dir():
        raise DitlocError(f"references directory {str(root)!r} does not exist; give one folder of images per concept")
    references = {}
    for c in plan.concepts:
        folder = next((root / n for n in (c.concept, c.slug) if (root / n).is_dir()), None)
        images = _reference_images(folder) if folder is not None else []
        if not images:
            raise DitlocError(f"no reference images for {c.concept!r}: put them in {root / c.concept} "
                              f"or {root / c.slug}")
        references[c.eval_text] = images
    return get_evaluator("style", references=references, device=device, **kwargs)


# --------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Workers:
    """This process's place among the processes that share a benchmark."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None


def accelerate_workers(*, cpu: bool) -> tuple[Workers, object]:
    """(Workers, device) from accelerate's PartialState: one process, or the processes
    of `accelerate launch` / `torchrun` (`cpu`: gloo on CPUs; otherwise one accelerator each)."""
    from datetime import timedelta

    from accelerate import PartialState

    # the barriers wait for the slowest process's units: give them a day, not gloo's 30 minutes
    state = PartialState(cpu=cpu, timeout=timedelta(hours=24))
    return Workers(state.process_index, state.num_processes, state.wait_for_everyone), state.device


@dataclass(frozen=True)
class BenchResult:
    rows: tuple[BenchRow, ...]  # all rows of the run (first process; others: empty)
    units_run: int  # by this process, this time
    units_reused: int  # found finished in the stores
    path: Path | None  # results.jsonl (first process)
    seconds: float


def _validate(pipe, plan: BenchPlan, evaluator) -> list[str]:
    """Check K against the model's blocks, every prompt's concept span and every
    evaluation text, before any unit runs. Returns the block names."""
    from ._run import prepare

    s = plan.settings
    adapter, _, _, kw = prepare(pipe, plan.concepts[0].evaluation_prompts, 0, adapter_options=s.adapter_options,
                                num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                                max_sequence_length=s.max_sequence_length, pipeline_kwargs={})
    blocks = adapter.block_names()
    if max(s.ks) > len(blocks):
        raise DitlocError(f"K must be at most {len(blocks)} (the model's blocks), got {max(s.ks)}")
    for c in plan.concepts:
        for p in c.localization_prompts + c.evaluation_prompts:
            adapter.concept_span(p, c.concept, kw)
        evaluator.check_text(c.eval_text)
    return blocks


def _localize_unit(pipe, plan: BenchPlan, unit: Unit, out: Path) -> dict:
    from .localize import localize

    s, c = plan.settings, unit.concept
    loc = localize(pipe, list(c.localization_prompts), c.concept, num_inference_steps=s.steps,
                   guidance_scale=s.guidance_scale, seed=s.localize_seed, max_sequence_length=s.max_sequence_length,
                   variant=s.variant, batch_size=s.batch_size, adapter_options=s.adapter_options)
    loc.save(out / c.localization_path)
    return {"unit": unit.id, "kind": "localize", "category": c.category, "concept": c.concept,
            "localization": c.localization_path, "ranking": loc.ranking, "scores": loc.scores.tolist()}


def _generate_unit(pipe, plan: BenchPlan, unit: Unit, loc, evaluator, out: Path) -> dict:
    from .intervene import generate

    s, c = plan.settings, unit.concept
    common = dict(num_inference_steps=s.steps, guidance_scale=s.guidance_scale, seed=list(s.seeds),
                  max_sequence_length=s.max_sequence_length, batch_size=s.batch_size,
                  adapter_options=s.adapter_options, output_type="pil")
    prompts = list(c.evaluation_prompts)
    if unit.control == BASELINE:
        blocks: list[str] = []
        images = generate(pipe, prompts, **common)
    else:
        blocks = control_blocks(loc, unit.control, unit.k, c.category, c.concept)
        images = generate(pipe, prompts, withhold=blocks, concept=c.concept, clean_prompts=list(c.clean_prompts),
                          **common)
    scores = evaluator.score(images, c.eval_text)  # [prompts x seeds], prompt-major
    (out / unit.image_dir).mkdir(parents=True, exist_ok=True)
    samples = [(i, seed) for i in range(len(prompts)) for seed in s.seeds]
    rows = []
    for (i, seed), image, score in zip(samples, images, scores):
        rel = f"{unit.image_dir}/p{i:03d}-s{seed}.png"
        image.save(out / rel)
        rows.append(BenchRow(
            unit=unit.id, category=c.category, concept=c.concept, control=unit.control, k=unit.k,
            blocks=tuple(blocks), prompt_index=i, prompt=prompts[i],
            clean_prompt=None if unit.control == BASELINE else c.clean_prompts[i], seed=seed,
            eval_text=c.eval_text, score=float(score), image=rel,
        ).to_dict())
    return {"unit": unit.id, "kind": "generate", "rows": rows}


def merge_results(out, plan: BenchPlan) -> tuple[list[BenchRow], Path]:
    """Write results.jsonl from the stores (every unit must be finished)."""
    out = Path(out)
    done = read_units(out)
    missing = [u.id for u in plan.units() if u.id not in done]
    if missing:
        raise DitlocError(f"{len(missing)} unit(s) unfinished (first: {missing[0]}); rerun the same command to finish")
    rows = collect_rows(plan, done)
    write_atomic(out / RESULTS_FILE, "".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    return rows, out / RESULTS_FILE


def run_bench(pipe, plan: BenchPlan, out, *, evaluator=None, workers: Workers = Workers(), progress=None,
              device=None) -> BenchResult:
    """Run (or resume) the benchmark `plan` into directory `out` (see the module doc)."""
    from .localize import Localization

    t0 = time.time()
    out = Path(out)
    say = progress or (lambda message: None)
    resuming = check_run_dir(out, plan)
    evaluator = evaluator if evaluator is not None else make_evaluator(plan.settings, plan, device=device)
    _validate(pipe, plan, evaluator)
    if workers.rank == 0:
        say(f"bench: {len(plan.concepts)} concept(s), {len(plan.units())} units, {workers.world_size} process(es)"
            + (", resuming" if resuming else ""))
    if workers.rank == 0 and not (out / SETTINGS_FILE).exists():
        write_atomic(out / SETTINGS_FILE, json.dumps(plan.record(), indent=1))
    store = ResultStore(store_path(out, workers.rank))
    done = set(read_units(out))
    tag = f"[{workers.rank}/{workers.world_size}] " if workers.world_size > 1 else ""
    ran = reused = 0
    localizations: dict[str, Localization] = {}

    def phase(units: list[Unit], work) -> None:
        nonlocal ran, reused
        for n, unit in enumerate(units):
            if n % workers.world_size != workers.rank:
                continue
            if unit.id in done:
                reused += 1
                continue
            t = time.time()
            store.append(work(unit))
            ran += 1
            say(f"bench {tag}{unit.id} ({time.time() - t:.1f}s, {time.time() - t0:.0f}s in all)")

    def generate_unit(unit: Unit) -> dict:
        c = unit.concept
        if unit.control != BASELINE and c.localization_path not in localizations:
            localizations[c.localization_path] = Localization.load(out / c.localization_path)
        return _generate_unit(pipe, plan, unit, localizations.get(c.localization_path), evaluator, out)

    phase(plan.localize_units(), lambda unit: _localize_unit(pipe, plan, unit, out))
    workers.barrier()  # every localization is on disk before any generation needs it
    phase(plan.generate_units(), generate_unit)
    workers.barrier()
    rows, path = (merge_results(out, plan) if workers.rank == 0 else ([], None))
    return BenchResult(tuple(rows), ran, reused, path, time.time() - t0)
