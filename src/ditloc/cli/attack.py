"""`ditloc attack`: white-box attacks on an erasure, judged by the evaluator, beside the unedited model
and the plain prompt; `--replay OUT` regenerates and re-scores a finished attack."""

from __future__ import annotations

import json
from pathlib import Path

from .. import _progress
from . import models
from .common import (
    DTYPES,
    add_adapter_option,
    add_pipeline_args,
    check_out_and_counts,
    check_run_settings,
    SEED,
    fail,
    main_process_lock,
    retire,
    run_options,
    seed_list,
)


def add_parsers(sub) -> None:
    from ..attacks import KINDS, MODES

    p = sub.add_parser("attack", help="attack an erasure (prompts, tokens, textual inversion, text states) and "
                                      "score the concept's return")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="diffusers pipeline directory, hub id, 'toy' or 'toy-flux' (the unedited model)")
    p.add_argument("--edit", default=None, help="the --out folder of `ditloc unlearn` (default: attack MODEL as is)")
    p.add_argument("--concept", default=None, help="the erased concept, as the edit names it")
    p.add_argument("--attack", choices=KINDS, default=None,
                   help="prompts (probe-set templates and --prompts-file), tokens (UnlearnDiffAtk-style discrete "
                        "tokens), inversion (a learned token embedding) or conditioning (the concept's text states)")
    p.add_argument("--images", default=None,
                   help="folder of images of the concept at the model's size (default: drawn by the unedited model)")
    p.add_argument("--captions", action="store_true",
                   help="fit each image of --images with its caption, the .txt file of the same name (each with the "
                        "concept); default: random training prompts")
    p.add_argument("--prompts-file", default=None, help="text file, one prompt with the concept per line (# comments)")
    g = p.add_argument_group("budget")
    g.add_argument("--budget-steps", type=int, default=None,
                   help="optimizer steps (default: tokens 200, inversion 200, conditioning 100)")
    g.add_argument("--n-images", type=int, default=64, help="held-out generations per table cell (default 64)")
    g.add_argument("--train-images", type=int, default=16,
                   help="images of the concept the optimized attacks fit (default 16; with --images: the folder's)")
    g.add_argument("--batch-size", type=int, default=4, help="noisy images per optimizer step (default 4)")
    g.add_argument("--lr", type=float, default=None,
                   help="Adam's rate, relative to the scale of what is learned (default: tokens 1.0, inversion "
                        "0.2, conditioning 0.05)")
    g.add_argument("--tokens", type=int, default=None, help="learned tokens (default: tokens 5, inversion 1)")
    g.add_argument("--mode", choices=MODES, default=None,
                   help="tokens: before the prompt (prefix, default) or in the concept's place (replace)")
    p.add_argument("--evaluator", default=None,
                   help="toy, clip or vlm (default: the model's own, the oracle on the toy models)")
    p.add_argument("--evaluator-model", default=None, help="the CLIP / VLM checkpoint (a local path or cached id)")
    p.add_argument("--eval-text", default=None,
                   help="what the evaluator looks for (default: the probe set's text for the concept, else it)")
    p.add_argument("--checkpoint-every", type=int, default=25, help="optimizer steps between checkpoints")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    p.add_argument("--max-sequence-length", type=int, default=None)
    add_adapter_option(p)
    add_pipeline_args(p)
    p.add_argument("--seeds", type=seed_list, default=(0,), metavar="S,S,...",
                   help="one seed: the base of the attack (optimizer, drawn images, held-out seeds; default 0); "
                        "several: the held-out generations' seeds")
    retire(p, "--seed", SEED)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1, mps (default: where the pipeline loads)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the pipeline's dtype (float64: replays and resumes repeat every pixel on any CPU)")
    p.add_argument("--out", default=None, help="output directory (checkpoints here; rerun to resume)")
    p.add_argument("--replay", default=None, metavar="OUT",
                   help="regenerate and re-score the finished attack in OUT (its model, edit and artifacts)")
    p.set_defaults(check=check_attack, func=cmd_attack, lock=main_process_lock)


#: flags a replay takes from its OUT (giving one is refused)
_REPLAYED = ("edit", "concept", "attack", "images", "prompts_file", "budget_steps", "lr", "tokens", "mode",
             "evaluator", "eval_text", "steps", "guidance", "max_sequence_length", "height", "width", "out")


# --- checks before the model loads -------------------------------------------------------------------------------

def check_attack(args) -> None:
    if args.replay is not None:
        return _check_replay(args)
    for name, flag in (("model", "MODEL"), ("concept", "--concept"), ("attack", "--attack"), ("out", "--out")):
        if getattr(args, name) is None:
            fail(f"pass {flag} (or --replay OUT to repeat a finished attack)")
    check_out_and_counts(args)
    check_run_settings(args)
    from ..attacks import AttackConfig, carriers, check_erased, check_image_folder, read_edit

    try:
        AttackConfig(kind=args.attack, steps=args.budget_steps, n_images=args.n_images,
                     train_images=args.train_images, batch_size=args.batch_size, lr=args.lr, tokens=args.tokens,
                     mode=args.mode, seed=0, checkpoint_every=args.checkpoint_every)
    except ValueError as e:
        fail(str(e))
    if args.images is not None and args.attack == "prompts":
        fail("--images are what the optimized attacks fit; the prompts attack uses none")
    if args.edit is not None:
        args.edit_info = read_edit(args.edit)
        check_erased(args.edit_info, args.concept)
    args.prompt_list = _read_prompts(args.prompts_file) if args.prompts_file else None
    if args.images is not None:
        check_image_folder(args.images, _native_size(args))
    if args.captions:
        if args.images is None:
            fail("--captions are the captions of --images; pass the folder too")
        from ..edit.data import read_captions
        from ..text import find_occurrences

        for i, caption in enumerate(read_captions(args.images)):
            if not find_occurrences(caption, args.concept):
                fail(f"caption {i + 1} ({caption!r}) does not contain the concept {args.concept!r}")
    from ..registry import known_models

    known = known_models().get(args.model) or known_models().get(_marker(args.model) or "")
    args.evaluator_obj = _evaluator(args)
    if args.evaluator_obj is None and known is not None and known.evaluator is not None:
        args.evaluator_obj = known.evaluator()  # the model's own (the toy oracle), checked here
    if args.evaluator_obj is None:
        fail("no evaluator for this model: pass --evaluator clip|vlm with --evaluator-model PATH")
    probes = known.probe_set if known is not None else "lock"
    default = carriers(probes, args.concept, args.prompt_list).eval_text
    args.evaluator_obj.check_text(args.eval_text if args.eval_text is not None else default or args.concept)


def _check_replay(args) -> None:
    given = [name for name in _REPLAYED if getattr(args, name, None) is not None]
    if given:
        fail(f"--replay takes every setting from its folder; leave out --{given[0].replace('_', '-')}")
    check_run_settings(args)
    path = Path(args.replay) / "attack.json"
    if not path.is_file():
        fail(f"{args.replay} holds no finished attack (attack.json); run `ditloc attack ... --out {args.replay}` "
             "to the end first")
    try:
        args.record = json.loads(path.read_text(encoding="utf-8"))
        note = args.record["settings"]["note"]
    except (OSError, ValueError, KeyError, TypeError):
        fail(f"{path} is not the record of `ditloc attack`")
    if args.model is None:
        args.model = note.get("model")
    if args.model is None:
        fail(f"{path} does not name its model; pass MODEL")
    args.evaluator, args.evaluator_model = note.get("evaluator"), args.evaluator_model or note.get("evaluator_model")
    args.evaluator_obj = _evaluator(args)
    if args.dtype is None:
        args.dtype = note.get("dtype")


def _read_prompts(path) -> list[str]:
    from ..errors import DitlocError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DitlocError(f"cannot read prompts file {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DitlocError(f"prompts file {path} holds no prompt; write one prompt with the concept per line")
    return prompts


def _evaluator(args):
    """--evaluator as an evaluator (None: the model's own, decided once it loads)."""
    from ..evaluate import get_evaluator

    if args.evaluator is None:
        if args.evaluator_model is not None:
            fail("--evaluator-model is the checkpoint of --evaluator clip or vlm; pass one of them")
        return None
    if args.evaluator not in ("toy", "clip", "vlm"):
        fail(f"unknown evaluator {args.evaluator!r}; use toy, clip or vlm")
    if args.evaluator_model is not None and args.evaluator == "toy":
        fail("--evaluator-model is the checkpoint of --evaluator clip or vlm; the toy oracle is built in")
    kwargs = {"model": args.evaluator_model} if args.evaluator_model else {}
    if args.evaluator == "vlm":
        from ..bench import VLM_QUESTION

        kwargs["question"] = VLM_QUESTION
    return get_evaluator(args.evaluator, **kwargs)


def _marker(model: str) -> str | None:
    """The known model a pipeline directory says it is (a copied or re-saved toy), read from its transformer's
    config without loading it."""
    from ..registry import MARKER

    try:
        config = json.loads((Path(models._toy_dir(model)).expanduser() / "transformer" / "config.json")
                            .read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get(MARKER) if isinstance(config, dict) else None


def _native_size(args) -> tuple[int, int] | None:
    """(height, width) MODEL generates, from its configs without loading it (None where they do not say)."""
    if args.height and args.width:
        return args.height, args.width
    if args.height or args.width:
        return None
    from ..registry import known_models

    known = known_models().get(args.model) or known_models().get(_marker(args.model) or "")
    if known is not None and known.call_defaults.get("height") and known.call_defaults.get("width"):
        return int(known.call_defaults["height"]), int(known.call_defaults["width"])
    root = Path(models._toy_dir(args.model)).expanduser()
    try:
        transformer = json.loads((root / "transformer" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((root / "vae" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    channels = vae.get("block_out_channels") or vae.get("encoder_block_out_channels")
    if not channels:
        return None
    scale = 2 ** (len(channels) - 1)
    sample = transformer.get("sample_size")
    if sample is None:
        if transformer.get("_class_name") != "FluxTransformer2DModel":
            return None
        sample = 128  # FluxPipeline's default_sample_size
    sample = sample if isinstance(sample, (list, tuple)) else (sample, sample)
    return int(sample[0]) * scale, int(sample[1]) * scale


# --- the command -------------------------------------------------------------------------------------------------

def cmd_attack(args) -> None:
    from ..attacks import attack, replay

    pipe = models.load_pipeline(args.model, device=args.device, dtype=args.dtype)
    if args.replay is not None:
        result = replay(pipe, args.replay, evaluator=args.evaluator_obj, progress=_progress.write)
        done = json.loads((Path(args.replay) / "replay.json").read_text(encoding="utf-8"))["replay"]
        _print(result)
        same = "equal to" if done["equal"] else f"differ (at most {done['max_score_difference']:.3g}) from"
        print(f"replayed {args.replay}: the scores are {same} the recorded ones; wrote {args.replay}/replay.json")
        return
    note = {"model": args.model, "evaluator": args.evaluator, "evaluator_model": args.evaluator_model,
            "dtype": args.dtype}
    result = attack(pipe, args.concept, edit=getattr(args, "edit_info", None), kind=args.attack,
                    steps=args.budget_steps, n_images=args.n_images, train_images=args.train_images,
                    batch_size=args.batch_size, lr=args.lr, tokens=args.tokens, mode=args.mode, images=args.images,
                    captions=True if args.captions else None,
                    prompts=args.prompt_list, seeds=args.seeds[0] if len(args.seeds) == 1 else list(args.seeds), evaluator=args.evaluator_obj,
                    eval_text=args.eval_text, checkpoint_every=args.checkpoint_every, out=args.out,
                    options=run_options(args), progress=_progress.write, note=note)
    _print(result)
    print(f"wrote {args.out}/attack.json and each model's adversarial.safetensors (ditloc attack --replay "
          f"{args.out} regenerates and re-scores them)")


def _print(result) -> None:
    print(f"{result.kind} attack on {result.concept!r}: presence ({result.settings['eval_text']!r}, share of "
          f"images the evaluator scores >= {result.cells[0].threshold}; 95% interval)")
    print(result.table())
