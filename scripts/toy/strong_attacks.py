"""Attacks with twice to four times the default budget on an edited toy model (the edited model only, as
`ditloc.attack` on a pipeline with the edit loaded): textual inversion of 400 steps on 64 images of the
concept, and the conditioning attack for 400 steps (4x its default). The images of the concept are drawn by
the unedited model from the concept's training templates (seeds 0..63) and given to the attack with their
prompts as captions. Resumable (each attack's OUT).

    cd scripts/toy
    python strong_attacks.py --edit ../../benchmarks/results/robust_toy/zibbit/robust_auto/edit \\
        --concept zibbit --out ../../benchmarks/results/robust_toy/zibbit/robust_auto/strong
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from editing_eval import rate, sampling

from ditloc.attacks import attack
from ditloc.attacks.data import carriers, spread
from ditloc.options import generators
from ditloc.edit import load_edit
from ditloc.toy import load_pipeline

BUDGETS = {"inversion": dict(steps=400, train_images=64), "conditioning": dict(steps=400)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edit", required=True)
    ap.add_argument("--concept", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="toy", choices=("toy", "toy-flux"))
    ap.add_argument("--kinds", default="inversion,conditioning")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-steps", type=int, default=None, help="override the steps (a quick check)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    base = load_pipeline(args.model)
    base.set_progress_bar_config(disable=True)
    train = spread(carriers("toy", args.concept).train, 64)
    call, _ = sampling(args.model)
    with torch.no_grad():
        images = torch.cat([base(train[i : i + 16], generator=generators(list(range(i, i + 16))),
                                 num_inference_steps=20, output_type="pt", **call).images for i in range(0, 64, 16)]) * 2 - 1  # [64, 3, h, w]
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        pipe = load_pipeline(args.model)
        pipe.set_progress_bar_config(disable=True)
        load_edit(pipe, args.edit)
        budget = dict(BUDGETS[kind])
        if args.budget_steps is not None:
            budget["steps"] = args.budget_steps
        given = dict(images=images[: budget.pop("train_images", 16)])
        given["captions"] = train[: len(given["images"])]
        res = attack(pipe, args.concept, kind=kind, n_images=args.n, seeds=args.seed, out=out / kind, progress=print,
                     train_images=len(given["images"]), **budget, **given)
        rows[kind] = {"budget": res.budget, **{c.condition: rate([s >= c.threshold for s in c.scores])
                                               for c in res.cells}}
        print(kind, {k: v for k, v in rows[kind].items() if k != "budget"}, flush=True)
    (out / "strong.json").write_text(json.dumps({"edit": args.edit, "concept": args.concept, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
