"""Do the search's images rank block sets the same at fewer sampling steps? For a concept per
category (or the ones named), the toy oracle's presence of the baseline, every single block and
the ground truth's best pair, on the search's own prompts and seeds, at 4, 6, 10 and 20 steps;
per concept the Spearman correlation of the sets' drops with the 20-step drops and whether the
best single block and the best set agree.

    python scripts/toy/search_fidelity.py --out benchmarks/results/search_fidelity_toy [--model toy-flux]

Resumable: each (concept, steps) is one line of OUT/presence.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ditloc import toy  # noqa: E402
from ditloc.bench.ground_truth import GroundTruthSettings, plan_ground_truth  # noqa: E402
from ditloc.bench.ground_truth.settings import SEARCH_SEEDS, search_prompt_indices  # noqa: E402
from ditloc.evaluate import get_evaluator  # noqa: E402
from ditloc.localization import PresenceRunner  # noqa: E402
from ditloc.options import RunOptions  # noqa: E402

DEFAULT = {"toy": ["star", "red", "striped", "beach", "blip", "hazard"],
           "toy-flux": ["star", "red", "striped", "beach", "blip", "hazard"]}
STEPS = (4, 6, 10, 20)


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="toy", choices=("toy", "toy-flux"))
    ap.add_argument("--concepts", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gt_dir = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / (
        "ground_truth_toy" if args.model == "toy" else "ground_truth_toy_flux")
    summary = {c["concept"]: c for c in json.loads((gt_dir / "summary.json").read_text())["concepts"]}
    names = args.concepts.split(",") if args.concepts else DEFAULT[args.model]
    pipe = toy.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    evaluator = get_evaluator("toy")
    settings = GroundTruthSettings(concepts=tuple(names), model=args.model)
    plans = {c.concept: c for c in plan_ground_truth(settings)}
    store = out / "presence.jsonl"
    done = {(r["concept"], r["steps"]) for r in map(json.loads, store.read_text().splitlines())} if store.exists() else set()
    for name in names:
        c = plans[name]
        idx = search_prompt_indices(len(c.localization_prompts))
        blocks = list(summary[name]["oracle"]["blocks"])
        sets = [[]] + [[b] for b in blocks] + [summary[name]["oracle"]["best_pair"]]
        for steps in STEPS:
            if (name, steps) in done:
                continue
            runner = PresenceRunner(pipe, [c.localization_prompts[i] for i in idx], name, evaluator=evaluator,
                                    eval_text=c.eval_text, clean_prompts=[c.localization_clean_prompts[i] for i in idx],
                                    seed=list(SEARCH_SEEDS), options=RunOptions.of(settings.run_options, num_inference_steps=steps))
            values = runner.presence([frozenset(s) for s in sets])
            with store.open("a") as f:
                f.write(json.dumps({"concept": name, "category": c.category, "steps": steps, "sets": sets,
                                    "per_image": values.tolist()}) + "\n")
            print(f"{name} at {steps} steps: baseline {values[0].mean():.3f}", flush=True)
    rows = [json.loads(x) for x in store.read_text().splitlines()]
    lines = ["| concept | category | steps | baseline | Spearman of drops with 20 steps | best single same | best pair drop |",
             "|---|---|---:|---:|---:|---|---:|"]
    by = {(r["concept"], r["steps"]): np.asarray(r["per_image"]) for r in rows}
    for name in names:
        if (name, 20) not in by:
            continue
        ref = by[(name, 20)].mean(1)
        ref_drop = ref[0] - ref[1:]
        for steps in STEPS:
            if (name, steps) not in by:
                continue
            m = by[(name, steps)].mean(1)
            drop = m[0] - m[1:]
            lines.append(f"| {name} | {plans[name].category} | {steps} | {m[0]:.3f} | {spearman(drop, ref_drop):.2f} | "
                         f"{'yes' if np.argmax(drop[:-1]) == np.argmax(ref_drop[:-1]) else 'no'} | {drop[-1]:.3f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
