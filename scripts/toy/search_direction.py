"""The set-level search of the ground truth, rerun with another `SearchConfig.direction`, and its sets judged
on the ground truth's held-out images.

    python scripts/toy/search_direction.py --model toy-flux --concepts forest --direction both \
        --gt benchmarks/results/ground_truth_toy_flux --out benchmarks/results/search_direction_toy_flux

The ground truth runs the search forward (greedy selection). When several blocks hold a concept redundantly
(forest on the toy FLUX: either stream alone draws it), every single block removes ~0 and the forward steps
choose on noise; backward elimination starts from every block withheld. This script reruns the ground truth's
search (its 6 prompts x seeds 0, 1, 10 steps, the oracle's presence) with `--direction`, then measures each S_K
on the ground truth's 32 held-out images: from `--gt`'s conditions.jsonl where the set is there, else generated
here (the ground truth's prompts, seeds and sampling). Writes `concepts/<concept>.<direction>.json` (sets, the
search's own presences, sets evaluated, every held-out image's score) and `search_direction.md` (held-out drop
per K with its 95% interval, beside the ground truth's forward search). Resumable: the search keeps every
evaluated set in `searches/`, a finished concept keeps its file; two runs on different concepts can share `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ditloc.bench.ground_truth import (GroundTruthSettings, plan_ground_truth, read_conditions, read_localizations,
                                       sample_calls)
from ditloc.bench.ground_truth.settings import MAX_K, SEARCH_SEEDS, SEARCH_STEPS, search_prompt_indices
from ditloc.bench.runner import generate_scored
from ditloc.evaluate import get_evaluator
from ditloc.localization import SearchConfig, search
from ditloc.stats import mean_ci
from ditloc.toy import load_pipeline


def held_out(pipe, c, blocks: list[str], n_images: int, evaluator, options) -> list[float]:
    """The set's scores on the ground truth's held-out images, in its `samples` order."""
    scores = []
    for plan, seeds in sample_calls(c, n_images):
        _, v = generate_scored(pipe, plan, blocks, evaluator, seeds=seeds, batch_size=64, options=options)
        scores += [float(x) for x in v]
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="toy-flux")
    ap.add_argument("--concepts", default="forest")
    ap.add_argument("--direction", default="both", choices=("forward", "backward", "both"))
    ap.add_argument("--gt", default="benchmarks/results/ground_truth_toy_flux")
    ap.add_argument("--out", default="benchmarks/results/search_direction_toy_flux")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gt, out = Path(args.gt), Path(args.out)
    record = json.loads((gt / "ground_truth.json").read_text())
    n_images = record["settings"]["n_images"]
    settings = GroundTruthSettings(model=args.model, concepts=tuple(args.concepts.split(",")), n_images=n_images,
                                   steps=record["settings"]["steps"])
    plans = plan_ground_truth(settings)  # checks the names before the model loads
    measured, locs = read_conditions(gt), read_localizations(gt)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concepts").mkdir(exist_ok=True)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    evaluator = get_evaluator("toy")
    for c in plans:
        path = out / "concepts" / f"{c.slug}.{args.direction}.json"  # one file per concept: runs can share `out`
        if path.exists():
            continue
        idx = search_prompt_indices(len(c.localization_prompts))
        t = time.time()
        checkpoint = out / "searches" / f"{c.slug}.{args.direction}.jsonl"
        loc = search(pipe, [c.localization_prompts[i] for i in idx], c.concept,
                     config=SearchConfig(objective="evaluator", max_k=MAX_K, search_steps=SEARCH_STEPS, rank="generation",
                                         direction=args.direction),
                     evaluator=evaluator, eval_text=c.eval_text,
                     clean_prompts=[c.localization_clean_prompts[i] for i in idx], seed=list(SEARCH_SEEDS),
                     options=settings.run_options, checkpoint=checkpoint)
        s, seconds = loc.search, time.time() - t
        # every set the search evaluated, this call or an earlier one it resumed (one generation each)
        evaluated = sum(1 for line in checkpoint.read_text().splitlines() if line.startswith('{"set"'))
        have = measured.get((c.category, c.concept), {})
        scores = {"": have[frozenset()]}
        for x in s.sets:
            name = ",".join(x)
            full = have.get(frozenset(x))
            scores[name] = full if full is not None and len(full) == n_images else held_out(
                pipe, c, list(x), n_images, evaluator, settings.run_options)
            print(f"{c.concept} ({args.direction}) K={len(x)} {name}: held-out presence "
                  f"{np.mean(scores[name]):.3f}", flush=True)
        forward = locs.get((c.category, c.concept, "search"))
        result = {"category": c.category, "concept": c.concept, "direction": args.direction,
                     "sets": [list(x) for x in s.sets], "search_presence": list(s.presence),
                     "search_baseline": s.baseline, "auto_k": s.k_for_drop(), "sets_evaluated": evaluated,
                     "this_call": {**s.cost, "seconds": round(seconds, 1), "threads": args.threads}, "scores": scores,
                     "forward_sets": forward["sets"] if forward else None,
                     "forward_auto_k": forward["auto_k"] if forward else None}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)
    done = [json.loads(p.read_text()) for p in sorted((out / "concepts").glob("*.json"))]
    summary = json.loads((gt / "summary.json").read_text())
    write_markdown(done, measured, summary, out / "search_direction.md", n_images)


def compare(done: list[dict], measured: dict, summary: dict) -> tuple[dict, list[str]]:
    """Per concept: the held-out drop of this direction's S_K and of the forward search's, the best drop
    measured at K (the ground truth's sets and this direction's), and the oracle K from those; then the
    paired differences over concepts. Returns (per-concept rows, the summary lines)."""
    oracles = {(c["category"], c["concept"]): c["oracle"] for c in summary["concepts"]}
    rows, diffs, hits = {}, {2: [], 4: []}, {"this": [], "forward": []}
    for d in done:
        o = oracles.get((d["category"], d["concept"]))
        have = measured.get((d["category"], d["concept"]), {})
        if o is None or not d["forward_sets"]:
            continue
        base = float(np.mean(d["scores"][""]))
        this = [base - float(np.mean(d["scores"][",".join(x)])) for x in d["sets"]]
        fwd = [base - float(np.mean(have[frozenset(x)])) for x in d["forward_sets"]]
        gt_best = [o["best_single_drop"], o["best_pair_drop"], *o["best_measured"]]
        best = [max(a, b) for a, b in zip(gt_best, this)]
        oracle_k = next((k for k, b in enumerate(best, 1) if base - b < 0.5 * base), None)
        rows[d["concept"]] = {"this": this, "forward": fwd, "best": best, "oracle_k": oracle_k}
        for k in diffs:
            diffs[k].append(this[k - 1] - fwd[k - 1])
        if oracle_k is not None:
            hits["this"].append(d["auto_k"] == oracle_k)
            hits["forward"].append(d["forward_auto_k"] == oracle_k)
    lines = []
    for k, v in diffs.items():
        if len(v) >= 2:
            m, lo, hi = mean_ci(v)
            lines.append(f"- Held-out drop of S_{k}, this direction minus forward, paired over {len(v)} concepts: "
                         f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]; higher on {sum(x > 1e-9 for x in v)}, lower on "
                         f"{sum(x < -1e-9 for x in v)}.")
    n = len(hits["this"])
    if n:
        lines.append(f"- Automatic K equal to the oracle K (from every measured set, this direction's included), "
                     f"over the {n} concepts that have one: this direction {sum(hits['this'])} of {n}, forward "
                     f"{sum(hits['forward'])} of {n}.")
    return rows, lines


def write_markdown(done: list[dict], measured: dict, summary: dict, path: Path, n: int) -> None:
    lines = ["# The ground truth's search with another direction", "",
             f"Held-out drop = baseline - presence on the ground truth's n = {n} held-out images (mean toy-oracle "
             "score), 95% normal interval over images, paired with the baseline. Forward: the ground truth's own "
             "search (`search` in its summary; 43 sets evaluated). Sets evaluated: each is one batched generation of the search's 12 images "
             "(6 prompts x 2 seeds, 10 steps).", "",
             "| concept | direction | K | set | held-out drop | forward's set | its drop | auto K (forward) | "
             "sets evaluated |", "|---|---|---|---|---|---|---|---|---|"]
    for d in done:
        have = measured.get((d["category"], d["concept"]), {})
        base = np.asarray(d["scores"][""])
        for i, x in enumerate(d["sets"]):
            m, lo, hi = mean_ci(base - np.asarray(d["scores"][",".join(x)]))
            fwd = (d["forward_sets"] or [None] * len(d["sets"]))[i]
            fdrop = (f"{float(np.mean(base - np.asarray(have[frozenset(fwd)]))):.3f}"
                     if fwd and frozenset(fwd) in have else "–")
            lines.append(f"| {d['concept']} | {d['direction']} | {len(x)} | {', '.join(x)} | {m:.3f} [{lo:.3f}, "
                         f"{hi:.3f}] | {', '.join(fwd) if fwd else '–'} | {fdrop} | "
                         f"{d['auto_k'] if d['auto_k'] is not None else '> 4'} "
                         f"({d['forward_auto_k'] if d['forward_auto_k'] is not None else '> 4'}) | "
                         f"{d['sets_evaluated']} |")
    rows, summary_lines = compare(done, measured, summary)
    if rows:
        lines += ["", "## Against the forward search", "",
                  "Held-out drop per K (this direction / forward), the best drop measured at K by any set, and the "
                  "oracle K from those.", "",
                  "| concept | K=1 | K=2 | K=3 | K=4 | best at K=4 | oracle K |", "|---|---|---|---|---|---|---|"]
        for concept, r in rows.items():
            lines.append(f"| {concept} | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(r["this"], r["forward"]))
                         + f" | {r['best'][3]:.3f} | {r['oracle_k'] if r['oracle_k'] is not None else '> 4'} |")
        lines += [""] + summary_lines
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
