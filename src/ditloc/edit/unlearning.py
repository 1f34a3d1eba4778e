"""Unlearning: one concept or many, in the blocks each is
localized in, by a closed-form solve (no training) or by training LoRA / full weights.

    unlearn(pipe, "zibbit", "triangle")                                  # one concept
    unlearn(pipe, concepts=[("zibbit", "triangle"), ("striped", "solid")],
            config=ClosedFormConfig())                                   # one solve for both

Every concept is localized on its own prompts (``blocks="auto"``); the closed form solves
each block once for every concept whose blocks include it, with one preservation set;
training fits every concept's prompts to its anchor's prediction in the union of their
blocks, optionally holding the preserved prompts to the frozen model's prediction
(``preserve_target="teacher"``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import DitlocError
from ..localization import Localization, nan_to_none
from ..offload import check_writable
from ..options import RunOptions, model_record
from ..text import find_occurrences, substitute
from .blocks import choose_blocks, general_prompts, neighbour_prompts
from .closed_form import ClosedFormConfig, closed_form_unlearn
from .concepts import Erasure, check_preserve, plan_erasures
from ..devices import reset_peak_memory, to_device
from .jobs import (
    EMPTY_PRESERVE,
    _adapter,
    _blank_latents,
    _cached_latents,
    _data_dtype,
    _encode,
    _finish,
    _identity,
    _native_size,
    _one_writer,
    _search_settings,
    _text_editable,
    run_options,
)
from ..processes import current as current_processes
from .robust import RobustConfig, train_robust
from .train import EditResult, LocalizedTrainer, TrainConfig, run_training

PRESERVE_TARGETS = (None, "teacher")
#: an erasure takes the smallest searched set that removes this share of the concept's presence (a set that
#: only halves it leaves the concept: on the toy, cross at 0.08 after its 3-block set, which removed 55%);
#: no such set up to max_k: every editable block
ERASE_DROP = 0.9
LOCALIZE_PROMPTS = 8  # `--blocks auto` searches on at most this many of a concept's prompts (spread over them)
#: the values of `k` besides a number of blocks: "auto" (`erase_k`, the default) and "gap" (the closed-form
#: edit's measured K, `ClosedFormConfig.gap_fraction`)
K_RULES = ("auto", "gap")
#: said when a robust erasure with blocks="auto" and k="auto" trains every block instead of a searched set
ROBUST_BLOCKS = ("robust erasure: training every block (a searched set is too few against an attacker who "
                 "optimizes the text states: on the toy, the hazard mark's searched block came back at 0.39 under "
                 "that attack, all 12 blocks at 0.00); pass --k N to train the top N searched blocks")


def erase_k(loc) -> int | None:
    """The K an erasure takes from a localization (``k="auto"``, ``--k auto``, the default): the
    smallest searched set that removes ERASE_DROP of the concept's presence; None where no set up
    to the search's max_k does (the concept is spread: every editable block is edited). A
    block-score localization measures no presence: its `Localization.k_auto`."""
    if loc.search is None:
        return loc.k_auto()
    return loc.search.k_for_drop(ERASE_DROP)


def anchor_prompt(prompt: str, concept: str, anchor: str) -> str:
    """`prompt` with every occurrence of `concept` (`ditloc.text.find_occurrences`)
    replaced by `anchor`, word for word (articles and spacing as they are)."""
    if not find_occurrences(prompt, concept):
        raise DitlocError(f"the concept {concept!r} does not occur in the prompt {prompt!r}")
    return substitute(prompt, concept, anchor.strip(), articles=False)


def default_preserve(pipe, erasures: list[Erasure]) -> list[str]:
    """The anchors, the prompts of the erased concepts' probe-set neighbours
    (:func:`~ditloc.edit.blocks.neighbour_prompts`) and general prompts of every probe-set
    category (:func:`~ditloc.edit.blocks.general_prompts`), without those that contain an
    erased concept. On the toy, erasing striped with the anchors and the other styles only
    left 0.96 of the other attributes unchanged (n = 768); every category's prompts keep them."""
    keep = [a for e in erasures for a in e.anchor_prompts]
    for e in erasures:
        keep += neighbour_prompts(pipe, e.concept)
    keep += general_prompts(pipe)
    return [p for p in dict.fromkeys(keep) if not any(find_occurrences(p, e.concept) for e in erasures)]


def pipe_blocks(pipe) -> list[str]:
    return _adapter(pipe).block_names()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "concept"


def _choose(pipe, erasures, blocks, k, out, *, options, progress, eligible, localize_method, search=None,
            seeds=(0, 1)):
    """Each erasure with its blocks, and its localization (None for explicit blocks).
    `blocks`: "auto", "all", names, a saved localization (one concept), or a dict
    {concept: any of those}. "auto" (or a saved search) without `k`: :func:`erase_k` (every
    editable block where it finds no set). A search runs on at most LOCALIZE_PROMPTS of the concept's prompts,
    scored as `search` says (`choose_blocks`' objective, evaluator, eval_text).
    Several concepts: each localization is checkpointed and saved under ``out/localizations/``; a
    rerun reuses them."""
    procs = current_processes()
    chosen, locs = [], []
    for e in erasures:
        spec = blocks.get(e.concept, "auto") if isinstance(blocks, dict) else blocks
        checkpoint = saved = None
        if out is not None and localize_method == "search" and spec == "auto":
            if len(erasures) == 1:
                checkpoint = out / "search.jsonl"
            else:
                (out / "localizations").mkdir(exist_ok=True)
                checkpoint = out / "localizations" / f"{_slug(e.concept)}.jsonl"
                saved = out / "localizations" / f"{_slug(e.concept)}.json"
                if saved.exists():
                    spec = Localization.load(saved)
        if progress and len(erasures) > 1 and spec == "auto":
            progress(f"[{e.concept}] choosing blocks")
        names, loc = procs.share(lambda e=e, spec=spec, checkpoint=checkpoint: choose_blocks(
            pipe, spec, k, _spread(list(e.prompts), LOCALIZE_PROMPTS), e.concept, seeds=seeds, progress=progress,
            options=options, eligible=eligible, method=localize_method, checkpoint=checkpoint, **(search or {})))
        if k is None and loc is not None and loc.search is not None:
            erase = erase_k(loc)
            if erase is not None:
                names = loc.top(erase)
            else:  # spread: an edit of a searched set would leave it (toy: striped stays at 0.98 after 4 blocks)
                names = list(eligible) if eligible is not None else pipe_blocks(pipe)
                if progress:
                    best = max(loc.search.relative_curve)
                    progress(f"[{e.concept}] no set of up to {loc.search.max_k} blocks removes {ERASE_DROP:.0%} of "
                             f"its presence (best {best:.0%}): editing all {len(names)} editable blocks for it")
        if loc is not None and out is not None and procs.is_main:
            if len(erasures) == 1:
                loc.save(out / "localization.json")
            else:
                (out / "localizations").mkdir(exist_ok=True)
                loc.save(out / "localizations" / f"{_slug(e.concept)}.json")
        chosen.append(e.with_blocks(names))
        locs.append(loc)
    return chosen, locs


def _concept_records(erasures, locs) -> list[dict]:
    """Per concept: its anchor, blocks, and the presence drop its localization measured
    for those blocks (a search's curve) or the blocks' scores."""
    out = []
    for e, loc in zip(erasures, locs):
        rec = {"concept": e.concept, "anchor": e.anchor, "blocks": list(e.blocks), "prompts": len(e.prompts)}
        if loc is not None and loc.search is not None and erase_k(loc) is None:
            rec["spread"] = True  # no searched set removed ERASE_DROP of its presence: every editable block
            rec["searched_drop"] = float(max(loc.search.relative_curve))
        elif loc is not None and loc.search is not None and 0 < len(e.blocks) <= loc.search.max_k \
                and set(e.blocks) == set(loc.search.sets[len(e.blocks) - 1]):
            rec["presence_drop"] = float(loc.search.relative_curve[len(e.blocks) - 1])
        elif loc is not None:
            rec["scores"] = {b: nan_to_none(float(loc.scores[loc.blocks.index(b)]))  # None: not measured
                             for b in e.blocks if b in loc.blocks}
        out.append(rec)
    return out


@_one_writer
def unlearn(
    pipe,
    concept: str | None = None,
    anchor: str | None = None,
    *,
    concepts=None,
    prompts=None,
    anchor_prompts=None,
    blocks="auto",
    k: int | str = "auto",
    config: TrainConfig | ClosedFormConfig = TrainConfig(),
    images_per_prompt: int = 4,
    preserve=None,
    preserve_target: str | None = None,
    preserve_weight: float = 1.0,
    localize_method: str = "search",
    localize_seeds=(0, 1),
    objective: str | None = None,
    evaluator=None,
    eval_text: str | None = None,
    out=None,
    options: RunOptions | None = None,
    progress=None,
    **run,
) -> EditResult:
    """Make prompts with a concept behave like the same prompts with its anchor (the frozen
    model's prediction is the target), changing only the concept's blocks.

    `concept`/`anchor`: one concept; `concepts`: several, as ``(concept, anchor)`` pairs
    (anchor None where `anchor_prompts` gives the anchor prompts). `prompts` may hold the
    prompts of every concept: each is assigned to the concepts it contains, and a concept in
    none of them is refused; default two per concept. `anchor_prompts` (one per prompt)
    replaces the word substitution, e.g. to drop a whole phrase ("with a hazard sign").
    `blocks`: "auto" (each concept localized by `localize_method` at `localize_seeds`), "all", names, a saved
    localization (one concept) or ``{concept: any of those}``. `k` (with "auto" or a
    localization): a number of blocks, "auto" (:func:`erase_k`) or "gap" (closed form, below).
    `objective` ("evaluator" or "self"), `evaluator` and `eval_text` (one concept only;
    default: the concept): how a search scores each concept's presence (default: the model's
    own evaluator where it can, else the model judges itself;
    :func:`~ditloc.edit.blocks.search_objective`).

    With a :class:`~ditloc.edit.closed_form.ClosedFormConfig` there is no training: the text
    key/value projections of the chosen blocks are solved in closed form,
    each block once for all its concepts, keeping the text states of `preserve` (default:
    the anchor prompts and the erased concepts' probe-set neighbours). ``k="gap"`` (one
    concept, closed form, ``blocks="auto"``): every editable block is solved and the
    smallest top K whose edit reaches ``config.gap_fraction`` of the best reduction of the
    gap to the anchors' prediction is kept. ``config.pooled`` (FLUX, SD3) also solves the
    pooled text vector's projection, shared by every block (not localized).

    With a :class:`~ditloc.edit.robust.RobustConfig` the erasure is trained against an inner attacker
    that optimizes the concept's text states to bring it back (adversarial unlearning,
    :mod:`ditloc.edit.robust`), on the concept's probe-set templates where no `prompts` are given,
    with the preserved prompts held to the frozen model's prediction; ``blocks="auto"`` with
    ``k="auto"`` then trains every block (`ROBUST_BLOCKS`), a number `k` the top k searched blocks.

    Training: ``preserve_target="teacher"`` adds, weighted by `preserve_weight`, the
    frozen model's prediction as the target on the preserved prompts (`preserve`, default
    as above), at noisy versions of the frozen model's own images of them.
    `options`/`run`: as in :func:`~ditloc.edit.personalize`."""
    if concepts is None:
        if concept is None or not str(concept).strip():
            raise DitlocError("the concept is empty; pass --concept 'the words to forget'")
        if anchor_prompts is None and (anchor is None or not str(anchor).strip()):
            raise DitlocError("the anchor is empty; pass --anchor 'what to show instead', e.g. 'a dog'")
        concepts = [(concept, anchor if anchor is not None and str(anchor).strip() else None)]
    elif concept is not None:
        raise DitlocError("pass either one concept or `concepts`, not both")
    closed_form = isinstance(config, ClosedFormConfig)
    robust = isinstance(config, RobustConfig)
    if robust and preserve_target not in (None, "teacher"):
        raise DitlocError("a robust erasure keeps the preserved prompts at the frozen model's prediction; leave "
                          "--preserve-target out")
    if robust:
        preserve_target = "teacher"
    if closed_form and current_processes().world > 1:
        raise DitlocError("--edit-method closed-form runs in one process (seconds); run it without accelerate launch")
    if closed_form and config.pooled:
        _adapter(pipe).pooled_projection()  # a family without a pooled text vector: one line, before any work
    if closed_form:
        check_writable(pipe.transformer)  # weights offloading keeps out of memory: one line, before any work
    if preserve_target not in PRESERVE_TARGETS:
        raise DitlocError(f"--preserve-target must be teacher or left out (got {preserve_target!r})")
    if preserve_target is not None and closed_form:
        raise DitlocError("--preserve-target applies to trained unlearning (--edit-method lora or full); the closed "
                          "form keeps the preserved prompts by its solve")
    if not preserve_weight >= 0:
        raise DitlocError(f"--preserve-weight must be >= 0 (got {preserve_weight})")
    if preserve is not None and not closed_form and preserve_target is None:
        raise DitlocError("preservation prompts need --edit-method closed-form or --preserve-target teacher")
    erasures = plan_erasures(concepts, prompts, anchor_prompts)
    if eval_text is not None and len(erasures) > 1:
        raise DitlocError("eval_text names what the evaluator looks for in one concept; with several concepts "
                          "leave it out (each concept's own text is scored)")
    if preserve is not None:
        preserve = check_preserve(preserve, erasures)
    if (closed_form or preserve_target) and preserve is None:
        preserve = default_preserve(pipe, erasures)
    if preserve is not None and not preserve:
        raise DitlocError(EMPTY_PRESERVE)
    eligible = _text_editable if closed_form else None
    gap_fraction = None
    if isinstance(k, str) and k not in K_RULES:
        raise DitlocError(f"k must be a number of blocks, auto or gap; got {k!r}")
    if k == "gap":
        if not closed_form:
            raise DitlocError("--k gap measures each K's closed-form edit; pass --edit-method closed-form "
                              "(or --k auto)")
        if blocks != "auto":
            raise DitlocError("--k gap ranks the blocks by a localization; pass --blocks auto")
        if len(erasures) > 1:
            raise DitlocError("--k gap measures one concept's edit; with several concepts use --k auto (each "
                              "concept's K from its localization)")
        gap_fraction = config.gap_fraction
        k = len(_text_editable(_adapter(pipe)))  # solve every editable block, keep the smallest K that works
    elif k == "auto":
        k = None  # erase_k, per concept
        if robust and blocks == "auto":  # what holds against an attacker: every block (ROBUST_BLOCKS)
            blocks = "all"
            if progress:
                progress(ROBUST_BLOCKS)

    options = run_options(options, run)
    options = RunOptions.of(options, pipeline_kwargs=_native_size(pipe, options.pipeline_kwargs))
    resolved = options.resolve(pipe)
    adapter, kw = resolved.adapter, resolved.call_kwargs
    for e in erasures:  # each concept must reach the text encoder
        for p in e.prompts:
            adapter.concept_span(p, e.concept, kw)
    if eligible is not None:
        eligible = eligible(adapter)
    erasures, locs = _choose(pipe, erasures, blocks, k, out if out is None else Path(out), options=options,
                             progress=progress, eligible=eligible, localize_method=localize_method,
                             search=_search_settings(objective, evaluator, eval_text), seeds=localize_seeds)
    out = Path(out) if out is not None else None
    if closed_form:
        for e in erasures:
            for b in e.blocks:
                adapter.text_projections(b)  # a block without text projections: one line, before any work
    if progress:
        union = list(dict.fromkeys(b for e in erasures for b in e.blocks))
        verb = "editing" if closed_form else "training"
        progress(f"{verb} {config.method} in {len(union)} block(s): {', '.join(union)}")
    records = _concept_records(erasures, locs)
    model = model_record(pipe).get("name_or_path") or type(pipe).__name__
    one = erasures[0]
    details = {"concept": one.concept if len(erasures) == 1 else None,
               "anchor": one.anchor if len(erasures) == 1 else None,
               "prompts": [p for e in erasures for p in e.prompts],
               "anchor_prompts": [a for e in erasures for a in e.anchor_prompts],
               "preserve": preserve, "concepts": records,
               "localization": locs[0].to_dict() if len(erasures) == 1 and locs[0] is not None else None}
    if closed_form:
        return _closed_form(pipe, adapter, kw, erasures, preserve, config, out, progress, details, gap_fraction,
                            model)
    if robust:
        return train_robust(pipe, adapter, kw, erasures, preserve, preserve_weight, config, out, progress, details,
                            expand=prompts is None)
    return _train(pipe, adapter, kw, erasures, preserve, preserve_target, preserve_weight, config, out, progress,
                  details, images_per_prompt)


def _closed_form(pipe, adapter, kw, erasures, preserve, config, out, progress, details, gap_fraction, model):
    anchors = [a for e in erasures for a in e.anchor_prompts]
    if adapter.text_states_depend_on_image:
        n_images = min(len(anchors), config.timesteps)
        if progress:
            progress(f"drawing {n_images} anchor image(s): joint blocks read text states that depend on the image")
        x0 = _cached_latents(out, "anchor_latents", pipe, _spread(anchors, n_images), 1, config.seed,
                             kw).to(pipe.transformer.dtype)
    else:
        x0 = _blank_latents(pipe, kw)
    probe = None
    if gap_fraction is not None:
        if adapter.text_states_depend_on_image:
            probe = x0
        else:
            if progress:
                progress(f"drawing {min(len(anchors), 16)} anchor image(s) to measure each K's edit")
            probe = _cached_latents(out, "probe_latents", pipe, anchors[:16], 1, config.seed,
                                    kw).to(pipe.transformer.dtype)
    return closed_form_unlearn(pipe, adapter, erasures, preserve, kw, config, x0=x0, out=out, progress=progress,
                               details=details, gap_fraction=gap_fraction, probe_x0=probe, model=model)


def _spread(items: list, n: int) -> list:
    """`n` items spread over `items` (every concept's anchors get images, not the first's)."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def _train(pipe, adapter, kw, erasures, preserve, preserve_target, preserve_weight, config, out, progress, details,
           images_per_prompt):
    prompts = [p for e in erasures for p in e.prompts]
    anchors = [a for e in erasures for a in e.anchor_prompts]
    chosen = list(dict.fromkeys(b for b in adapter.block_names() for e in erasures if b in e.blocks))
    if progress:
        progress(f"drawing {images_per_prompt} anchor image(s) per prompt")
    x0 = _cached_latents(out, "anchor_latents", pipe, anchors, images_per_prompt, config.seed, kw)
    x0 = x0.to(pipe.transformer.device, _data_dtype(pipe, config))  # [P*n, C, h, w]
    n = len(prompts)
    keep = None
    if preserve_target == "teacher":
        if progress:
            progress(f"drawing one image per preserved prompt ({len(preserve)}): their predictions stay the frozen "
                     "model's")
        keep = _cached_latents(out, "preserve_latents", pipe, preserve, 1, config.seed + 1, kw).to(x0)
    # text rows: [0, n) concept prompts, [n, 2n) anchors, [2n, 2n + len(preserve)) preserved prompts
    text = _encode(adapter, prompts + anchors + (list(preserve) if keep is not None else []), kw)
    data = {"concept": details["concept"], "anchor": details["anchor"], "concepts": details["concepts"],
            "prompts": prompts, "anchor_prompts": anchors, "images_per_prompt": images_per_prompt,
            "preserve_target": preserve_target, "preserve_weight": preserve_weight,
            "preserve": list(preserve) if keep is not None else None}
    reset_peak_memory(pipe.transformer.device)
    trainer = LocalizedTrainer(pipe, adapter, chosen, config)
    b = trainer.global_batch  # every process draws the global batch and trains on its rows

    def rows(index):
        return {k: v[index] for k, v in text.items()}

    def loss_fn() -> torch.Tensor:
        g = trainer.generator
        img = to_device(torch.randint(len(x0), (b,), generator=g), x0.device)  # anchor image, and its prompt
        which = img // images_per_prompt  # [B]
        x_t, t, _ = trainer.noise.sample(x0[img], g)
        x_t, t, which = trainer.shard(x_t, t, which)
        if keep is not None:
            kimg = torch.randint(len(keep), (b,), generator=g)
            kx_t, kt, _ = trainer.noise.sample(keep[to_device(kimg, keep.device)], g)
            kx_t, kt, krow = trainer.shard(kx_t, kt, to_device(kimg + 2 * n, keep.device))
            ktarget = trainer.teacher(kx_t, kt, rows(krow))  # before any forward with gradients
        target = trainer.teacher(x_t, t, rows(which + n))
        pred = adapter.denoise(x_t, t, rows(which))
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        if keep is not None:
            pred = adapter.denoise(kx_t, kt, rows(krow))
            loss = loss + preserve_weight * torch.nn.functional.mse_loss(pred.float(), ktarget.float())
        return loss

    wall = run_training(trainer, loss_fn, out, _identity("unlearn", pipe, chosen, config, data), progress)
    return _finish("unlearn", pipe, trainer, out, wall, dict(details, **data))
