"""`ditloc` command line: parses, calls the public API, prints. No logic of its own."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from . import _progress

DTYPES = ("float32", "float16", "bfloat16")


def _fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"ditloc: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not the whole usage block."""

    def error(self, message: str) -> "NoReturn":  # noqa: F821
        _fail(f"{message} (see `{self.prog} --help`)")


#: commands a rerun resumes (they say so when interrupted)
RESUMABLE = ("bench", "ground-truth", "personalize", "unlearn")


def _check_out_dir(out) -> None:
    """An output directory must not be an existing file, nor lie under one (checked before any work)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        _fail(f"--out {out} is a file; pass a directory (it is created if missing)")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                _fail(f"--out {out} lies under {parent}, which is a file; pass a directory path")
            break


#: flags that take a count (at least 1), by argparse destination
COUNTS = {"steps": "--steps", "max_sequence_length": "--max-sequence-length", "batch_size": "--batch-size",
          "top_k": "--top-k", "num_class_images": "--num-class-images", "images_per_prompt": "--images-per-prompt",
          "max_k": "--max-k", "beam": "--beam", "candidates": "--candidates", "search_steps": "--search-steps"}
#: pipeline arguments ditloc sets itself, and the flag that sets each
OWN_PIPELINE_ARGS = {"prompt": "--prompt", "num_inference_steps": "--steps", "guidance_scale": "--guidance",
                     "max_sequence_length": "--max-sequence-length", "generator": "--seed",
                     "output_type": None, "callback_on_step_end": None}


def _check_args(args) -> None:
    """Every check that needs no model, run before one loads."""
    import torch

    out = getattr(args, "out", None)
    if out is not None and args.command != "report":
        _check_out_dir(out)
    for name, flag in COUNTS.items():
        value = getattr(args, name, None)
        if isinstance(value, int) and value < 1:
            _fail(f"{flag} must be at least 1, got {value}")
    if args.command in ("personalize", "unlearn") and args.k is not None and args.k < 1:
        _fail(f"--k must be at least 1, got {args.k}")
    if args.command in ("personalize", "unlearn") and args.blocks.endswith(".json"):
        from .localize import Localization

        Localization.load(args.blocks)  # a missing or broken file: one line, before the model loads
    if getattr(args, "device", None) is not None:
        try:
            torch.device(args.device)
        except (RuntimeError, ValueError):
            _fail(f"unknown device {args.device!r}; use e.g. cpu, cuda, cuda:1, mps")
    if hasattr(args, "pipeline_arg"):
        given = dict(args.pipeline_arg)
        for key in given:
            if key in OWN_PIPELINE_ARGS:
                flag = OWN_PIPELINE_ARGS[key]
                _fail(f"--pipeline-arg {key}: ditloc sets it itself" + (f"; use {flag}" if flag else ""))
            if key in ("height", "width") and getattr(args, key) is not None:
                _fail(f"--pipeline-arg {key} and --{key} both given; pass --{key} only")
        _pipeline_kwargs(args)  # --height / --width
    if getattr(args, "adapter_option", None):
        from .adapters import check_adapter_options

        check_adapter_options(_adapter_options(args), _transformer_class(args.model))
    for name in ("concept", "token", "class_word", "anchor"):
        value = getattr(args, name, None)
        if value is not None and not value.strip():
            _fail(f"--{name.replace('_', '-')} is empty")
    blocks = getattr(args, "blocks", None)
    if blocks is not None and not [b for b in blocks.split(",") if b.strip()]:
        _fail("--blocks is empty; name at least one block, e.g. --blocks block.3" +
              (" (or auto, all)" if args.command in ("personalize", "unlearn") else ""))
    if args.command in ("localize", "intervene") or (args.command == "unlearn" and (args.prompt or args.prompts_file)):
        args.prompts = _read_prompts(args)
        _check_concept(args.prompts, args.concept, exact=args.command == "unlearn")
    if args.command == "unlearn":
        from .text import find_occurrences

        if args.auto_k and args.method != "closed-form":
            _fail("--auto-k works with --method closed-form: it measures each K's edit")
        if args.auto_k and args.blocks != "auto":
            _fail("--auto-k ranks the blocks by a localization; pass --blocks auto")
        if (args.preserve is not None or args.preserve_file is not None) and args.method != "closed-form":
            _fail("--preserve/--preserve-file are used by --method closed-form only")
        if find_occurrences(args.anchor, args.concept):
            _fail(f"the anchor {args.anchor!r} contains the concept {args.concept!r}; the anchor is what to show "
                  "instead, without it")
    if args.command == "personalize":
        from .edit.data import image_files, read_captions
        from .edit.jobs import check_personalize_prompts

        files = image_files(args.images)
        args.caption_texts = read_captions(args.images) if args.captions else None
        if args.class_prompt is not None and not args.prior_preservation:
            _fail("--class-prompt is used by --prior-preservation; pass it too")
        check_personalize_prompts(args.token.strip(), len(files), args.caption_texts, args.class_prompt,
                                  args.prior_weight, args.prior_target)
    if args.command in ("personalize", "unlearn") and args.lora_modules is not None:
        from .edit import TrainConfig

        TrainConfig(method=args.method, lora_modules=args.lora_modules)  # its checks: one line, exit 2
    if args.command in ("personalize", "unlearn"):
        _check_training(args)


def _check_training(args) -> None:
    """Launch and precision checks of personalize/unlearn (resolves ``args.mixed_precision``)."""
    from .edit import precision
    from .edit.processes import launched

    if args.method == "closed-form":
        if launched():
            _fail("--method closed-form runs in one process (seconds); run it without accelerate launch")
        if args.mixed_precision not in (None, "no"):
            _fail("--mixed-precision applies to training (--method lora or full), not to --method closed-form")
        args.mixed_precision = "no"
        return
    for engine in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):  # set by accelerate launch --use_fsdp etc.
        if os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true":
            _fail(f"ditloc trains data-parallel (one whole model per process), not with {engine.lower()}; "
                  "launch without it (accelerate launch --multi_gpu)")
    if args.mixed_precision is None:  # accelerate launch --mixed_precision X exports it
        args.mixed_precision = (os.environ.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    precision.check_mode(args.mixed_precision)  # a DitlocError: one line, exit 2
    if args.mixed_precision == "bf16":
        if args.dtype == "float16":
            _fail("--mixed-precision bf16 trains over bfloat16 (or float32) base weights; drop --dtype float16")
        precision.check_device(args.mixed_precision, _train_device(args) or "cpu")


def _train_device(args) -> str | None:
    """Where training runs: --device (None: where the pipeline loads, the CPU); under accelerate
    launch, each process's own accelerator, or the CPU (gloo) with --device cpu or on a machine without one."""
    from .edit.processes import current, launched

    if not launched():
        return args.device
    procs = current(args.device)
    return str(procs.device)


def _words(text: str) -> set[str]:
    import re

    return set(re.findall(r"\w+", text.lower()))


def _check_concept(prompts: list[str], concept: str, *, exact: bool) -> None:
    """Each prompt must hold the concept. `exact`: as training finds it (`ditloc.text`); otherwise
    only its words, as the model may read the prompt cleaned (the adapter checks exactly later)."""
    from .text import find_occurrences

    for i, prompt in enumerate(prompts):
        if exact and not find_occurrences(prompt, concept):
            _fail(f"prompt {i + 1} ({prompt!r}) does not contain the concept {concept!r}")
        if not exact and not _words(concept) <= _words(prompt):
            _fail(f"concept {concept!r} is not in prompt {prompt!r}; use a prompt that contains it")


def _is_local(model: str) -> bool:
    """MODEL names a directory (not a hub id `owner/name`)."""
    return Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or model.count("/") != 1


def _transformer_class(model: str) -> str | None:
    """The transformer class MODEL declares in its model_index.json, read without loading the model
    (a hub id: from the local cache only, never the network); None where it cannot be read."""
    import json

    if model == "toy":
        from .toy import MODEL_DIR

        model = str(MODEL_DIR)
    try:
        if _is_local(model):
            index = json.loads((Path(model).expanduser() / "model_index.json").read_text(encoding="utf-8"))
        else:
            import warnings

            from diffusers import DiffusionPipeline

            with warnings.catch_warnings():  # huggingface_hub's deprecation notes would break the one error line
                warnings.simplefilter("ignore")
                index = DiffusionPipeline.load_config(model, local_files_only=True)
    except (OSError, ValueError):  # no such directory or file, not cached, not JSON: known after loading
        return None
    entry = index.get("transformer") if isinstance(index, dict) else None  # ["diffusers", "<class name>"]
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None


def load_pipeline(model: str, *, device: str | None = None, dtype: str | None = None):
    """A diffusers pipeline from `toy`, a local directory or a hub id (offline works from the cache)."""
    import torch

    from .errors import DitlocError

    torch_dtype = getattr(torch, dtype) if dtype else None
    if model == "toy":
        from .toy import load_pipeline as load_toy

        pipe = load_toy(torch_dtype=torch_dtype)
    else:
        from diffusers import DiffusionPipeline

        path = Path(model).expanduser()
        looks_local = _is_local(model)
        if looks_local and not path.is_dir():
            raise DitlocError(f"model directory {model!r} does not exist; give a diffusers pipeline directory, a hub id or 'toy'")
        try:
            kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
            pipe = DiffusionPipeline.from_pretrained(str(path) if looks_local else model, **kwargs)
        except (OSError, ValueError, EnvironmentError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = " (offline: download it first or point to a local directory)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise DitlocError(f"cannot load pipeline {model!r}: {first}{hint}") from None
    pipe.set_progress_bar_config(disable=True)  # ditloc prints its own progress
    if device:
        try:
            pipe = pipe.to(device)
        except (RuntimeError, AssertionError) as e:
            raise DitlocError(f"cannot move the pipeline to device {device!r}: {str(e).splitlines()[0]}") from None
    return pipe


def _read_prompts(args) -> list[str]:
    from .errors import DitlocError

    given = args.prompt if isinstance(args.prompt, list) else [args.prompt] if args.prompt is not None else []
    if any(not p.strip() for p in given):
        raise DitlocError("--prompt is empty; give the prompt's text")
    prompts = list(given)
    if getattr(args, "prompts_file", None):
        path = Path(args.prompts_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DitlocError(f"cannot read prompts file {str(path)!r}: {e.strerror if isinstance(e, OSError) else e}") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DitlocError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE (one prompt per line)")
    return prompts


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="diffusers pipeline directory, hub id, or 'toy'")
    p.add_argument("--concept", required=True, help="the concept's words as they appear in the prompt")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1, mps (default: where the pipeline loads)")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    _add_adapter_option(p)
    _add_pipeline_args(p)
    p.add_argument("--out", required=True, help="output directory")


def _add_adapter_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter-option", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="a model-family setting (repeatable), e.g. text_stream=t5; "
                        "an unknown key or value is refused, naming the valid ones")


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's native size)")
    p.add_argument("--pipeline-arg", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="any other argument of the pipeline call (repeatable; VALUE read as JSON when it parses, "
                        "e.g. clean_caption=false), checked against the pipeline's signature")


def _pipeline_kwargs(args) -> dict:
    import json

    kwargs = {}
    for key, value in getattr(args, "pipeline_arg", []):
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    for name in ("height", "width"):
        value = getattr(args, name, None)
        if value is not None:
            if value < 1:
                _fail(f"--{name} must be positive, got {value}")
            kwargs[name] = value
    return kwargs


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. text_stream=t5), got {text!r}")
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = _Parser(prog="ditloc", description="Localize, verify and edit knowledge in diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"ditloc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("localize", help="rank blocks for a concept (attention contribution, patch or attribution)")
    _add_common(p)
    p.add_argument("--prompt", action="append", help="a prompt containing the concept (repeatable)")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--method", choices=("contribution", "patch", "attribution", "search"), default="contribution",
                   help="contribution: where the concept is read (cheapest); patch: the effect of withholding each "
                        "block alone (1 + blocks forwards per step); attribution: its first-order estimate "
                        "(one backward pass per step); search: block *sets* by their effect on the concept's "
                        "presence (greedy, about blocks x max-k generations; resumable). Default contribution")
    p.add_argument("--clean-prompt", action="append", default=None,
                   help="patch/attribution: the clean prompt of each --prompt, in order (repeatable; default: the "
                        "prompt with the concept removed)")
    p.add_argument("--variant", choices=("attn", "attn_value", "attn_value_out"), default="attn_value_out",
                   help="contribution only: which part of the attention output is measured")
    p.add_argument("--out-bias", action="store_true", help="contribution only: add W_o's bias (authors' code)")
    p.add_argument("--top-k", type=int, default=None, help="also report the top K blocks")
    p.add_argument("--auto-k", action="store_true",
                   help="choose K from the scores (the smallest K holding half the positive score mass)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-batch", type=int, default=None,
                   help="patch: blocks withheld per extra forward; search: block sets per pipeline call")
    g = p.add_argument_group("set-level search (--method search)")
    g.add_argument("--objective", default=None,
                   help="evaluator (soft presence by --evaluator; the default on the toy model, whose oracle is "
                        "built in) or self (the model judges itself; the default elsewhere)")
    g.add_argument("--evaluator", default=None, help="toy, clip or vlm (the objective's evaluator; default toy on "
                                                   "the toy model)")
    g.add_argument("--evaluator-model", default=None, help="the CLIP / VLM checkpoint (a local path or cached id)")
    g.add_argument("--eval-text", default=None, help="what the evaluator looks for (default: the concept)")
    g.add_argument("--max-k", type=int, default=4, help="largest block set (default 4)")
    g.add_argument("--beam", type=int, default=1, help="sets kept per size (default 1: greedy)")
    g.add_argument("--direction", default="forward", help="forward (default), backward or both")
    g.add_argument("--candidates", type=int, default=None,
                   help="search only the M blocks ranked best by --candidate-method (default: every block)")
    g.add_argument("--candidate-method", default="contribution", help="contribution (default), patch or attribution")
    g.add_argument("--search-steps", type=int, default=None,
                   help="sampling steps of the search's generations (default: --steps)")

    p = sub.add_parser("intervene", help="generate with the concept withheld from / injected into blocks")
    _add_common(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--clean-prompt", default=None, help="default: the prompt with the concept removed")
    p.add_argument("--blocks", default=None, help="comma-separated block names, e.g. block.3,block.7")
    p.add_argument("--top-k", type=int, default=None, help="with --localization: use its top K blocks")
    p.add_argument("--auto-k", action="store_true", help="with --localization: its top K, K chosen from its scores")
    p.add_argument("--localization", default=None, help="a localization.json from `ditloc localize`")
    p.add_argument("--mode", choices=("withhold", "inject"), default="withhold")

    for name, help_ in (("personalize", "teach a new subject (DreamBooth-style LoRA) in the localized blocks only"),
                        ("unlearn", "make the model forget a concept (concept ablation) in the localized blocks only")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("model", metavar="MODEL", help="diffusers pipeline directory, hub id, or 'toy'")
        if name == "personalize":
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
        else:
            p.add_argument("--concept", required=True, help="the words to forget, as they appear in the prompts")
            p.add_argument("--anchor", required=True, help="what those prompts should show instead (e.g. 'a dog')")
            p.add_argument("--prompt", action="append", help="a training prompt containing the concept (repeatable)")
            p.add_argument("--prompts-file", help="text file, one training prompt per line")
            p.add_argument("--images-per-prompt", type=int, default=4, help="anchor images drawn per prompt")
            p.add_argument("--preserve", action="append", default=None, metavar="PROMPT",
                           help="closed-form: a prompt whose text states must not change (repeatable; "
                                "default: the anchor prompts)")
            p.add_argument("--preserve-file", default=None, help="closed-form: text file, one prompt to preserve per line")
            p.add_argument("--preserve-weight", type=float, default=1.0,
                           help="closed-form: weight of the preservation term (lambda, default 1)")
            p.add_argument("--ridge", type=float, default=1e-3,
                           help="closed-form: pull toward the original weights (mu, relative; default 1e-3)")
            p.add_argument("--positions", choices=("all", "changed"), default="all",
                           help="closed-form: edit every aligned token (default) or only the changed ones")
            p.add_argument("--auto-k", action="store_true",
                           help="closed-form with --blocks auto: solve every block, keep the smallest top K whose edit "
                                "closes --auto-k-fraction of the largest achievable gap reduction between the prompts' "
                                "and the anchors' predictions")
            p.add_argument("--auto-k-fraction", type=float, default=0.9,
                           help="with --auto-k: share of the best gap reduction the chosen K must reach (default 0.9)")
        p.add_argument("--blocks", default="auto",
                       help="auto (localize, then --k blocks), a localization.json from `ditloc localize` (search "
                            "once, edit many times), all, or block.3,block.7")
        p.add_argument("--k", type=int, default=None,
                       help="blocks to edit with --blocks auto or a localization (default: its own K: a search's "
                            "automatic K from its curve)")
        p.add_argument("--localize-method", choices=("search", "contribution", "patch", "attribution"),
                       default="search",
                       help="how --blocks auto localizes (default search: block sets by their effect on the "
                            "concept's presence, the best method on the toy ground truth; see docs/recipes.md)")
        if name == "unlearn":
            p.add_argument("--method", choices=("lora", "full", "closed-form"), default="lora",
                           help="lora / full: train; closed-form: solve the blocks' text key/value projections "
                                "(no training, seconds)")
        else:
            p.add_argument("--method", choices=("lora", "full"), default="lora")
        p.add_argument("--rank", type=int, default=4)
        p.add_argument("--lora-modules", default=None,
                       help="LoRA targets inside each chosen block, comma-separated (e.g. attn2.to_k,attn2.to_v: "
                            "the text keys/values only); default: every attention projection and the MLP")
        p.add_argument("--train-steps", type=int, default=200, help="optimizer steps (default 200)")
        p.add_argument("--lr", type=float, default=None, help="default 1e-4 (lora) / 1e-5 (full)")
        p.add_argument("--batch-size", type=int, default=4,
                       help="rows per step (default 4); under accelerate launch, per process")
        p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                       help="bf16: float32 trainable weights and optimizer state over bfloat16 base weights, "
                            "bf16 autocast (default: accelerate launch's --mixed_precision, else no; fp16 is refused)")
        p.add_argument("--gradient-checkpointing", action="store_true")
        p.add_argument("--checkpoint-every", type=int, default=50)
        p.add_argument("--steps", type=int, default=None, help="sampling steps for localization/anchor images")
        p.add_argument("--guidance", type=float, default=None)
        _add_adapter_option(p)
        _add_pipeline_args(p)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default=None)
        p.add_argument("--dtype", choices=DTYPES, default=None)
        p.add_argument("--out", required=True, help="output directory (checkpoints here; rerun to resume)")

    p = sub.add_parser("bench", help="causal benchmark over a probe set: presence vs K, top-K against random/bottom-K")
    p.add_argument("model", metavar="MODEL", help="diffusers pipeline directory, hub id, or 'toy'")
    p.add_argument("--probes", default="lock", help="lock, toy or a probe file (default lock)")
    p.add_argument("--categories", default=None, metavar="A,B",
                   help="comma-separated categories (default: all of the probe set)")
    p.add_argument("--concepts-per-category", type=int, default=None, metavar="N",
                   help="only the first N concepts of each")
    p.add_argument("--localization-prompts", type=int, default=None, metavar="N",
                   help="only the first N localization prompts")
    p.add_argument("--evaluation-prompts", type=int, default=None, metavar="N",
                   help="only the first N evaluation prompts")
    p.add_argument("--k", default="1,2,4,8", metavar="K,K,...", help="numbers of blocks to withhold (default 1,2,4,8)")
    p.add_argument("--seeds", default="0,1,2", metavar="S,S,...", help="evaluation seeds (default 0,1,2)")
    p.add_argument("--localize-seed", type=int, default=0, help="seed of the localization trajectories (default 0)")
    p.add_argument("--evaluator", choices=("toy", "clip", "style", "vlm"), required=True)
    p.add_argument("--evaluator-model", default=None, metavar="PATH", help="CLIP / VLM directory or cached hub id")
    p.add_argument("--references", default=None, metavar="DIR",
                   help="style evaluator: a folder per concept of style reference images")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--method", default="contribution", metavar="M,M,...",
                   help="localization method(s) whose top-K and bottom-K are withheld, compared in one run: "
                        "contribution, patch, attribution (default contribution)")
    p.add_argument("--variant", choices=("attn", "attn_value", "attn_value_out"), default="attn_value_out")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: where the pipeline loads; each process's own "
                                                  "accelerator under accelerate launch / torchrun")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    _add_adapter_option(p)
    _add_pipeline_args(p)
    p.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")

    p = sub.add_parser("ground-truth", help="toy world: withhold each concept from every block, pair and greedy "
                                            "set (K <= 4) and judge each localization method against that")
    p.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")
    p.add_argument("--model", default="toy", help="the toy model (default) or a directory of a toy-world pipeline")
    p.add_argument("--categories", default=None, metavar="A,B", help="toy categories (default: all six)")
    p.add_argument("--concepts", default=None, metavar="A,B", help="only these concepts (default: all of the categories)")
    p.add_argument("--methods", default="contribution,patch,attribution,search,search-self", metavar="M,M",
                   help="localization methods to judge (default contribution,patch,attribution,search,search-self: "
                        "search = set-level search with the toy oracle, search-self = the model as its own judge)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--n-images", type=int, default=32, help="held-out images per condition (default 32)")
    p.add_argument("--batch-size", type=int, default=64, help="images per pipeline call (default 64)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the pipeline loads)")
    p.add_argument("--report-only", action="store_true",
                   help="only recompute summary.json and summary.md from the directory (no model)")

    p = sub.add_parser("report", help="HTML report and figures of a `ditloc bench` run")
    p.add_argument("run", metavar="RUN", help="the run directory of `ditloc bench` or `ditloc ground-truth`")
    p.add_argument("--k", type=int, default=None, help="K of the block-selection heat map (default: the largest)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="minimal K: top-K presence below this fraction of the baseline (default 0.5)")
    p.add_argument("--grid-samples", type=int, default=4, help="images per concept in the grids (default 4)")

    p = sub.add_parser("demo", help="the whole loop on the embedded toy model (a few minutes on a CPU)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--k", type=int, default=None,
                   help="blocks to withhold (default: K from each concept's search curve)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; 4 with --fast)")
    p.add_argument("--fast", action="store_true", help="a smaller run (as in CI)")
    return parser


def _adapter_options(args) -> dict:
    return dict(args.adapter_option)


def _run_options(args):
    """The sampling settings every command shares, as one RunOptions."""
    from .options import RunOptions

    return RunOptions(num_inference_steps=args.steps, guidance_scale=args.guidance,
                      max_sequence_length=getattr(args, "max_sequence_length", None),
                      pipeline_kwargs=_pipeline_kwargs(args), adapter_options=_adapter_options(args))


def _count_blocks(model: str) -> int | None:
    """Blocks of MODEL's transformer from its config, without loading weights (None where unreadable)."""
    import json

    if model == "toy":
        from .toy import MODEL_DIR

        model = str(MODEL_DIR)
    try:
        config = json.loads((Path(model).expanduser() / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    n = config.get("num_layers")
    return int(n) + int(config.get("num_single_layers") or 0) if isinstance(n, int) else None


def _search_config(args):
    """The --method search settings as a SearchConfig, checked before the model loads."""
    from .localize import SearchConfig

    search_flags = {"objective": None, "evaluator": None, "evaluator_model": None, "eval_text": None, "max_k": 4,
                    "beam": 1, "direction": "forward", "candidates": None, "candidate_method": "contribution",
                    "search_steps": None}
    if args.method != "search":
        given = [k for k, default in search_flags.items() if getattr(args, k) != default]
        if given:
            _fail(f"--{given[0].replace('_', '-')} is a setting of --method search")
        return None
    config = SearchConfig(objective=args.objective, max_k=args.max_k, beam=args.beam, direction=args.direction,
                          candidates=args.candidates, candidate_method=args.candidate_method,
                          search_steps=args.search_steps)
    config.check(_count_blocks(args.model))
    if args.objective == "self" and (args.evaluator or args.eval_text):
        _fail("--evaluator/--eval-text score the evaluator objective; --objective self needs none")
    if args.evaluator is not None and args.evaluator not in ("toy", "clip", "vlm"):
        _fail(f"unknown evaluator {args.evaluator!r}; use toy, clip or vlm")
    if args.model != "toy" and args.objective in (None, "evaluator") and args.evaluator is None:
        if args.objective == "evaluator":
            _fail("--objective evaluator needs --evaluator clip|vlm (with --evaluator-model) on this model")
    return config


def _search_evaluator(args):
    """The evaluator the search scores with (None: the model's default or the self objective); the
    evaluation text is checked here, before the model loads."""
    from .evaluate import get_evaluator

    name = args.evaluator or ("toy" if args.model == "toy" and args.objective != "self" else None)
    if name is None:
        return None
    kwargs = {"model": args.evaluator_model} if args.evaluator_model and name != "toy" else {}
    if name == "vlm":
        from .bench import VLM_QUESTION

        kwargs["question"] = VLM_QUESTION
    evaluator = get_evaluator(name, **kwargs)
    evaluator.check_text(args.eval_text if args.eval_text is not None else args.concept)
    return evaluator


def cmd_localize(args) -> None:
    from .localize import localize

    prompts = args.prompts
    config = _search_config(args)
    if args.top_k is not None and args.auto_k:
        _fail("choose --top-k or --auto-k, not both")
    if args.clean_prompt is not None:
        if args.method == "contribution":
            _fail("--clean-prompt is used by --method patch, attribution or search only")
        if len(args.clean_prompt) != len(prompts):
            _fail(f"got {len(args.clean_prompt)} --clean-prompt for {len(prompts)} prompts; give one per prompt")
    if args.block_batch is not None and args.block_batch < 1:
        _fail(f"--block-batch must be at least 1, got {args.block_batch}")
    if config is not None:
        evaluator = _search_evaluator(args)
        pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
        config.check(len(_adapter_for(pipe, args).block_names()))
        return _localize_search(args, pipe, config, evaluator)
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    n_blocks = None
    if args.top_k is not None:
        from .adapters import get_adapter

        n_blocks = len(get_adapter(pipe, **_adapter_options(args)).block_names())
        if not 1 <= args.top_k <= n_blocks:
            _fail(f"--top-k must be between 1 and {n_blocks} (the number of blocks), got {args.top_k}")
    with _progress.bar(desc="localize", unit="step") as steps, \
            _progress.count_steps(pipe, steps, calls=math.ceil(len(prompts) / args.batch_size)):

        def progress(done: int, total: int) -> None:  # after each batch of prompts
            if _progress.showing():
                steps.set_postfix_str(f"{done}/{total} prompts")
            else:
                _progress.write(f"localize: {done}/{total} prompts")

        loc = localize(pipe, prompts, args.concept, method=args.method, clean_prompts=args.clean_prompt,
                       seed=args.seed, variant=args.variant, out_bias=args.out_bias, batch_size=args.batch_size,
                       block_batch=args.block_batch, options=_run_options(args), progress=progress)
    top_k = loc.minimal_k() if args.auto_k else args.top_k
    if top_k is not None:
        loc.settings["top_k"] = top_k
        loc.settings["auto_k"] = bool(args.auto_k)
    out = Path(args.out)
    path = loc.save(out / "localization.json")
    scores = dict(zip(loc.blocks, loc.scores.tolist()))
    shown = loc.ranking if top_k is None else loc.top(top_k)
    how = f"variant {args.variant}" if args.method == "contribution" else "clean prompts " + (
        "given" if args.clean_prompt else "derived")
    print(f"concept {args.concept!r}: {len(prompts)} prompt(s), {args.steps} steps, method {args.method}, {how}"
          + (f", automatic K = {top_k}" if args.auto_k else ""))
    print(f"{'rank':>4}  {'block':<12} {'score':>10}")
    for r, b in enumerate(shown, 1):
        print(f"{r:>4}  {b:<12} {scores[b]:>10.4f}")
    print(f"wrote {path}")


def _adapter_for(pipe, args):
    from .adapters import get_adapter

    return get_adapter(pipe, **_adapter_options(args))


def _localize_search(args, pipe, config, evaluator) -> None:
    """`ditloc localize --method search`: the curve, K from it, resumable from <out>/search.jsonl."""
    from .localize import localize

    out = Path(args.out)
    checkpoint = out / "search.jsonl"
    n_blocks = len(_adapter_for(pipe, args).block_names())
    if args.top_k is not None and not 1 <= args.top_k <= n_blocks:
        _fail(f"--top-k must be between 1 and {n_blocks} (the number of blocks), got {args.top_k}")
    with _progress.bar(desc="search", unit="set") as bar:
        def progress(done: int, total: int) -> None:  # after each evaluated block set
            bar.total = total
            bar.n = done
            bar.refresh()
            if not _progress.showing():
                _progress.write(f"search: {done}/{total} block sets")

        loc = localize(pipe, args.prompts, args.concept, method="search", search=config, evaluator=evaluator,
                       eval_text=args.eval_text, clean_prompts=args.clean_prompt, seed=args.seed,
                       batch_size=args.batch_size, block_batch=args.block_batch, options=_run_options(args),
                       checkpoint=checkpoint, progress=progress)
    s = loc.search
    auto = s.auto_k(config.threshold)
    top_k = auto if args.auto_k else args.top_k
    if top_k is not None:
        loc.settings["top_k"] = top_k
        loc.settings["auto_k"] = bool(args.auto_k)
    path = loc.save(out / "localization.json")
    cost = s.cost
    print(f"concept {args.concept!r}: {len(args.prompts)} prompt(s) x {len(loc.settings['seeds'])} seed(s), objective "
          f"{s.objective}, {cost['search_steps']} steps; {cost['sets_evaluated']} block sets evaluated "
          f"({cost['generations']} generated now, {cost['seconds']:.0f}s)")
    print(f"presence unedited {s.baseline:.3f}")
    print(f"{'K':>2}  {'presence':>8} {'drop':>6} {'relative':>8}  blocks")
    for k, (blocks, p, rel) in enumerate(zip(s.sets, s.presence, s.relative_curve), 1):
        mark = " <- K" if k == auto else ""
        print(f"{k:>2}  {p:>8.3f} {s.baseline - p:>6.3f} {rel:>8.2f}  {', '.join(blocks)}{mark}")
    if auto is None:
        print(f"automatic K: none up to {s.max_k} halves presence (raise --max-k, or the knowledge is spread wider)")
    else:
        print(f"automatic K = {auto} (the smallest K whose set halves presence)")
    if args.auto_k and auto is None:
        loc.settings["top_k"] = s.max_k
    print(f"wrote {path}")


def cmd_intervene(args) -> None:
    from ._io import write_json
    from .adapters import get_adapter
    from .errors import DitlocError
    from .intervene import derive_clean_prompt, generate
    from .localize import Localization

    if args.auto_k and args.top_k is not None:
        _fail("choose --top-k or --auto-k, not both")
    by_rank = args.top_k is not None or args.auto_k
    if (args.blocks is None) == (not by_rank):
        _fail("give either --blocks NAMES or --top-k K (or --auto-k) with --localization FILE")
    if by_rank and not args.localization:
        _fail(f"{'--auto-k' if args.auto_k else '--top-k'} needs --localization FILE (from `ditloc localize`)")
    loc = Localization.load(args.localization) if args.localization else None
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    adapter = get_adapter(pipe, **_adapter_options(args))
    if loc is not None:
        if list(loc.blocks) != adapter.block_names():
            raise DitlocError(f"{args.localization} was measured on a model with other blocks; localize this model first")
    if args.auto_k:
        args.top_k = loc.choose_k()
    blocks = adapter.resolve_blocks(args.blocks) if args.blocks is not None else loc.top(args.top_k)
    if args.blocks is not None and not blocks:
        _fail("--blocks is empty; name at least one block, e.g. --blocks block.3")
    clean = args.clean_prompt or derive_clean_prompt(args.prompt, args.concept)
    common = dict(seed=args.seed, options=_run_options(args))
    original = generate(pipe, args.prompt, **common)[0]
    key = "withhold" if args.mode == "withhold" else "inject"
    intervened = generate(pipe, args.prompt, concept=args.concept, clean_prompts=[clean], **{key: blocks}, **common)[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    original.save(out / "original.png")
    intervened.save(out / "intervened.png")
    record = {
        "prompt": args.prompt,
        "concept": args.concept,
        "clean_prompt": clean,
        "mode": args.mode,
        "blocks": blocks,
        "localization": args.localization,
        "top_k": args.top_k,
        "model": args.model,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "max_sequence_length": args.max_sequence_length,
        "adapter_options": _adapter_options(args),
        "device": args.device,
        "dtype": args.dtype,
    }
    write_json(out / "intervention.json", record)
    print(f"{args.mode} {args.concept!r} in {', '.join(blocks)}; clean prompt {clean!r}")
    print(f"wrote {out / 'original.png'}, {out / 'intervened.png'}, {out / 'intervention.json'}")


def cmd_demo(args) -> None:
    import dataclasses

    from .toy.demo import DemoConfig, format_table, run_demo

    cfg = DemoConfig.fast() if args.fast else DemoConfig()
    if args.k is not None and not 1 <= args.k <= 12:
        _fail(f"--k must be between 1 and 12 (the toy model's blocks), got {args.k}")
    cfg = dataclasses.replace(cfg, k=args.k, steps=args.steps if args.steps is not None else cfg.steps)
    result = run_demo(args.out, cfg, progress=_progress.write)
    print("presence of each concept (oracle, held-out images), before and after withholding it from the searched "
          "K-block set and from random K-block sets:")
    print(format_table(result))
    print(f"wrote {args.out}/summary.json, heatmap.png and per-category localization.json + grid.png "
          f"(in {result['settings']['seconds']:.0f} s)")


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    from .errors import DitlocError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DitlocError(f"{flag} takes comma-separated integers, e.g. 1,2,4,8; got {text!r}") from None


def cmd_bench(args) -> None:
    import torch

    from .bench import BenchSettings, accelerate_workers, check_run_dir, plan_bench, run_bench

    settings = BenchSettings(
        model=args.model, probes=args.probes, ks=_int_list(args.k, "--k"), seeds=_int_list(args.seeds, "--seeds"),
        evaluator=args.evaluator, evaluator_model=args.evaluator_model, references=args.references,
        categories=tuple(c.strip() for c in (args.categories or "").split(",") if c.strip()),
        concepts_per_category=args.concepts_per_category, localization_prompts=args.localization_prompts,
        evaluation_prompts=args.evaluation_prompts, steps=args.steps, guidance_scale=args.guidance,
        max_sequence_length=args.max_sequence_length, localize_seed=args.localize_seed, variant=args.variant,
        batch_size=args.batch_size, dtype=args.dtype, adapter_options=_adapter_options(args),
        methods=tuple(m.strip() for m in args.method.split(",") if m.strip()),
        pipeline_kwargs=_pipeline_kwargs(args),
    )
    plan = plan_bench(settings)
    check_run_dir(args.out, plan)  # before the model loads
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    try:
        cpu = not has_accelerator or (args.device is not None and torch.device(args.device).type == "cpu")
    except RuntimeError:
        _fail(f"unknown device {args.device!r}; use e.g. cpu, cuda, cuda:1, mps")
    workers, process_device = accelerate_workers(cpu=cpu)
    device = args.device if workers.world_size == 1 or cpu else str(process_device)
    pipe = load_pipeline(args.model, device=device, dtype=args.dtype)
    result = run_bench(pipe, plan, args.out, workers=workers, device=pipe._execution_device, progress=_progress.write)
    if workers.rank == 0:
        print(f"bench: {result.units_run} unit(s) run, {result.units_reused} reused (process 0) in "
              f"{result.seconds:.0f} s; {len(result.rows)} rows")
        print(f"wrote {result.path} (then: ditloc report {args.out})")


def cmd_report(args) -> None:
    from .report import build_report
    from .report.ground_truth import build_ground_truth_report, is_ground_truth_dir

    if is_ground_truth_dir(args.run):
        gt = build_ground_truth_report(args.run)
        for method, v in gt.summary["summary"].items():
            hit = v["hit_at_1"]
            print(f"  {method:<13} hit@1 {hit['rate'] if hit['rate'] is not None else '–'} (n={hit['n']}), "
                  f"regret@2 {v['regret_2']['mean'] if v['regret_2']['mean'] is not None else '–'} "
                  f"(n={v['regret_2']['n']})")
        print(f"wrote {gt.html} and {len(gt.figures)} figures in {gt.html.parent}")
        return
    report = build_report(args.run, k=args.k, threshold=args.threshold, grid_samples=args.grid_samples)
    print(f"minimal K (top-K presence < {args.threshold:g} x baseline):")
    for m in report.minimal_k:
        print(f"  {m.category:<12} {m.concept:<28} {m.minimal_k if m.minimal_k is not None else 'none'}")
    print(f"wrote {report.html} and {len(report.figures)} figures in {report.html.parent}")


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def cmd_ground_truth(args) -> None:
    from .bench import GroundTruthSettings, check_ground_truth_dir, plan_ground_truth, run_ground_truth
    from .bench.ground_truth import SUMMARY_MD, summarize_ground_truth

    if args.report_only:
        summary = summarize_ground_truth(args.out)
    else:
        settings = GroundTruthSettings(
            model=args.model, categories=_names(args.categories), concepts=_names(args.concepts),
            methods=_names(args.methods), steps=args.steps, n_images=args.n_images, batch_size=args.batch_size)
        plan_ground_truth(settings)  # names and methods, before the model loads
        check_ground_truth_dir(args.out, settings)
        pipe = load_pipeline(args.model, device=args.device)
        result = run_ground_truth(pipe, args.out, settings, progress=lambda m: print(m, file=sys.stderr, flush=True))
        summary = result.summary
        print(f"ground-truth: {result.conditions_run} condition(s) run, {result.conditions_reused} reused, "
              f"{result.localizations_run} localization(s), {result.seconds:.0f}s")
    for method, v in summary["summary"].items():
        hit = v["hit_at_1"]
        rate = "–" if hit["rate"] is None else f"{hit['rate']:.2f}"
        regret = v["regret_2"]["mean"]
        print(f"  {method:<13} hit@1 {rate} (n={hit['n']}), mean regret@2 "
              f"{'–' if regret is None else f'{regret:.3f}'} (n={v['regret_2']['n']})")
    if summary["incomplete"]:
        print(f"  {len(summary['incomplete'])} concept/method result(s) incomplete; rerun the same command to finish")
    print(f"wrote {Path(args.out) / SUMMARY_MD}")


def _preserve_prompts(args) -> list[str] | None:
    """--preserve and --preserve-file as one list (None: neither given); `unlearn` checks the prompts."""
    if args.preserve is None and args.preserve_file is None:
        return None
    given = list(args.preserve or [])
    if args.preserve_file is not None:
        path = Path(args.preserve_file)
        if not path.is_file():
            _fail(f"--preserve-file {path} is not a file")
        given += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not given:  # before the model loads
        from .edit.jobs import EMPTY_PRESERVE

        _fail(EMPTY_PRESERVE)
    return given


def _edit(args) -> None:
    from .edit import TrainConfig, personalize, unlearn
    from .errors import DitlocError

    if args.method == "closed-form":
        from .edit import ClosedFormConfig

        config = ClosedFormConfig(preserve_weight=args.preserve_weight, ridge=args.ridge, positions=args.positions,
                                  seed=args.seed, auto_k_fraction=args.auto_k_fraction)
    else:
        config = TrainConfig(
            method=args.method, rank=args.rank, steps=args.train_steps, lr=args.lr, batch_size=args.batch_size,
            seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
            checkpoint_every=args.checkpoint_every, mixed_precision=args.mixed_precision,
            lora_modules=args.lora_modules,
        )
    from .edit.processes import current

    main_process = current(args.device).is_main  # under accelerate launch only process 0 reports
    device = _train_device(args)
    # mixed precision: the base weights in bfloat16 unless --dtype says otherwise
    dtype = args.dtype or ("bfloat16" if args.mixed_precision == "bf16" else None)
    k = "auto" if getattr(args, "auto_k", False) else args.k
    common = dict(blocks=args.blocks, k=k, config=config, out=args.out, options=_run_options(args),
                  progress=_progress.write if main_process else None, localize_method=args.localize_method)
    if args.command == "personalize":
        if args.num_class_images < 1:
            raise DitlocError(f"--num-class-images must be >= 1 (got {args.num_class_images})")
        from .edit.blocks import category_prompts

        loc_prompts = category_prompts(args.category, args.class_word, args.probes) if args.category else None
        pipe = load_pipeline(args.model, device=device, dtype=dtype)
        res = personalize(pipe, args.images, args.token, args.class_word, instance_prompt=args.instance_prompt,
                          localize_prompts=loc_prompts, captions=args.caption_texts, class_prompts=args.class_prompt,
                          prior_weight=args.prior_weight, prior_target=args.prior_target,
                          prior_preservation=args.prior_preservation, num_class_images=args.num_class_images,
                          **common)
    else:
        prompts = getattr(args, "prompts", None)
        if args.images_per_prompt < 1:
            raise DitlocError(f"--images-per-prompt must be >= 1 (got {args.images_per_prompt})")
        preserve = _preserve_prompts(args)
        pipe = load_pipeline(args.model, device=device, dtype=dtype)
        res = unlearn(pipe, args.concept, args.anchor, prompts=prompts, images_per_prompt=args.images_per_prompt,
                      preserve=preserve, **common)
    if not main_process:
        return
    if res.config.get("method") == "closed-form":
        n = len(res.config["projections"])
        mem = f", peak {res.peak_memory_bytes / 2**20:.0f} MiB" if res.peak_memory_bytes else ""
        print(f"unlearn: closed-form edit of {n} projection(s) in {', '.join(res.blocks)} "
              f"({res.trainable_parameters:,} of {res.total_parameters:,} parameters), {res.wall_seconds:.1f}s{mem}")
        print(f"wrote {args.out} (load with ditloc.edit.load_edit(pipe, OUT))")
        return
    mem = f", peak {res.peak_memory_bytes / 2**20:.0f} MiB" if res.peak_memory_bytes else ""
    print(f"{res.kind}: trained {res.trainable_parameters:,} of {res.total_parameters:,} parameters in "
          f"{', '.join(res.blocks)}; {res.steps} steps, {res.wall_seconds:.1f}s{mem}; final loss {res.losses[-1]:.4f}")
    how = "pipe.load_lora_weights(OUT) or " if hasattr(pipe, "load_lora_weights") and args.method == "lora" else ""
    print(f"wrote {args.out} (load with {how}ditloc.edit.load_edit(pipe, OUT))")


COMMANDS = {"localize": cmd_localize, "intervene": cmd_intervene, "demo": cmd_demo,
            "personalize": _edit, "unlearn": _edit, "bench": cmd_bench, "report": cmd_report,
            "ground-truth": cmd_ground_truth}


def _quiet_libraries() -> None:
    """ditloc prints its own progress; the libraries' bars and advice would bury it."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    import warnings

    # the settings record clean_caption=False; a warning line would break "one error line" output
    warnings.filterwarnings("ignore", message="beautifulsoup4/ftfy are not installed")
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import DitlocError, Interrupted

    _quiet_libraries()

    try:
        import torch

        _check_args(args)  # before any model loads
        try:
            COMMANDS[args.command](args)
        except torch.OutOfMemoryError:
            _fail("out of memory; lower --batch-size, use --dtype float16/bfloat16, or a smaller resolution")
    except Interrupted as e:
        print(f"ditloc: {e}", file=sys.stderr)
        return 130
    except DitlocError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        hint = "rerun the same command to resume" if args.command in RESUMABLE else "nothing more was written"
        print(f"ditloc: interrupted; {hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
