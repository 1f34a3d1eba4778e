"""What every command shares: the one-line error, the parser, the shared options (and the flags they
replaced, refused naming their successor) and the checks that need no model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from . import models

DTYPES = ("float32", "float16", "bfloat16", "float64")
#: the localization methods (`ditloc.localize.METHODS`)
LOCALIZE_METHODS = ("search", "contribution", "patch", "attribution")
#: what the contribution method measures (`ditloc.engine.CONTRIBUTION_TERMS`)
CONTRIBUTION_TERMS = ("attn", "attn_value", "attn_value_out")
#: flags that take a count (at least 1), by argparse destination
COUNTS = {"steps": "--steps", "max_sequence_length": "--max-sequence-length", "batch_size": "--batch-size",
          "num_class_images": "--num-class-images", "images_per_prompt": "--images-per-prompt",
          "max_k": "--max-k", "beam": "--beam", "candidates": "--candidates", "search_steps": "--search-steps",
          "save_images": "--save-images"}
#: pipeline arguments ditloc sets itself, and the flag that sets each
OWN_PIPELINE_ARGS = {"prompt": "--prompt", "num_inference_steps": "--steps", "guidance_scale": "--guidance",
                     "max_sequence_length": "--max-sequence-length", "generator": "--seeds",
                     "output_type": None, "callback_on_step_end": None}


def fail(message: str) -> NoReturn:
    print(f"ditloc: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)")


# --- flags that were renamed: refused while parsing (before any model loads), naming the new one ---------------

class _Retired(argparse.Action):
    """A flag that no longer exists: given (with or without a value), it fails in one line naming
    its successor. Hidden from --help; declared so that argparse does not read it as an
    abbreviation of a longer flag (``--seed`` of ``--seeds``)."""

    def __init__(self, option_strings, dest, successor: str, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.successor = successor

    def __call__(self, parser, namespace, values, option_string=None):
        fail(f"{option_string} is retired; use {self.successor}")


def retire(p: argparse.ArgumentParser, flag: str, successor: str) -> None:
    """Refuse `flag` on `p`, naming `successor` (the new flag, with the value that keeps the old meaning)."""
    p.add_argument(flag, action=_Retired, successor=successor)


class Once(argparse.Action):
    """A flag that may be given once: a second one (which argparse would silently keep instead of the
    first) is refused in one line. Lists are comma lists (--seeds 0,1,2)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in seen:
            fail(f"{option_string} given twice; give it once" + (" (a comma list: --seeds 0,1,2)"
                                                                 if "seeds" in self.dest else ""))
        seen.add(self.dest)
        setattr(namespace, self.dest, values)


#: what replaced each flag retired on every command that had it
SEED = "--seeds S[,S...] (a comma list, e.g. --seeds 0 or --seeds 0,1,2)"


# --- values ------------------------------------------------------------------------------------------------------

def seed_list(text: str) -> tuple[int, ...]:
    """--seeds: distinct integers, comma-separated."""
    try:
        seeds = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}")
    if not seeds:
        fail("--seeds is empty; give at least one seed, e.g. --seeds 0")
    if len(set(seeds)) != len(seeds):
        fail(f"--seeds lists a seed twice ({text!r}); give distinct seeds")
    return seeds


def k_value(rules: tuple[str, ...] = ("auto",)):
    """--k: a number of blocks (at least 1) or the name of a rule (`rules`) that chooses it."""
    def parse(text: str):
        word = text.strip()
        if word in rules:
            return word
        try:
            k = int(word)
        except ValueError:
            fail(f"--k takes a number of blocks or {' or '.join(rules)}, got {text!r}")
        if k < 1:
            fail(f"--k must be at least 1, got {k}")
        return k

    return parse


def weights_variant(text: str) -> str:
    """--variant: diffusers' weights variant (e.g. fp16). The contribution's terms, which this flag
    used to name, are refused naming --contribution-terms."""
    if text in CONTRIBUTION_TERMS:
        fail(f"--variant {text} is retired; use --contribution-terms {text} (--variant is now the model's "
             "weights variant, e.g. fp16)")
    if not text.strip():
        fail("--variant is empty; name the weights variant, e.g. --variant fp16")
    return text.strip()


# --- options ---------------------------------------------------------------------------------------------------

def add_common(p: argparse.ArgumentParser, *, concept_required: bool = True) -> None:
    """MODEL, --concept, the sampling settings and --out of `localize` and `intervene`."""
    p.add_argument("model", metavar="MODEL", help="diffusers pipeline directory, hub id, 'toy' or 'toy-flux'")
    add_model_source(p)
    p.add_argument("--concept", required=concept_required, help="the concept's words as they appear in the prompt")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's; on FLUX base models without a guidance embedding, true_cfg_scale)")
    p.add_argument("--seeds", type=seed_list, action=Once, default=(0,), metavar="S,S,...",
                   help="generator seeds, comma-separated: every prompt is run at each (default 0)")
    retire(p, "--seed", SEED)
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1, mps (default: where the pipeline loads)")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    add_adapter_option(p)
    add_pipeline_args(p)
    p.add_argument("--out", required=True, help="output directory")


def add_model_source(p: argparse.ArgumentParser) -> None:
    """diffusers' --variant and --revision of MODEL (passed to `from_pretrained`)."""
    p.add_argument("--variant", type=weights_variant, default=None,
                   help="weights variant of MODEL's files, e.g. fp16 (diffusers' `variant`: *.fp16.safetensors)")
    p.add_argument("--revision", default=None,
                   help="hub revision of MODEL: a branch, tag or commit (diffusers' `revision`; default main)")


def add_adapter_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter-option", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="a model-family setting (repeatable), e.g. text_stream=t5; "
                        "an unknown key or value is refused, naming the valid ones")


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's native size)")
    p.add_argument("--pipeline-arg", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="any other argument of the pipeline call (repeatable; VALUE read as JSON when it parses, "
                        "e.g. clean_caption=false), checked against the pipeline's signature")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. text_stream=t5), got {text!r}")
    return key.strip(), value.strip()


# --- what the options mean ---------------------------------------------------------------------------------------

def pipeline_kwargs(args) -> dict:
    """--pipeline-arg (JSON values where they parse), --height and --width, as pipeline call arguments."""
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
                fail(f"--{name} must be positive, got {value}")
            kwargs[name] = value
    return kwargs


def adapter_options(args) -> dict:
    return dict(args.adapter_option)


def run_options(args):
    """The sampling settings every command shares, as one RunOptions."""
    from ..options import RunOptions

    return RunOptions(num_inference_steps=args.steps, guidance_scale=args.guidance,
                      max_sequence_length=getattr(args, "max_sequence_length", None),
                      pipeline_kwargs=pipeline_kwargs(args), adapter_options=adapter_options(args))


def read_prompts(args) -> list[str]:
    """--prompt (repeatable) and the lines of --prompts-file (no blanks, no # comments), in that order."""
    from ..errors import DitlocError

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


# --- checks that need no model (each command's `check` calls them in its order) ---------------------------------

def check_out_dir(out) -> None:
    """An output directory must not be an existing file, nor lie under one (checked before any work)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        fail(f"--out {out} is a file; pass a directory (it is created if missing)")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                fail(f"--out {out} lies under {parent}, which is a file; pass a directory path")
            break


def check_out_and_counts(args) -> None:
    """--out, then every count flag the command has (COUNTS): at least 1."""
    if getattr(args, "out", None) is not None:
        check_out_dir(args.out)
    for name, flag in COUNTS.items():
        value = getattr(args, name, None)
        if isinstance(value, int) and value < 1:
            fail(f"{flag} must be at least 1, got {value}")


def check_run_settings(args) -> None:
    """--device, --pipeline-arg / --height / --width, --adapter-option (against the family MODEL declares) and
    the texts that must not be blank, of the flags the command has."""
    if getattr(args, "device", None) is not None:
        import torch

        try:
            torch.device(args.device)
        except (RuntimeError, ValueError):
            fail(f"unknown device {args.device!r}; use e.g. cpu, cuda, cuda:1, mps")
    if hasattr(args, "pipeline_arg"):
        for key in dict(args.pipeline_arg):
            if key in OWN_PIPELINE_ARGS:
                flag = OWN_PIPELINE_ARGS[key]
                fail(f"--pipeline-arg {key}: ditloc sets it itself" + (f"; use {flag}" if flag else ""))
            if key in ("height", "width") and getattr(args, key) is not None:
                fail(f"--pipeline-arg {key} and --{key} both given; pass --{key} only")
        pipeline_kwargs(args)  # --height / --width
    if hasattr(args, "revision"):
        if args.revision is not None and not args.revision.strip():
            fail("--revision is empty; name a branch, tag or commit, e.g. --revision main")
        models.check_source(args.model, args.variant, args.revision)  # a DitlocError: one line, exit 2
    if getattr(args, "adapter_option", None):
        from ..adapters import check_adapter_options

        family = models.transformer_class(args.model, getattr(args, "revision", None))
        check_adapter_options(adapter_options(args), family)
    for name in ("concept", "token", "class_word", "anchor"):
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:  # repeatable (unlearn's --concept/--anchor)
            if v is not None and not v.strip():
                fail(f"--{name.replace('_', '-')} is empty")


def check_k(args) -> None:
    """--k N against the blocks MODEL's config declares (read without loading it; unknown: checked once it
    loads)."""
    k = getattr(args, "k", None)
    n_blocks = models.count_blocks(args.model) if isinstance(k, int) else None
    if n_blocks is not None and k > n_blocks:
        fail(f"--k must be between 1 and {n_blocks} (the number of blocks), got {k}")


def check_blocks_named(blocks: str, hint: str = "") -> None:
    """--blocks names at least one block (`hint`: the other values the command takes)."""
    if not [b for b in blocks.split(",") if b.strip()]:
        fail(f"--blocks is empty; name at least one block, e.g. --blocks block.3{hint}")


def _words(text: str) -> set[str]:
    import re

    return set(re.findall(r"\w+", text.lower()))


def check_concept(prompts: list[str], concept: str, *, exact: bool) -> None:
    """Each prompt must hold the concept. `exact`: as training finds it (`ditloc.text`); otherwise
    only its words, as the model may read the prompt cleaned (the adapter checks exactly later)."""
    from ..text import find_occurrences

    for i, prompt in enumerate(prompts):
        if exact and not find_occurrences(prompt, concept):
            fail(f"prompt {i + 1} ({prompt!r}) does not contain the concept {concept!r}")
        if not exact and not _words(concept) <= _words(prompt):
            fail(f"concept {concept!r} is not in prompt {prompt!r}; use a prompt that contains it")


# --- the one writer of --out ----------------------------------------------------------------------------------

def writer_lock(args):
    """The command's hold on its --out for its whole run, taken before any work (the model's loading
    included): a second run on the same folder is refused at its start, with one line naming the PID
    that writes it. Commands that write set ``lock``: the lock file's name, or a function of this
    process's launch rank that gives it (None: this process writes nothing itself)."""
    import contextlib

    from .._io import OutputLock
    from ..processes import launch_rank

    name, out = getattr(args, "lock", None), getattr(args, "out", None)
    if callable(name):
        name = name(launch_rank())
    if name is None or out is None:
        return contextlib.nullcontext()
    return OutputLock(out, name, reentrant=True)


def main_process_lock(rank: int) -> str | None:
    """The ``lock`` of a command whose main process alone writes (under accelerate launch)."""
    from .._io import LOCK_FILE

    return LOCK_FILE if rank == 0 else None
