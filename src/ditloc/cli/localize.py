"""`ditloc localize` (rank blocks for a concept) and `ditloc intervene` (generate with it withheld / injected)."""

from __future__ import annotations

import math
from pathlib import Path

from .. import _progress
from . import models
from .common import (
    CONTRIBUTION_TERMS,
    LOCALIZE_METHODS,
    Once,
    _words,
    adapter_options,
    add_common,
    check_blocks_named,
    check_concept,
    check_k,
    check_out_and_counts,
    check_run_settings,
    fail,
    main_process_lock,
    k_value,
    read_prompts,
    retire,
    run_options,
)


def add_parsers(sub) -> None:
    p = sub.add_parser("localize", help="find the blocks that hold a concept (set-level search, or per-block scores)")
    add_common(p, concept_required=False)
    p.add_argument("--concepts-file", default=None,
                   help="instead of --concept: a text file, one concept a line (# comments); each is searched on "
                        "the prompts that contain it, into OUT/<concept>/ (one model load for all)")
    p.add_argument("--prompt", action="append", help="a prompt containing the concept (repeatable)")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--localize-method", choices=LOCALIZE_METHODS, default="search",
                   help="search (default): block *sets* by their effect on the concept's presence (greedy; each "
                        "step ranks every block by conditional attribution and generates the best --verify; "
                        "resumable); contribution: where the concept is read (cheapest); patch: the effect of "
                        "withholding each block alone (1 + blocks forwards per step); attribution: its "
                        "first-order estimate (one backward pass per step)")
    p.add_argument("--clean-prompt", action="append", default=None,
                   help="patch/attribution: the clean prompt of each --prompt, in order (repeatable; default: the "
                        "prompt with the concept removed)")
    p.add_argument("--contribution-terms", choices=CONTRIBUTION_TERMS, default="attn_value_out",
                   help="contribution only: which terms of the attention output are measured (default "
                        "attn_value_out: the attention weights times the values and the output projection)")
    p.add_argument("--out-bias", action="store_true", help="contribution only: add W_o's bias (authors' code)")
    p.add_argument("--k", type=k_value(), action=Once, default=None, metavar="N|auto",
                   help="also choose K and record it: N blocks, or auto (the smallest K that halves the concept's "
                        "presence on the search's curve; block scores: that holds half the positive score mass)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-batch", type=int, default=None,
                   help="patch: blocks withheld per extra forward; search: block sets per pipeline call")
    g = p.add_argument_group("set-level search (--localize-method search)")
    g.add_argument("--objective", default=None,
                   help="evaluator (soft presence by --evaluator; the default on the toy models, whose oracle is "
                        "built in) or self (the model judges itself; the default elsewhere)")
    g.add_argument("--evaluator", default=None, help="toy, clip or vlm (the objective's evaluator; default toy on "
                                                   "the toy models)")
    g.add_argument("--evaluator-model", default=None, help="the CLIP / VLM checkpoint (a local path or cached id)")
    g.add_argument("--eval-text", default=None, help="what the evaluator looks for (default: the concept)")
    g.add_argument("--max-k", type=int, default=None, help="largest block set (default 4, or every block of a smaller model)")
    g.add_argument("--beam", type=int, default=1, help="sets kept per size (default 1: greedy)")
    g.add_argument("--direction", default="forward", help="forward (default), backward or both")
    g.add_argument("--candidates", type=int, default=None,
                   help="search only the M blocks ranked best by --candidate-method (default: every block)")
    g.add_argument("--candidate-method", default="contribution", help="contribution (default), patch or attribution")
    g.add_argument("--search-steps", type=int, default=None,
                   help="sampling steps of the search's generations (default 6)")
    g.add_argument("--search-rank", default=None,
                   help="how each step ranks the blocks: gradient (default: conditional attribution ranks every "
                        "block, --verify best generated) or generation (every candidate set generated: the exact "
                        "greedy, blocks x max-k sets)")
    g.add_argument("--verify", type=int, default=None,
                   help="sets generated per step with --search-rank gradient (default 2)")
    g.add_argument("--gradient-steps", type=int, default=None,
                   help="denoising steps the attribution is measured at (default 2)")
    g.add_argument("--save-images", type=int, default=None, metavar="N",
                   help="after the search, generate (at --steps) the first N prompts' original image and each "
                        "searched set withheld, into OUT/images/ for `ditloc report OUT` (default: none)")
    retire(p, "--method", "--localize-method M (search, contribution, patch or attribution)")
    retire(p, "--rank", "--search-rank gradient|generation")
    retire(p, "--top-k", "--k N")
    retire(p, "--auto-k", "--k auto")
    p.set_defaults(check=check_localize, func=cmd_localize, lock=main_process_lock)

    p = sub.add_parser("intervene", help="generate with the concept withheld from / injected into blocks")
    add_common(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--clean-prompt", default=None, help="default: the prompt with the concept removed")
    p.add_argument("--blocks", default=None, help="comma-separated block names, e.g. block.3,block.7")
    p.add_argument("--k", type=k_value(), action=Once, default=None, metavar="N|auto",
                   help="with --localization: its K blocks (N, or auto: the smallest K that halves the concept's "
                        "presence on the search's curve; block scores: that holds half the positive score mass)")
    p.add_argument("--localization", default=None, help="a localization.json from `ditloc localize`")
    p.add_argument("--mode", choices=("withhold", "inject"), default="withhold")
    p.add_argument("--withhold-heads", default=None, metavar="H,H,...",
                   help="only these attention heads of each block, 0-based (default: every head; with --mode "
                        "inject, the heads the concept is injected into)")
    p.add_argument("--withhold-steps", default=None, metavar="T,T,...",
                   help="only at these denoising steps, 0-based, each below --steps (default: every step; with "
                        "--mode inject, the steps the concept is injected at)")
    retire(p, "--top-k", "--k N")
    retire(p, "--auto-k", "--k auto")
    p.set_defaults(check=check_intervene, func=cmd_intervene)


def check_localize(args) -> None:
    """Before the model loads (sets ``args.prompts``, and ``args.concept_prompts`` with --concepts-file)."""
    check_out_and_counts(args)
    check_run_settings(args)
    check_k(args)
    args.prompts = read_prompts(args)
    args.concept_prompts = None
    if args.concepts_file is None:
        if args.concept is None:
            fail("give --concept TEXT, or --concepts-file FILE with one concept a line")
        check_concept(args.prompts, args.concept, exact=False)
        return
    if args.concept is not None:
        fail("give --concept or --concepts-file, not both")
    if args.localize_method != "search":
        fail("--concepts-file searches each concept; use it with --localize-method search (the default)")
    if args.clean_prompt is not None or isinstance(args.k, int):
        fail("--clean-prompt and --k N apply to one concept; with --concepts-file each concept's K comes from "
             "its curve (--k auto)")
    args.concept_prompts = {c: [p for p in args.prompts if _words(c) <= _words(p)] for c in _read_concepts(args)}
    for concept, prompts in args.concept_prompts.items():
        if not prompts:
            fail(f"concept {concept!r} of {args.concepts_file} is in none of the prompts; add a prompt that contains it")


def _read_concepts(args) -> list[str]:
    try:
        text = Path(args.concepts_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read concepts file {args.concepts_file!r}: {e.strerror if isinstance(e, OSError) else e}")
    concepts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not concepts:
        fail(f"{args.concepts_file} lists no concept; write one a line")
    twice = [c for c in concepts if concepts.count(c) > 1]
    if twice:
        fail(f"concept {twice[0]!r} is listed twice in {args.concepts_file}")
    return concepts


def check_intervene(args) -> None:
    """Before the model loads (sets ``args.prompts``)."""
    check_out_and_counts(args)
    check_run_settings(args)
    check_k(args)
    if args.blocks is not None:
        check_blocks_named(args.blocks)
    args.prompts = read_prompts(args)
    check_concept(args.prompts, args.concept, exact=False)
    args.heads = _index_list(args.withhold_heads, "--withhold-heads", "heads")
    args.withheld_steps = _index_list(args.withhold_steps, "--withhold-steps", "steps")
    if args.withheld_steps and max(args.withheld_steps) >= args.steps:
        fail(f"--withhold-steps {max(args.withheld_steps)} is out of range: the run has --steps {args.steps} "
             f"(0 ... {args.steps - 1})")


def _index_list(text: str | None, flag: str, what: str) -> list[int] | None:
    """A comma list of 0-based indices (None when the flag is not given)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        fail(f"{flag} is empty; name at least one of the {what}, e.g. {flag} 0,2")
    if not all(p.isdigit() for p in parts):
        fail(f"{flag} takes 0-based {what} as a comma list of whole numbers, e.g. {flag} 0,2; got {text!r}")
    return sorted({int(p) for p in parts})


def cmd_localize(args) -> None:
    from ..localization import localize

    prompts = args.prompts
    config = _search_config(args)
    if args.clean_prompt is not None:
        if args.localize_method == "contribution":
            fail("--clean-prompt is used by --localize-method patch, attribution or search only")
        if len(args.clean_prompt) != len(prompts):
            fail(f"got {len(args.clean_prompt)} --clean-prompt for {len(prompts)} prompts; give one per prompt")
    if args.block_batch is not None and args.block_batch < 1:
        fail(f"--block-batch must be at least 1, got {args.block_batch}")
    if args.concept_prompts is not None:
        return _localize_many(args, config)
    if config is not None:
        evaluator = _search_evaluator(args)
        _say_objective(args, evaluator)
        from ..processes import current, launched

        # under accelerate launch, each process generates its share of the search's sets on its own device
        device = str(current(args.device).device) if launched() else args.device
        pipe = models.load_pipeline(args.model, device=device, dtype=args.dtype, **models.source_kwargs(args))
        config = _fit_max_k(args, config, len(_adapter_for(pipe, args).block_names()))
        return _localize_search(args, pipe, config, evaluator)
    pipe = models.load_pipeline(args.model, device=args.device, dtype=args.dtype, **models.source_kwargs(args))
    _check_k(args, len(_adapter_for(pipe, args).block_names()))
    with _progress.bar(desc="localize", unit="step") as steps, \
            _progress.count_steps(pipe, steps, calls=math.ceil(len(prompts) / args.batch_size)):

        def progress(done: int, total: int) -> None:  # after each batch of prompts
            if _progress.showing():
                steps.set_postfix_str(f"{done}/{total} prompts")
            else:
                _progress.write(f"localize: {done}/{total} prompts")

        loc = localize(pipe, prompts, args.concept, method=args.localize_method, clean_prompts=args.clean_prompt,
                       seed=list(args.seeds), contribution_terms=args.contribution_terms, out_bias=args.out_bias,
                       batch_size=args.batch_size, block_batch=args.block_batch, options=run_options(args),
                       progress=progress)
    k = _record_k(args, loc)
    out = Path(args.out)
    path = loc.save(out / "localization.json")
    scores = dict(zip(loc.blocks, loc.scores.tolist()))
    shown = loc.ranking if k is None else loc.top(k)
    how = f"contribution terms {args.contribution_terms}" if args.localize_method == "contribution" else \
        "clean prompts " + ("given" if args.clean_prompt else "derived")
    print(f"concept {args.concept!r}: {len(prompts)} prompt(s) x {len(args.seeds)} seed(s), {args.steps} steps, "
          f"method {args.localize_method}, {how}" + (f", automatic K = {k}" if args.k == "auto" else ""))
    print(f"{'rank':>4}  {'block':<12} {'score':>10}")
    for r, b in enumerate(shown, 1):
        print(f"{r:>4}  {b:<12} {scores[b]:>10.4f}")
    print(f"wrote {path}")


def _adapter_for(pipe, args):
    from ..adapters import get_adapter

    return get_adapter(pipe, **adapter_options(args))


def _check_k(args, n_blocks: int) -> None:
    """--k N within the model's blocks (known once it loads)."""
    if isinstance(args.k, int) and not 1 <= args.k <= n_blocks:
        fail(f"--k must be between 1 and {n_blocks} (the number of blocks), got {args.k}")


def _record_k(args, loc) -> int | None:
    """The K --k chooses (auto: `Localization.k_auto`), recorded in the localization's settings."""
    if args.k is None:
        return None
    k = loc.k_auto() if args.k == "auto" else args.k
    loc.settings["k"] = k
    loc.settings["k_rule"] = "auto" if args.k == "auto" else "given"
    return k


#: the --localize-method search settings and their defaults
_SEARCH_FLAGS = {"objective": None, "evaluator": None, "evaluator_model": None, "eval_text": None, "max_k": None,
                 "beam": 1, "direction": "forward", "candidates": None, "candidate_method": "contribution",
                 "search_steps": None, "search_rank": None, "verify": None, "gradient_steps": None, "save_images": None}
#: the search flags whose SearchConfig field has another name
_SEARCH_FIELDS = {"search_rank": "rank"}


def _search_config(args):
    """The --localize-method search settings as a SearchConfig, checked before the model loads."""
    from ..localization import SearchConfig

    if args.localize_method != "search":
        given = [k for k, default in _SEARCH_FLAGS.items() if getattr(args, k) != default]
        if given:
            fail(f"--{given[0].replace('_', '-')} is a setting of --localize-method search")
        return None
    given = {_SEARCH_FIELDS.get(k, k): getattr(args, k) for k in ("search_steps", "search_rank", "verify",
                                                                  "gradient_steps")
             if getattr(args, k) is not None}
    blocks = models.count_blocks(args.model)
    max_k = args.max_k if args.max_k is not None else min(4, blocks or 4)
    config = SearchConfig(objective=args.objective, max_k=max_k, beam=args.beam, direction=args.direction,
                          candidates=args.candidates, candidate_method=args.candidate_method, **given)
    config.check(blocks)
    if args.search_rank == "gradient" and args.evaluator == "vlm":
        fail("--search-rank gradient differentiates the evaluator's presence and the vlm evaluator's answer is not "
             "differentiable; use --search-rank generation, or --evaluator clip")
    if args.objective == "self" and (args.evaluator or args.eval_text):
        fail("--evaluator/--eval-text score the evaluator objective; --objective self needs none")
    if args.evaluator is not None and args.evaluator not in ("toy", "clip", "vlm"):
        fail(f"unknown evaluator {args.evaluator!r}; use toy, clip or vlm")
    if not models.is_toy(args.model) and args.objective == "evaluator" and args.evaluator is None:
        fail("--objective evaluator needs --evaluator clip|vlm (with --evaluator-model) on this model")
    return config


def _search_evaluator(args):
    """The evaluator the search scores with (None: the model's default or the self objective); the
    evaluation text is checked here, before the model loads."""
    from ..evaluate import get_evaluator

    name = args.evaluator or ("toy" if models.is_toy(args.model) and args.objective != "self" else None)
    if name is None:
        return None
    kwargs = {"model": args.evaluator_model} if args.evaluator_model and name != "toy" else {}
    if name == "vlm":
        from ..bench import VLM_QUESTION

        kwargs["question"] = VLM_QUESTION
    evaluator = get_evaluator(name, **kwargs)
    evaluator.check_text(args.eval_text if args.eval_text is not None else args.concept)
    return evaluator


def _fit_max_k(args, config, n_blocks: int):
    """Without --max-k, a model of fewer than 4 blocks searches up to all of them; then the checks."""
    import dataclasses

    if args.max_k is None and config.max_k > n_blocks:
        config = dataclasses.replace(config, max_k=n_blocks)
    config.check(n_blocks)
    return config


def _say_objective(args, evaluator) -> None:
    """One line before the run, where the user did not choose the search's objective."""
    if args.objective is None and evaluator is None:
        print("search objective: self (the model judges itself; no evaluator for this model: "
              "--evaluator clip scores presence with CLIP)")
    elif args.objective is None:
        print(f"search objective: evaluator ({args.evaluator or 'toy'})")


def _localize_many(args, config) -> None:
    """--concepts-file: every concept searched on its own prompts with one loaded model, each into
    OUT/<concept>/ (its own checkpoint: a rerun resumes every concept)."""
    import copy

    from ..bench.plan import slugify
    from ..processes import current, launched

    jobs = []
    for concept, prompts in args.concept_prompts.items():  # every evaluator text checked before the model loads
        one = copy.copy(args)
        one.concept, one.prompts, one.out = concept, prompts, str(Path(args.out) / slugify(concept))
        jobs.append((one, _search_evaluator(one)))
    _say_objective(args, jobs[0][1])
    device = str(current(args.device).device) if launched() else args.device
    pipe = models.load_pipeline(args.model, device=device, dtype=args.dtype, **models.source_kwargs(args))
    config = _fit_max_k(args, config, len(_adapter_for(pipe, args).block_names()))
    for i, (one, evaluator) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {one.concept!r}: {len(one.prompts)} prompt(s) -> {one.out}")
        _localize_search(one, pipe, config, evaluator)


def _localize_search(args, pipe, config, evaluator) -> None:
    """`ditloc localize --localize-method search`: the curve, K from it, resumable from <out>/search.jsonl."""
    from ..localization import AUTO_K_DROP, localize
    from ..localization.search import checkpoint_generations

    out = Path(args.out)
    checkpoint = out / "search.jsonl"
    resumed = checkpoint_generations(checkpoint)  # (the lock is held: nobody else adds to it)
    _check_k(args, len(_adapter_for(pipe, args).block_names()))
    with _progress.bar(desc="search", unit="set") as bar:
        def progress(done: int, total: int) -> None:  # after each evaluated block set
            bar.total = total
            bar.n = done
            bar.refresh()
            if not _progress.showing():
                _progress.write(f"search: {done}/{total} block sets")

        loc = localize(pipe, args.prompts, args.concept, method="search", search=config, evaluator=evaluator,
                       eval_text=args.eval_text, clean_prompts=args.clean_prompt, seed=list(args.seeds),
                       batch_size=args.batch_size, block_batch=args.block_batch, options=run_options(args),
                       checkpoint=checkpoint, progress=progress)
    from ..processes import current

    if not current().is_main:  # the main process writes and prints
        return
    s = loc.search
    auto = s.k_for_drop(AUTO_K_DROP)
    _record_k(args, loc)
    path = loc.save(out / "localization.json")
    cost = s.cost
    print(f"concept {args.concept!r}: {len(args.prompts)} prompt(s) x {len(loc.settings['seeds'])} seed(s), objective "
          f"{s.objective}, {cost['search_steps']} steps; {cost['sets_evaluated']} block sets evaluated "
          f"({cost['generations'] - resumed} generated now, {cost['generations']} in all, {cost['seconds']:.0f}s)")
    print(f"presence unedited {s.baseline:.3f}")
    print(f"{'K':>2}  {'presence':>8} {'drop':>6} {'relative':>8}  blocks")
    for k, (blocks, p, rel) in enumerate(zip(s.sets, s.presence, s.relative_curve), 1):
        mark = " <- K" if k == auto else ""
        print(f"{k:>2}  {p:>8.3f} {s.baseline - p:>6.3f} {rel:>8.2f}  {', '.join(blocks)}{mark}")
    if auto is None:
        hint = ("; a concept that several blocks hold redundantly, each alone removing ~0, may need --direction both, "
                "which also eliminates backward from every block withheld" if config.direction == "forward" else "")
        print(f"automatic K: none up to {s.max_k} halves presence (raise --max-k, or the knowledge is spread "
              f"wider{hint})")
    else:
        print(f"automatic K = {auto} (the smallest K whose set halves presence)")
    print(f"wrote {path}")
    if args.save_images is not None:
        from ..report.search_images import save_search_images

        n = min(args.save_images, len(args.prompts))
        images = save_search_images(pipe, loc, out, n, clean_prompts=args.clean_prompt, options=run_options(args))
        print(f"wrote {images} ({n} prompt(s): original and {s.max_k} searched set(s) withheld, {args.steps} steps)")


def cmd_intervene(args) -> None:
    from .._io import write_json
    from ..errors import DitlocError
    from ..intervene import derive_clean_prompt, generate
    from ..localization import Localization
    from ..scope import Scope

    if (args.blocks is None) == (args.k is None):
        fail("give either --blocks NAMES or --k N|auto with --localization FILE")
    if args.k is not None and not args.localization:
        fail(f"--k {args.k} needs --localization FILE (from `ditloc localize`)")
    loc = Localization.load(args.localization) if args.localization else None
    pipe = models.load_pipeline(args.model, device=args.device, dtype=args.dtype, **models.source_kwargs(args))
    adapter = _adapter_for(pipe, args)
    if loc is not None and list(loc.blocks) != adapter.block_names():
        raise DitlocError(f"{args.localization} was measured on a model with other blocks; localize this model first")
    k = loc.k_auto() if args.k == "auto" else args.k
    blocks = adapter.resolve_blocks(args.blocks) if args.blocks is not None else loc.top(k)
    if args.blocks is not None and not blocks:
        fail("--blocks is empty; name at least one block, e.g. --blocks block.3")
    Scope.resolve(adapter, args.mode, blocks, heads=args.heads, steps=args.withheld_steps)  # heads in range
    clean = args.clean_prompt or derive_clean_prompt(args.prompt, args.concept)
    seeds = list(args.seeds)
    common = {"seed": seeds, "options": run_options(args)}
    original = generate(pipe, args.prompt, **common)  # one image per seed
    key = "withhold" if args.mode == "withhold" else "inject"
    intervened = generate(pipe, args.prompt, concept=args.concept, clean_prompts=[clean], heads=args.heads,
                          steps=args.withheld_steps, **{key: blocks}, **common)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # one seed: original.png and intervened.png; several: one pair per seed, named by it
    names = [("original.png", "intervened.png")] if len(seeds) == 1 else \
        [(f"original_seed{s}.png", f"intervened_seed{s}.png") for s in seeds]
    for (a, b), x, y in zip(names, original, intervened):
        x.save(out / a)
        y.save(out / b)
    record = {
        "prompt": args.prompt,
        "concept": args.concept,
        "clean_prompt": clean,
        "mode": args.mode,
        "blocks": blocks,
        "heads": args.heads,
        "steps": args.withheld_steps,
        "localization": args.localization,
        "k": k,
        "k_rule": None if args.k is None else "auto" if args.k == "auto" else "given",
        "model": args.model,
        "variant": args.variant,
        "revision": args.revision,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "seeds": seeds,
        "images": [{"seed": s, "original": a, "intervened": b} for s, (a, b) in zip(seeds, names)],
        "max_sequence_length": args.max_sequence_length,
        "adapter_options": adapter_options(args),
        "device": args.device,
        "dtype": args.dtype,
    }
    write_json(out / "intervention.json", record)
    where = "".join([f" (heads {','.join(map(str, args.heads))})" if args.heads is not None else "",
                     f" at steps {','.join(map(str, args.withheld_steps))}" if args.withheld_steps is not None else ""])
    print(f"{args.mode} {args.concept!r} in {', '.join(blocks)}{where}; clean prompt {clean!r}; {len(seeds)} seed(s)")
    files = [f for pair in names for f in pair]
    shown = ", ".join(str(out / f) for f in files) if len(files) <= 4 else f"{len(files)} images in {out}"
    print(f"wrote {shown}, {out / 'intervention.json'}")
