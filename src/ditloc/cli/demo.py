"""`ditloc demo`: the whole loop on an embedded toy model."""

from __future__ import annotations

from .. import _progress
from . import models
from .common import Once, check_out_and_counts, fail, k_value


def add_parsers(sub) -> None:
    from ..toy import TOY_MODELS

    p = sub.add_parser("demo", help="the whole loop on an embedded toy model (a few minutes on a CPU)")
    p.add_argument("--model", choices=tuple(TOY_MODELS), default="toy",
                   help="toy (PixArt-alpha, default) or toy-flux (FLUX: joint attention)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--k", type=k_value(), action=Once, default="auto", metavar="N|auto",
                   help="blocks to withhold: N, or auto (default: the smallest K that halves each concept's "
                        "presence on its search curve, its largest set where none does)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; 4 with --fast)")
    p.add_argument("--fast", action="store_true", help="a smaller run (as in CI)")
    p.set_defaults(check=check_out_and_counts, func=cmd_demo)


def cmd_demo(args) -> None:
    import dataclasses

    from ..demo import DemoConfig, format_table, run_demo

    cfg = DemoConfig.fast(args.model) if args.fast else DemoConfig.for_model(args.model)
    n_blocks = models.count_blocks(args.model)  # None while the model is missing: loading it says what to do
    k = None if args.k == "auto" else args.k
    if k is not None and n_blocks is not None and not 1 <= k <= n_blocks:
        fail(f"--k must be between 1 and {n_blocks} (the {args.model} model's blocks), got {k}")
    cfg = dataclasses.replace(cfg, model=args.model, k=k,
                              steps=args.steps if args.steps is not None else cfg.steps)
    result = run_demo(args.out, cfg, progress=_progress.write)
    print("presence of each concept (oracle, held-out images), before and after withholding it from the searched "
          "K-block set and from random K-block sets:")
    print(format_table(result))
    print(f"wrote {args.out}/summary.json, heatmap.png and per-category localization.json + grid.png "
          f"(in {result['settings']['seconds']:.0f} s)")
