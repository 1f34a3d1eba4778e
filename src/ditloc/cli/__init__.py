"""`ditloc` command line: parses, calls the public API, prints. No logic of its own.

One module per command group (`localize`, `edit`, `attack`, `bench`, `demo`), each adding its parsers and giving each
command a `check` (everything that needs no model, run before one loads) and a `func` (the command itself);
`common` holds the shared options and checks, `models` resolves and loads MODEL (`models.load_pipeline`)."""

from __future__ import annotations

import sys

from . import attack, bench, demo, edit, localize, models
from .common import Parser, fail, writer_lock

__all__ = ["build_parser", "main", "models"]

#: commands a rerun resumes (they say so when interrupted; so does `localize --localize-method search`)
RESUMABLE = ("attack", "bench", "ground-truth", "personalize", "unlearn")
#: the command groups, in the order `ditloc --help` lists their commands
GROUPS = (localize, edit, attack, bench, demo)


def build_parser() -> Parser:
    from .._version import __version__

    parser = Parser(prog="ditloc", description="Localize, verify and edit knowledge in diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"ditloc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import DitlocError, Interrupted

    _quiet_libraries()

    try:
        import torch

        args.check(args)  # before any model loads
        with writer_lock(args):  # before any work: a second run on the same --out is refused here
            try:
                args.func(args)
            except torch.OutOfMemoryError:
                fail("out of memory; lower --batch-size, use --dtype float16/bfloat16, or a smaller resolution")
    except Interrupted as e:
        print(f"ditloc: {e}", file=sys.stderr)
        return 130
    except DitlocError as e:
        fail(str(e))
    except KeyboardInterrupt:
        resumable = args.command in RESUMABLE or (args.command == "localize" and args.localize_method == "search")
        hint = "rerun the same command to resume" if resumable else "nothing more was written"
        print(f"ditloc: interrupted; {hint}", file=sys.stderr)
        return 130
    return 0


def _quiet_libraries() -> None:
    """ditloc prints its own progress; the libraries' bars and advice would bury it."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    # the settings record clean_caption=False; a warning line would break "one error line" output
    warnings.filterwarnings("ignore", message="beautifulsoup4/ftfy are not installed")
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
