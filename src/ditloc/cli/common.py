"""What every command shares: the one-line error, the parser, the shared options and the checks that
need no model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from . import models

DTYPES = ("float32", "float16", "bfloat16")
#: flags that take a count (at least 1), by argparse destination
COUNTS = {"steps": "--steps", "max_sequence_length": "--max-sequence-length", "batch_size": "--batch-size",
          "top_k": "--top-k", "num_class_images": "--num-class-images", "images_per_prompt": "--images-per-prompt",
          "max_k": "--max-k", "beam": "--beam", "candidates": "--candidates", "search_steps": "--search-steps",
          "save_images": "--save-images"}
#: pipeline arguments ditloc sets itself, and the flag that sets each
OWN_PIPELINE_ARGS = {"prompt": "--prompt", "num_inference_steps": "--steps", "guidance_scale": "--guidance",
                     "max_sequence_length": "--max-sequence-length", "generator": "--seed",
                     "output_type": None, "callback_on_step_end": None}


def fail(message: str) -> NoReturn:
    print(f"ditloc: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)")


# --- options ---------------------------------------------------------------------------------------------------

def add_common(p: argparse.ArgumentParser, *, concept_required: bool = True) -> None:
    """MODEL, --concept, the sampling settings and --out of `localize` and `intervene`."""
    p.add_argument("model", metavar="MODEL", help="diffusers pipeline directory, hub id, 'toy' or 'toy-flux'")
    p.add_argument("--concept", required=concept_required, help="the concept's words as they appear in the prompt")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's; on FLUX base models without a guidance embedding, true_cfg_scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1, mps (default: where the pipeline loads)")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    add_adapter_option(p)
    add_pipeline_args(p)
    p.add_argument("--out", required=True, help="output directory")


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
    if getattr(args, "adapter_option", None):
        from ..adapters import check_adapter_options

        check_adapter_options(adapter_options(args), models.transformer_class(args.model))
    for name in ("concept", "token", "class_word", "anchor"):
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:  # repeatable (unlearn's --concept/--anchor)
            if v is not None and not v.strip():
                fail(f"--{name.replace('_', '-')} is empty")


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
