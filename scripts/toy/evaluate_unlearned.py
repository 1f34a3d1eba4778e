"""Score an edit saved by `ditloc unlearn toy ...` on the toy world's held-out sets
(the oracle; rates with 95% Wilson intervals): the erased concept's presence on
training-template and held-out-template prompts, and the share of images whose every
oracle label is unchanged from the unedited model (same prompts, same seeds) on the
locality sets (other characters, the anchor shape, other shapes; for a style, the other
styles and the anchor style; for the hazard, ordinary scenes).

    ditloc unlearn toy --concept zibbit --anchor triangle --edit-method closed-form --blocks auto --out runs/u
    python scripts/toy/evaluate_unlearned.py runs/u --concept zibbit --n 64
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from ditloc.edit import load_edit
from ditloc.toy import load_pipeline
from ditloc.toy.oracle import load_oracle
from editing_eval import evaluate  # same directory
from evaluate_editing import build_sets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("edit", help="the output directory of `ditloc unlearn toy ...`")
    ap.add_argument("--concept", required=True, help="hazard, a character or a style")
    ap.add_argument("--n", type=int, default=64, help="prompts per evaluation set (default 64)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--seed", type=int, default=0, help="seed of the evaluation sets (default 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    oracle = load_oracle()
    sets = build_sets(args.concept, np.random.default_rng(args.seed), args.n)[0]
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    before, labels = evaluate(pipe, oracle, sets, args)
    load_edit(pipe, args.edit)
    after, _ = evaluate(pipe, oracle, sets, args, reference=labels)
    report = {"edit": args.edit, "concept": args.concept, "n": args.n, "seed": args.seed, "before": before,
              "after": after}
    for name, value in after.items():
        old = before.get(name)
        was = f" (before {old['value']:.3f})" if old else ""
        print(f"{name:<34} {value['value']:.3f} [{value['lo']:.2f}, {value['hi']:.2f}] n={value['n']}{was}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
