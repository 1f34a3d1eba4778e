"""The bench's runner: the presence scorer, the processes, and the units' work.

Units are dealt round-robin to the processes of ``accelerate launch`` /
``torchrun`` (localizations first, then, after a barrier, generations). Every
unit is computed the same way whoever runs it (fixed batches, one generator per
image seeded from its seed, random-K blocks drawn from a seed derived from the
concept and K), so any number of processes and any pattern of kills give the
rows an uninterrupted single-process run gives. At the end the first process
merges the stores into ``results.jsonl``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _progress
from .._io import LOCK_FILE, OutputLock
from ..errors import DitlocError
from .plan import (BASELINE, DEFAULT_METHOD, IMAGE_SUFFIXES, BenchPlan, BenchSettings, ConceptPlan, Unit, control_blocks,
                   reference_folder)
from .store import (BenchRow, ResultStore, check_run_dir, merge_results, read_units, store_path,
                    write_settings)

#: question the VLM judge is asked, filled with the concept's evaluation text ("an image showing X")
VLM_QUESTION = "Is this {concept}? Answer yes or no."


# --------------------------------------------------------------------------
# Evaluators
# --------------------------------------------------------------------------


def _reference_images(folder: Path) -> list:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [Image.open(p).convert("RGB") for p in files]


def make_evaluator(settings: BenchSettings, plan: BenchPlan, *, device=None):
    """The settings' presence scorer. Style references: `references/<concept>/` (the
    concept's name or its file-name form) holds images of that concept's style."""
    from ..evaluate import get_evaluator

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
        folder = reference_folder(root, c)
        images = _reference_images(folder) if folder is not None else []
        if not images:
            raise DitlocError(f"no reference images for {c.concept!r}: put them in {root / c.concept} "
                              f"or {root / c.slug}")
        references[c.eval_text] = images
    return get_evaluator("style", references=references, device=device, **kwargs)


# --------------------------------------------------------------------------
# Processes
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


# --------------------------------------------------------------------------
# The units' work
# --------------------------------------------------------------------------


def _validate(pipe, plan: BenchPlan, evaluator) -> list[str]:
    """Check K against the model's blocks, every prompt's concept span and every
    evaluation text, before any unit runs. Returns the block names."""
    s = plan.settings
    resolved = s.run_options.resolve(pipe)
    adapter, kw = resolved.adapter, resolved.call_kwargs
    blocks = adapter.block_names()
    if max(s.ks) > len(blocks):
        raise DitlocError(f"K must be at most {len(blocks)} (the model's blocks), got {max(s.ks)}")
    for c in plan.concepts:
        for p in c.localization_prompts + c.evaluation_prompts:
            adapter.concept_span(p, c.concept, kw)
        evaluator.check_text(c.eval_text)
    check_size = getattr(evaluator, "check_image_size", None)  # (an evaluator of the caller's may lack it)
    if check_size is not None:
        native_h, native_w = adapter.image_size()
        check_size(int(kw.get("width") or native_w), int(kw.get("height") or native_h))
    return blocks


def generate_scored(pipe, concept: ConceptPlan, blocks: list[str] | None, evaluator, *, seeds,
                    **generation) -> tuple[list, np.ndarray]:
    """The concept's evaluation prompts x `seeds` (prompt-major), generated plainly
    (`blocks` None) or with the concept withheld from `blocks` (its clean prompts
    there), and each image's presence of the concept's evaluation text:
    (PIL images [N], scores float64 [N]). `generation`: more keywords of `generate`."""
    from ..intervene import generate

    prompts = list(concept.evaluation_prompts)
    common = dict(seed=list(seeds), output_type="pil", **generation)
    if blocks is None:
        images = generate(pipe, prompts, **common)
    else:
        images = generate(pipe, prompts, withhold=blocks, concept=concept.concept,
                          clean_prompts=list(concept.clean_prompts), **common)
    return images, evaluator.score(images, concept.eval_text)  # [prompts x seeds], prompt-major


def _search_evaluator(evaluator, text: str):
    """The bench's evaluator as the search's objective where it can score `text` (an `Evaluator`
    that takes it), else None: the search then uses the model's own evaluator or judges itself."""
    from ..evaluate import Evaluator

    if not isinstance(evaluator, Evaluator):
        return None
    try:
        evaluator.check_text(text)
    except DitlocError:
        return None
    return evaluator


def _localize_unit(pipe, plan: BenchPlan, unit: Unit, out: Path, evaluator=None) -> dict:
    """One localization. A set-level search finds S_K for every K up to the largest K (capped at the
    blocks), scoring presence with the bench's evaluator where it can, and checkpoints each
    scored set next to the localization file, so a killed search resumes mid-way."""
    from ..localization import SearchConfig, localize, nan_to_none

    s, c = plan.settings, unit.concept
    method = unit.method or DEFAULT_METHOD
    clean = list(c.localization_clean_prompts) if method != DEFAULT_METHOD and c.localization_clean_prompts else None
    path = c.localization_file(method)
    if method == "search":
        n_blocks = len(s.run_options.resolve(pipe).adapter.block_names())
        scorer = _search_evaluator(evaluator, c.eval_text)
        how = {"search": SearchConfig(max_k=min(max(s.ks), n_blocks)), "evaluator": scorer,
               "eval_text": c.eval_text if scorer is not None else None,
               "checkpoint": out / (path.removesuffix(".json") + ".jsonl")}  # e.g. red.search.jsonl
    else:
        how = {"contribution_terms": s.contribution_terms}
    loc = localize(pipe, list(c.localization_prompts), c.concept, method=method, clean_prompts=clean,
                   seed=list(s.localize_seeds), batch_size=s.batch_size, options=s.run_options, **how)
    loc.save(out / path)
    record = {"unit": unit.id, "kind": "localize", "category": c.category, "concept": c.concept,
              "localization": path, "ranking": loc.ranking, "scores": nan_to_none(loc.scores.tolist())}
    if method != DEFAULT_METHOD:
        record["method"] = method
    if loc.search is not None:
        record["objective"] = loc.search.objective
        record["sets"] = [list(b) for b in loc.search.sets]
    return record


def _generate_unit(pipe, plan: BenchPlan, unit: Unit, loc, evaluator, out: Path) -> dict:
    s, c = plan.settings, unit.concept
    blocks = None if unit.control == BASELINE else control_blocks(loc, unit.control, unit.k, c.category, c.concept)
    images, scores = generate_scored(pipe, c, blocks, evaluator, seeds=s.seeds, batch_size=s.batch_size,
                                     options=s.run_options)
    (out / unit.image_dir).mkdir(parents=True, exist_ok=True)
    samples = [(i, seed) for i in range(len(c.evaluation_prompts)) for seed in s.seeds]
    rows = []
    for (i, seed), image, score in zip(samples, images, scores):
        rel = f"{unit.image_dir}/p{i:03d}-s{seed}.png"
        image.save(out / rel)
        rows.append(BenchRow(
            unit=unit.id, category=c.category, concept=c.concept, control=unit.control, k=unit.k,
            method=unit.method,
            blocks=tuple(blocks or ()), prompt_index=i, prompt=c.evaluation_prompts[i],
            clean_prompt=None if unit.control == BASELINE else c.clean_prompts[i], seed=seed,
            eval_text=c.eval_text, score=float(score), image=rel,
        ).to_dict())
    return {"unit": unit.id, "kind": "generate", "rows": rows}


def _pipeline_calls(settings: BenchSettings, unit: Unit) -> int | None:
    """How many `pipe(...)` calls a unit makes: its images (localize: prompts x one seed) in batches;
    None for a search (its sets are chosen as it goes)."""
    if unit.kind == "localize" and unit.method == "search":
        return None
    c = unit.concept
    images = len(c.localization_prompts) if unit.kind == "localize" else len(c.evaluation_prompts) * len(settings.seeds)
    return math.ceil(images / settings.batch_size)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchResult:
    rows: tuple[BenchRow, ...]  # all rows of the run (first process; others: empty)
    units_run: int  # by this process, this time
    units_reused: int  # found finished in the stores
    path: Path | None  # results.jsonl (first process)
    seconds: float


def run_bench(pipe, plan: BenchPlan, out, *, evaluator=None, workers: Workers = Workers(), progress=None,
              device=None) -> BenchResult:
    """Run (or resume) the benchmark `plan` into directory `out` (see the package doc).
    Each process holds a lock on its rank's slot of `out`: a second run on the same
    directory is refused, naming the PID that writes it."""
    resuming = check_run_dir(out, plan)  # other settings: refused before the directory is touched
    with OutputLock(out, name=f"{LOCK_FILE}.rank{workers.rank}"):
        return _run_bench(pipe, plan, out, resuming=resuming, evaluator=evaluator, workers=workers,
                          progress=progress, device=device)


def _run_bench(pipe, plan: BenchPlan, out, *, resuming: bool, evaluator, workers: Workers, progress,
               device) -> BenchResult:
    from ..localization import Localization

    t0 = time.time()
    out = Path(out)
    say = progress or (lambda message: None)
    evaluator = evaluator if evaluator is not None else make_evaluator(plan.settings, plan, device=device)
    _validate(pipe, plan, evaluator)
    if workers.rank == 0:
        say(f"bench: {len(plan.concepts)} concept(s), {len(plan.units())} units, {workers.world_size} process(es)"
            + (", resuming" if resuming else ""))
        write_settings(out, plan)
    store = ResultStore(store_path(out, workers.rank))
    done = set(read_units(out))
    tag = f"[{workers.rank}/{workers.world_size}] " if workers.world_size > 1 else ""
    ran = reused = 0
    localizations: dict[str, Localization] = {}
    mine = [[u for n, u in enumerate(units) if n % workers.world_size == workers.rank]
            for units in (plan.localize_units(), plan.generate_units())]
    # bars on the first process only (the others would draw over them); a unit's bar counts its denoising steps
    overall = _progress.bar(total=sum(u.id not in done for units in mine for u in units), desc="bench",
                            unit="unit", off=workers.rank != 0)

    def phase(units: list[Unit], work) -> None:
        nonlocal ran, reused
        for unit in units:
            if unit.id in done:
                reused += 1
                continue
            t = time.time()
            with _progress.bar(desc=unit.id, unit="step", leave=False, off=workers.rank != 0) as steps, \
                    _progress.count_steps(pipe, steps, calls=_pipeline_calls(plan.settings, unit)):
                record = work(unit)
            store.append(record)
            ran += 1
            overall.update()
            say(f"bench {tag}{unit.id}: done in {time.time() - t:.1f} s; {_progress.elapsed(t0)} since the start")

    def generate_unit(unit: Unit) -> dict:
        # random-K needs only the block names: any method's localization has them
        path = unit.concept.localization_file(unit.method or plan.settings.methods[0])
        if unit.control != BASELINE and path not in localizations:
            localizations[path] = Localization.load(out / path)
        return _generate_unit(pipe, plan, unit, localizations.get(path), evaluator, out)

    with overall:
        phase(mine[0], lambda unit: _localize_unit(pipe, plan, unit, out, evaluator))
        workers.barrier()  # every localization is on disk before any generation needs it
        phase(mine[1], generate_unit)
    workers.barrier()
    rows, path = (merge_results(out, plan) if workers.rank == 0 else ([], None))
    return BenchResult(tuple(rows), ran, reused, path, time.time() - t0)
