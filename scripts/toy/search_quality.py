"""The search's answer against the toy ground truth, for any `SearchConfig`, without new
held-out conditions: the search runs on each concept's search prompts (the ground truth's
own: 6 localization prompts x seeds 0, 1), and its S_1 and S_2 are judged by the ground
truth's measured presence of every single block and every pair (32 held-out images at 20
steps each). S_4 is judged where the ground truth measured it.

    python scripts/toy/search_quality.py --out benchmarks/results/search_quality_toy/default
    python scripts/toy/search_quality.py --out ... --rank generation --search-steps 10   # the exhaustive greedy
    python scripts/toy/search_quality.py --model toy-flux --out ...

Resumable: one line per concept in OUT/searches.jsonl. The summary pairs regret@2 (and
regret@4 where measured) with the ground truth's own `search` (exhaustive greedy, 10 steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ditloc import SearchConfig, toy  # noqa: E402
from ditloc.bench.ground_truth import GroundTruthSettings, plan_ground_truth  # noqa: E402
from ditloc.bench.ground_truth.settings import SEARCH_SEEDS, search_prompt_indices  # noqa: E402
from ditloc.evaluate import get_evaluator  # noqa: E402
from ditloc.localization.search import search  # noqa: E402
from ditloc.stats import mean_ci, wilson  # noqa: E402

PAIR_LOCALIZABLE = 0.2  # the best pair drops presence by at least this much
STRONG = 0.3  # the best single block drops presence by at least this much (hit@1 is judged there)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="toy", choices=("toy", "toy-flux"))
    ap.add_argument("--concepts", default=None)
    ap.add_argument("--objective", default="evaluator", choices=("evaluator", "self"))
    ap.add_argument("--rank", default=None)
    ap.add_argument("--verify", type=int, default=None)
    ap.add_argument("--gradient-steps", type=int, default=None)
    ap.add_argument("--gradient-gate", type=float, default=None)
    ap.add_argument("--search-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fields = {k: v for k, v in (("rank", args.rank), ("verify", args.verify), ("gradient_steps", args.gradient_steps),
                                ("gradient_gate", args.gradient_gate),
                                ("search_steps", args.search_steps)) if v is not None}
    config = SearchConfig(objective=args.objective, max_k=4, **fields)
    gt_dir = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / (
        "ground_truth_toy" if args.model == "toy" else "ground_truth_toy_flux")
    summary = {c["concept"]: c for c in json.loads((gt_dir / "summary.json").read_text())["concepts"]}
    presence: dict[tuple[str, frozenset], float] = {}
    for line in (gt_dir / "conditions.jsonl").read_text().splitlines():
        r = json.loads(line)
        if len(r["scores"]) == summary[r["concept"]]["n_images"] and not r.get("pooled"):
            presence[(r["concept"], frozenset(r["blocks"]))] = r["presence"]
    names = args.concepts.split(",") if args.concepts else list(summary)
    settings = GroundTruthSettings(concepts=tuple(names), model=args.model)
    plans = {c.concept: c for c in plan_ground_truth(settings)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "searches.jsonl"
    rows = {r["concept"]: r for r in map(json.loads, store.read_text().splitlines())} if store.exists() else {}
    pipe = toy.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    evaluator = get_evaluator("toy")
    for name in names:
        if name in rows:
            continue
        c = plans[name]
        idx = search_prompt_indices(len(c.localization_prompts))
        t0 = time.perf_counter()
        loc = search(pipe, [c.localization_prompts[i] for i in idx], name, config=config, evaluator=evaluator,
                     eval_text=c.eval_text, clean_prompts=[c.localization_clean_prompts[i] for i in idx],
                     seed=list(SEARCH_SEEDS), options=settings.run_options)
        row = {"concept": name, "category": c.category, "sets": [list(s) for s in loc.search.sets],
               "presence": list(loc.search.presence), "baseline": loc.search.baseline, "cost": loc.search.cost,
               "seconds": round(time.perf_counter() - t0, 2)}
        rows[name] = row
        with store.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: {row['sets'][:2]} ({row['seconds']} s)", flush=True)
    (out / "config.json").write_text(json.dumps({"model": args.model, "config": dataclasses.asdict(config),
                                                 "threads": args.threads}, indent=1))
    lines = [f"Search config: {json.dumps(dataclasses.asdict(config))}; model {args.model}",
             "", "| concept | category | S_1 | S_2 | best pair drop | regret@2 | reference regret@2 | regret@4 | reference regret@4 | s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    hits, regrets2, pair_loc, diffs2, diffs4 = [], [], [], [], []
    for name in names:
        if name not in rows:
            continue
        r, o = rows[name], summary[name]["oracle"]
        ref = summary[name]["methods"].get("search") or {}
        base = presence[(name, frozenset())]
        drop = lambda s: None if (name, frozenset(s)) not in presence else base - presence[(name, frozenset(s))]  # noqa: E731
        d1, d2 = drop(r["sets"][0]), drop(r["sets"][1])
        reg2 = o["best_pair_drop"] - d2
        d4 = drop(r["sets"][3]) if len(r["sets"]) > 3 else None
        best4 = o["best_measured"][-1] if o.get("best_measured") else None
        reg4 = None if d4 is None or best4 is None else max(0.0, best4 - d4)
        if o["best_single_drop"] >= STRONG:
            hits.append(abs(d1 - o["best_single_drop"]) <= 1e-9)
        if o["best_pair_drop"] >= PAIR_LOCALIZABLE:
            pair_loc.append(reg2 <= 0.1)
        regrets2.append(reg2)
        ref2 = (ref.get("regret") or {}).get("2")
        ref4 = (ref.get("regret") or {}).get("4")
        if ref2 is not None:
            diffs2.append(reg2 - ref2)
        if ref4 is not None and reg4 is not None:
            diffs4.append(reg4 - ref4)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {name} | {r['category']} | {', '.join(r['sets'][0])} | {', '.join(r['sets'][1])} | "
                     f"{o['best_pair_drop']:.3f} | {reg2:.3f} | {fmt(ref2)} | {fmt(reg4)} | {fmt(ref4)} | {r['seconds']} |")
    m, lo, hi = mean_ci(regrets2)
    lines += ["", f"- concepts: {len(regrets2)}; hit@1 on strong concepts (best single drop >= {STRONG}): "
              f"{sum(hits)}/{len(hits)}; regret@2 <= 0.1 on pair-localizable concepts (best pair drop >= "
              f"{PAIR_LOCALIZABLE}): {sum(pair_loc)}/{len(pair_loc)} (Wilson 95% {wilson(sum(pair_loc), len(pair_loc))})",
              f"- mean regret@2 {m:.3f} [{lo:.3f}, {hi:.3f}] (95% t interval)"]
    for label, d in (("regret@2", diffs2), ("regret@4 (where measured)", diffs4)):
        if d:
            m, lo, hi = mean_ci(d)
            lines.append(f"- {label}, this config minus the exhaustive greedy at 10 steps, paired on {len(d)} concepts: "
                         f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    seconds = [rows[n]["seconds"] for n in names if n in rows]
    lines.append(f"- search wall time per concept: median {np.median(seconds):.1f} s ({args.threads} threads)")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
