"""`ditloc personalize` (teach a subject) and `ditloc unlearn` (forget a concept), each in the localized
blocks only."""

from __future__ import annotations

import os
from pathlib import Path

from . import models
from .edit_setup import edit_setup, train_device
from .common import (
    DTYPES,
    LOCALIZE_METHODS,
    SEED,
    Once,
    add_adapter_option,
    add_model_source,
    add_pipeline_args,
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
    seed_list,
)


def add_parsers(sub) -> None:
    p = sub.add_parser("personalize", help="teach a new subject (DreamBooth-style LoRA) in the localized blocks only")
    p.add_argument("--images", required=True, help="folder of RGB training images at the model's resolution")
    p.add_argument("--token", required=True, help="rare word to bind the subject to (e.g. sks)")
    p.add_argument("--class-word", required=True, help="the subject's class (e.g. dog)")
    p.add_argument("--instance-prompt", default="a {token} {class_word}")
    p.add_argument("--captions", action="store_true",
                   help="train each image on its own caption, read from the .txt file of the same name "
                        "(each caption contains --token); default: --instance-prompt for every image")
    p.add_argument("--prior-preservation", action="store_true", help="also fit the frozen model's class images")
    p.add_argument("--num-class-images", type=int, default=16)
    p.add_argument("--class-prompt", action="append", default=None, metavar="PROMPT",
                   help="prior preservation: a class prompt without the token (repeatable; default: the "
                        "instance prompt, or the captions, without the token)")
    p.add_argument("--prior-weight", type=float, default=1.0,
                   help="prior preservation: weight of the class images' loss (default 1)")
    p.add_argument("--prior-target", choices=("noise", "teacher"), default="noise",
                   help="prior preservation: fit the class images to the noise (DreamBooth, default) or to "
                        "the frozen model's own prediction (stronger preservation, one extra forward a step)")
    p.add_argument("--category", default=None,
                   help="with --blocks auto: localize the class word on this probe category's prompts")
    p.add_argument("--probes", default="lock", help="probe set for --category: lock, toy or a file")
    _add_edit_args(p, method={"choices": ("lora", "full"), "default": "lora"}, rules=("auto",),
                   k_help="blocks to edit with --blocks auto or a localization: N, or auto (default: the smallest K "
                          "that halves the concept's presence on the search's curve; block scores: that holds half "
                          "the positive score mass)")
    p.set_defaults(check=check_personalize, func=cmd_personalize, lock=main_process_lock)

    p = sub.add_parser("unlearn", help="make the model forget concepts (concept ablation) in their localized blocks "
                                       "only")
    p.add_argument("--concept", action="append", default=None,
                   help="the words to forget, as they appear in the prompts (repeatable: one edit erases all)")
    p.add_argument("--anchor", action="append", default=None,
                   help="what prompts with the concept should show instead (e.g. 'a dog'); one per --concept, "
                        "or one for all; with --concepts-file, the default anchor")
    p.add_argument("--concepts-file", default=None,
                   help="text file, one concept[=anchor] a line (# comments; no '=': the --anchor default)")
    p.add_argument("--prompt", action="append", help="a training prompt containing a concept (repeatable; each "
                                                     "is used for every concept it contains)")
    p.add_argument("--prompts-file", help="text file, one training prompt per line")
    p.add_argument("--images-per-prompt", type=int, default=None,
                   help="anchor images drawn per prompt (default 4); with --robust, images of the concept (default 2)")
    p.add_argument("--preserve", action="append", default=None, metavar="PROMPT",
                   help="a prompt to keep as it is (repeatable); closed-form: its text states must not change; "
                        "with --preserve-target teacher: its prediction stays the frozen model's (default: the "
                        "anchor prompts and the concepts' probe-set neighbours)")
    p.add_argument("--preserve-file", default=None, help="text file, one prompt to preserve per line")
    p.add_argument("--preserve-weight", type=float, default=1.0,
                   help="weight of the preservation term (closed-form: lambda; teacher: its loss weight; default 1)")
    p.add_argument("--preserve-mode", choices=("weighted", "nullspace"), default="weighted",
                   help="closed-form: weighted least squares (default) or an edit confined to the directions the "
                        "preserved text states do not span (they cannot change)")
    p.add_argument("--preserve-target", choices=("teacher",), default=None,
                   help="lora/full: also fit the preserved prompts to the frozen model's prediction")
    p.add_argument("--no-lora-export", action="store_true",
                   help="closed-form: do not also save the edit as a low-rank LoRA file")
    p.add_argument("--ridge", type=float, default=1e-3,
                   help="closed-form: pull toward the original weights (mu, relative; default 1e-3)")
    p.add_argument("--positions", choices=("all", "changed"), default="all",
                   help="closed-form: edit every aligned token (default) or only the changed ones")
    p.add_argument("--pooled-edit", action="store_true",
                   help="closed-form, FLUX/SD3: also solve the pooled text vector's projection, which reaches every "
                        "block past its text tokens (one shared map: this part is not localized)")
    p.add_argument("--gap-fraction", type=float, default=None,
                   help="with --k gap: share of the best gap reduction the chosen K must reach (default 0.9)")
    p.add_argument("--robust", action="store_true",
                   help="train the erasure against an attacker (adversarial LoRA): every step an inner attack "
                        "optimizes the concept's text states to bring it back and the blocks learn to draw the "
                        "anchor anyway; holds under textual inversion and optimized conditioning, where a plain "
                        "erasure only hides the concept's word; with --blocks auto every block, unless --k N "
                        "(see docs/editing.md)")
    p.add_argument("--attack-steps", type=int, default=None,
                   help="with --robust: the inner attacker's steps per training step (default 3)")
    _add_edit_args(p, method={"choices": ("lora", "full", "closed-form"), "default": "lora",
                              "help": "lora / full: train; closed-form: solve the blocks' text key/value "
                                      "projections (no training, seconds)"}, rules=("auto", "gap"),
                   k_help="blocks to edit with --blocks auto or a localization: N; auto (default: the smallest "
                          "searched set that removes 90%% of the concept's presence, every editable block where "
                          "none does); or gap (--edit-method closed-form, one concept: solve every editable block, "
                          "keep the smallest top K whose edit closes --gap-fraction of the best reduction of the gap "
                          "between the prompts' and the anchors' predictions)")
    retire(p, "--auto-k", "--k gap (the closed-form edit's measured K; --k auto is the erasure rule)")
    retire(p, "--auto-k-fraction", "--gap-fraction F (with --k gap)")
    p.set_defaults(check=check_unlearn, func=cmd_unlearn, lock=main_process_lock)


def _add_edit_args(p, *, method: dict, rules: tuple[str, ...], k_help: str) -> None:
    """The block choice (`rules`: the names --k takes besides N), edit method (`method`: its add_argument
    settings), training and sampling flags both share."""
    p.add_argument("model", metavar="MODEL", help="diffusers pipeline directory, hub id, 'toy' or 'toy-flux'")
    add_model_source(p)
    p.add_argument("--blocks", default="auto",
                   help="auto (localize, then --k blocks), a localization.json from `ditloc localize` (search "
                        "once, edit many times), all, or block.3,block.7")
    p.add_argument("--k", type=k_value(rules), action=Once, default="auto", metavar="N|" + "|".join(rules),
                   help=k_help)
    p.add_argument("--localize-method", choices=LOCALIZE_METHODS,
                   default="search",
                   help="how --blocks auto localizes (default search: block sets by their effect on the "
                        "concept's presence, the best method on the toy ground truth; see docs/recipes.md)")
    g = p.add_argument_group("the search of --blocks auto (--localize-method search)")
    g.add_argument("--objective", default=None,
                   help="evaluator (soft presence by --evaluator; the default where the model has one, as the toy "
                        "models' oracle) or self (the model judges itself; the default elsewhere)")
    g.add_argument("--evaluator", default=None,
                   help="toy, clip or vlm: the objective's evaluator (default: the model's own, toy on the toy models)")
    g.add_argument("--evaluator-model", default=None, help="the CLIP / VLM checkpoint (a local path or cached id)")
    g.add_argument("--eval-text", default=None,
                   help="what the evaluator looks for (default: the concept, or the class word; one concept only)")
    p.add_argument("--edit-method", **method)
    p.add_argument("--lora-rank", type=int, default=None,
                   help="rank of the LoRA adapters (default 4; 8 with unlearn --robust)")
    p.add_argument("--lora-modules", default=None,
                   help="LoRA targets inside each chosen block, comma-separated (e.g. attn2.to_k,attn2.to_v: "
                        "the text keys/values only); default: every attention projection and the MLP")
    p.add_argument("--train-steps", type=int, default=None,
                   help="optimizer steps (default 200; 150 with unlearn --robust)")
    p.add_argument("--lr", type=float, default=None,
                   help="default 1e-4 (lora) / 1e-5 (full); 1e-3 with unlearn --robust")
    p.add_argument("--batch-size", type=int, default=4,
                   help="rows per step (default 4); under accelerate launch, per process")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                   help="bf16: float32 trainable weights and optimizer state over bfloat16 base weights, "
                        "bf16 autocast (default: accelerate launch's --mixed_precision, else no; fp16 is refused)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--steps", type=int, default=None, help="sampling steps for localization/anchor images")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's; FLUX base models: true_cfg_scale)")
    add_adapter_option(p)
    add_pipeline_args(p)
    p.add_argument("--seeds", type=seed_list, action=Once, default=(0, 1), metavar="S,S,...",
                   help="seeds of the localization --blocks auto runs (default 0,1); the first also seeds the edit "
                        "(LoRA initialization, noise and timestep draws, anchor and class images)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--out", required=True, help="output directory (checkpoints here; rerun to resume)")
    retire(p, "--seed", SEED)
    retire(p, "--method", "--edit-method " + "|".join(method["choices"]))
    retire(p, "--rank", "--lora-rank R")


# --- checks before the model loads -------------------------------------------------------------------------------

def check_personalize(args) -> None:
    """Before the model loads (sets ``args.caption_texts`` and resolves ``args.mixed_precision``)."""
    _check_blocks_and_settings(args)
    from ..edit.data import image_files, read_captions
    from ..edit.jobs import check_personalize_prompts

    files = image_files(args.images)
    args.caption_texts = read_captions(args.images) if args.captions else None
    if args.class_prompt is not None and not args.prior_preservation:
        fail("--class-prompt is used by --prior-preservation; pass it too")
    check_personalize_prompts(args.token.strip(), len(files), args.caption_texts, args.class_prompt,
                              args.prior_weight, args.prior_target)
    _check_training(args)


def check_unlearn(args) -> None:
    """Before the model loads (sets ``args.pairs``, ``args.prompts`` where prompts are given, and resolves
    ``args.mixed_precision``)."""
    _check_blocks_and_settings(args)
    args.pairs = _concept_pairs(args)
    if args.prompt or args.prompts_file:
        args.prompts = read_prompts(args)
        if len(args.pairs) == 1:
            check_concept(args.prompts, args.pairs[0][0], exact=True)
    from ..edit.concepts import plan_erasures

    gap = args.k == "gap"
    if gap and args.edit_method != "closed-form":
        fail("--k gap works with --edit-method closed-form: it measures each K's edit (or use --k auto)")
    if args.gap_fraction is not None and not gap:
        fail("--gap-fraction is the share of the best gap reduction --k gap asks for; pass --k gap too")
    if args.pooled_edit and args.edit_method != "closed-form":
        fail("--pooled-edit works with --edit-method closed-form; lora and full train the chosen blocks only")
    if gap and args.blocks != "auto":
        fail("--k gap ranks the blocks by a localization; pass --blocks auto")
    if args.eval_text is not None and len(args.pairs) > 1:
        fail("--eval-text names what the evaluator looks for in one concept; with several concepts leave it out "
             "(each concept is scored by its own text)")
    if gap and len(args.pairs) > 1:
        fail("--k gap measures one concept's edit; with several concepts use --k auto (each concept's K from its "
             "localization)")
    if args.blocks.endswith(".json") and len(args.pairs) > 1:
        fail("a localization file holds one concept; with several concepts pass --blocks auto (each is "
             "localized and saved in --out) or block names")
    preserving = args.preserve is not None or args.preserve_file is not None
    if args.robust and args.edit_method == "closed-form":
        fail("--robust trains the erasure against an attacker; pass --edit-method lora (the default) or full, "
             "not closed-form")
    if args.attack_steps is not None and not args.robust:
        fail("--attack-steps sets the inner attacker of --robust; pass --robust too")
    if args.robust and args.preserve_target is not None:
        fail("--robust keeps the preserved prompts at the frozen model's prediction already; leave --preserve-target "
             "out")
    if args.attack_steps is not None and args.attack_steps < 1:
        fail(f"--attack-steps must be a positive integer (got {args.attack_steps})")
    if args.robust:
        args.preserve_target = "teacher"
    if args.edit_method == "closed-form" and args.preserve_target is not None:
        fail("--preserve-target applies to --edit-method lora or full; the closed form keeps the preserved prompts "
             "by its solve")
    if preserving and args.edit_method != "closed-form" and args.preserve_target is None:
        fail("--preserve/--preserve-file are used by --edit-method closed-form, or with --preserve-target teacher")
    if not args.preserve_weight >= 0:
        fail(f"--preserve-weight must be >= 0 (got {args.preserve_weight})")
    plan_erasures(args.pairs, getattr(args, "prompts", None))  # duplicates, anchors, concepts in no prompt
    _check_training(args)


def _concept_pairs(args) -> list[tuple[str, str]]:
    """(concept, anchor) pairs from --concept/--anchor or --concepts-file."""
    from ..edit.concepts import check_pairs, read_concepts_file

    concepts, anchors = args.concept or [], args.anchor or []
    if args.concepts_file is not None:
        if concepts:
            fail("pass the concepts either as --concept or in --concepts-file, not both")
        if len(anchors) > 1:
            fail("with --concepts-file, --anchor is the one default anchor; write the others as concept=anchor")
        pairs = read_concepts_file(args.concepts_file, anchors[0] if anchors else None)
    else:
        if not concepts:
            fail("pass --concept X --anchor Y (repeatable) or --concepts-file F")
        if not anchors:
            fail("pass --anchor 'what to show instead', e.g. 'a dog'")
        if len(anchors) not in (1, len(concepts)):
            fail(f"{len(concepts)} --concept for {len(anchors)} --anchor; give one --anchor per --concept, or one "
                 "for all")
        pairs = list(zip(concepts, anchors if len(anchors) == len(concepts) else anchors * len(concepts)))
    for c, a in pairs:
        if a is None:
            fail(f"no anchor for {c!r}; pass --anchor (the default) or write {c}=anchor in --concepts-file")
        if not c.strip():
            fail("--concept is empty; pass the words to forget")
    return check_pairs(pairs)


def _check_blocks_and_settings(args) -> None:
    """--out and the counts, --k, a --blocks localization file, the run settings and --blocks itself."""
    check_out_and_counts(args)
    if args.blocks.endswith(".json"):
        from ..localization import Localization

        Localization.load(args.blocks)  # a missing or broken file: one line, before the model loads
    check_run_settings(args)
    check_k(args)
    check_blocks_named(args.blocks, " (or auto, all)")
    _check_search_flags(args)


#: the settings of --blocks auto's search (how it scores presence)
_SEARCH_FLAGS = ("objective", "evaluator", "evaluator_model", "eval_text")


def _check_search_flags(args) -> None:
    """--objective, --evaluator, --evaluator-model and --eval-text, before the model loads (as `ditloc
    localize` checks them): they set how the search of --blocks auto scores the concept's presence."""
    given = [name for name in _SEARCH_FLAGS if getattr(args, name) is not None]
    if not given:
        return
    flag = "--" + given[0].replace("_", "-")
    if args.blocks != "auto":
        fail(f"{flag} sets how the search of --blocks auto scores presence; pass --blocks auto, or leave it out")
    if args.localize_method != "search":
        fail(f"{flag} is a setting of the search; pass --localize-method search (the default), or leave it out")
    if args.objective is not None and args.objective not in ("evaluator", "self"):
        fail(f"unknown objective {args.objective!r}; use evaluator or self")
    if args.objective == "self" and (args.evaluator or args.evaluator_model or args.eval_text):
        fail("--evaluator/--evaluator-model/--eval-text score the evaluator objective; --objective self needs none")
    if args.evaluator is not None and args.evaluator not in ("toy", "clip", "vlm"):
        fail(f"unknown evaluator {args.evaluator!r}; use toy, clip or vlm")
    if args.evaluator_model is not None and args.evaluator in (None, "toy"):
        fail("--evaluator-model is the checkpoint of --evaluator clip or vlm; pass one of them")
    if not models.is_toy(args.model) and args.evaluator is None:
        if args.objective == "evaluator":
            fail("--objective evaluator needs --evaluator clip|vlm (with --evaluator-model) on this model")
        if args.eval_text is not None:
            fail("--eval-text is what the evaluator looks for; pass --evaluator clip|vlm on this model")


def _check_training(args) -> None:
    """--lora-modules, then the launch and precision checks (resolves ``args.mixed_precision``)."""
    if args.lora_modules is not None:
        from ..edit import TrainConfig

        TrainConfig(method=args.edit_method, lora_modules=args.lora_modules)  # its checks: one line, exit 2
    from ..edit import precision
    from ..processes import launched

    if args.edit_method == "closed-form":
        if launched():
            fail("--edit-method closed-form runs in one process (seconds); run it without accelerate launch")
        if args.mixed_precision not in (None, "no"):
            fail("--mixed-precision applies to training (--edit-method lora or full), not to --edit-method "
                 "closed-form")
        args.mixed_precision = "no"
        return
    for engine in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):  # set by accelerate launch --use_fsdp etc.
        if os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true":
            fail(f"ditloc trains data-parallel (one whole model per process), not with {engine.lower()}; "
                 "launch without it (accelerate launch --multi_gpu)")
    if args.mixed_precision is None:  # accelerate launch --mixed_precision X exports it
        args.mixed_precision = (os.environ.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    precision.check_mode(args.mixed_precision)  # a DitlocError: one line, exit 2
    if args.mixed_precision == "bf16":
        if args.dtype == "float16":
            fail("--mixed-precision bf16 trains over bfloat16 (or float32) base weights; drop --dtype float16")
        precision.check_device(args.mixed_precision, train_device(args) or "cpu")


# --- the commands ----------------------------------------------------------------------------------------------

def cmd_personalize(args) -> None:
    from ..edit import personalize
    from ..errors import DitlocError

    common, device, dtype, main_process = edit_setup(args)
    if args.num_class_images < 1:
        raise DitlocError(f"--num-class-images must be >= 1 (got {args.num_class_images})")
    from ..edit.blocks import category_prompts

    loc_prompts = category_prompts(args.category, args.class_word, args.probes) if args.category else None
    concepts = [args.class_word.strip()]
    evaluator = _search_evaluator(args, concepts)
    pipe = models.load_pipeline(args.model, device=device, dtype=dtype, **models.source_kwargs(args))
    if main_process:
        _say_objective(args, pipe, concepts, evaluator)
    res = personalize(pipe, args.images, args.token, args.class_word, instance_prompt=args.instance_prompt,
                      localize_prompts=loc_prompts, captions=args.caption_texts, class_prompts=args.class_prompt,
                      prior_weight=args.prior_weight, prior_target=args.prior_target,
                      prior_preservation=args.prior_preservation, num_class_images=args.num_class_images,
                      evaluator=evaluator, **common)
    if main_process:
        _print_result(args, pipe, res)


def cmd_unlearn(args) -> None:
    from ..edit import unlearn
    from ..errors import DitlocError

    common, device, dtype, main_process = edit_setup(args)
    prompts = getattr(args, "prompts", None)
    if args.images_per_prompt is not None and args.images_per_prompt < 1:
        raise DitlocError(f"--images-per-prompt must be >= 1 (got {args.images_per_prompt})")
    preserve = _preserve_prompts(args)
    concepts = [c for c, _ in args.pairs]
    evaluator = _search_evaluator(args, concepts)
    pipe = models.load_pipeline(args.model, device=device, dtype=dtype, **models.source_kwargs(args))
    if main_process:
        _say_objective(args, pipe, concepts, evaluator)
    res = unlearn(pipe, concepts=args.pairs, prompts=prompts, images_per_prompt=args.images_per_prompt or 4,
                  preserve=preserve, preserve_target=args.preserve_target, preserve_weight=args.preserve_weight,
                  evaluator=evaluator, **common)
    if main_process:
        _print_result(args, pipe, res)


def _search_evaluator(args, concepts: list[str]):
    """The evaluator the search of --blocks auto scores with: --evaluator, or the toy oracle for
    --objective evaluator on a toy model (None: the search decides, `search_objective`). Each
    concept's text is checked here, before the model loads."""
    from ..evaluate import get_evaluator

    name = args.evaluator or ("toy" if models.is_toy(args.model) and args.objective == "evaluator" else None)
    if name is None:
        return None
    kwargs = {"model": args.evaluator_model} if args.evaluator_model else {}
    if name == "vlm":
        from ..bench import VLM_QUESTION

        kwargs["question"] = VLM_QUESTION
    evaluator = get_evaluator(name, **kwargs)
    for concept in concepts:
        evaluator.check_text(args.eval_text if args.eval_text is not None else concept)
    return evaluator


def _say_objective(args, pipe, concepts: list[str], evaluator) -> None:
    """One line before the run, where the user did not choose: the objective the search of --blocks
    auto scores presence with (as `ditloc localize` says it), so a fall-back to self is never silent."""
    if args.blocks != "auto" or args.localize_method != "search" or args.objective is not None:
        return
    from ..edit.blocks import search_objective
    from ..localization import default_evaluator

    chosen = [search_objective(pipe, c, evaluator=evaluator, eval_text=args.eval_text) for c in concepts]
    scored = [c for c, (objective, _) in zip(concepts, chosen) if objective == "evaluator"]
    judged = [c for c in concepts if c not in scored]
    own = evaluator if evaluator is not None else default_evaluator(pipe)
    kind = getattr(own, "kind", type(own).__name__)
    parts = []
    if scored:
        parts.append(f"evaluator ({kind})" + (f" for {', '.join(map(repr, scored))}" if judged else ""))
    if judged:
        which = f" for {', '.join(map(repr, judged))}" if scored else ""
        why = ("no evaluator for this model: --evaluator clip scores presence with CLIP" if own is None else
               f"the {kind} evaluator cannot score {', '.join(map(repr, judged))}"
               + ("; --eval-text names what it looks for" if len(concepts) == 1 else ""))
        parts.append(f"self (the model judges itself{which}; {why})")
    print("search objective: " + "; ".join(parts))


def _preserve_prompts(args) -> list[str] | None:
    """--preserve and --preserve-file as one list (None: neither given); `unlearn` checks the prompts."""
    if args.preserve is None and args.preserve_file is None:
        return None
    given = list(args.preserve or [])
    if args.preserve_file is not None:
        path = Path(args.preserve_file)
        if not path.is_file():
            fail(f"--preserve-file {path} is not a file")
        given += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not given:  # before the model loads
        from ..edit.jobs import EMPTY_PRESERVE

        fail(EMPTY_PRESERVE)
    return given


def _print_result(args, pipe, res) -> None:
    mem = f", peak {res.peak_memory_bytes / 2**20:.0f} MiB" if res.peak_memory_bytes else ""
    concepts = res.details.get("concepts") or []
    if len(concepts) > 1:
        for c in concepts:
            drop = f", presence drop {c['presence_drop']:.0%}" if "presence_drop" in c else ""
            print(f"  {c['concept']!r} -> {c['anchor']!r}: {', '.join(c['blocks'])}{drop}")
    if res.config.get("method") == "closed-form":
        n = len(res.config["projections"])
        where = ", ".join(res.blocks) + (" and the pooled projection" if res.config.get("pooled") else "")
        print(f"unlearn: closed-form edit of {n} projection(s) in {where} for {len(concepts)} "
              f"concept(s) ({res.trainable_parameters:,} of {res.total_parameters:,} parameters), "
              f"{res.wall_seconds:.1f}s{mem}")
        export = res.details.get("lora_export")
        lora = ""
        if export and hasattr(pipe, "load_lora_weights"):
            ranks = sorted({r["rank"] for r in export.values()})
            lora = (f"; also a LoRA of ranks {ranks[0]}-{ranks[-1]} (relative error <= "
                    f"{max(r['error'] for r in export.values()):.1e}): pipe.load_lora_weights(OUT)")
        print(f"wrote {args.out} (load with ditloc.edit.load_edit(pipe, OUT){lora})")
        return
    print(f"{res.kind}: trained {res.trainable_parameters:,} of {res.total_parameters:,} parameters in "
          f"{', '.join(res.blocks)}; {res.steps} steps, {res.wall_seconds:.1f}s{mem}; final loss {res.losses[-1]:.4f}")
    how = "pipe.load_lora_weights(OUT) or " if hasattr(pipe, "load_lora_weights") and args.edit_method == "lora" else ""
    print(f"wrote {args.out} (load with {how}ditloc.edit.load_edit(pipe, OUT))")
