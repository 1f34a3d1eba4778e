"""The pooled vector and the two block streams of the toy FLUX, per concept: a
quick probe with the ground truth's own held-out images, while `ditloc ground-truth --model toy-flux` (which
measures the same conditions after its full search, `ditloc.bench.ground_truth.joint`) runs.

    python scripts/toy/probe_joint.py --concepts zibbit,hazard,star,red,striped,beach,blip \
        --out benchmarks/results/joint_probe_toy_flux

Per concept, the ground truth's held-out images (`--n-images`, its prompts and seeds, 20 steps, the model's own
sampling) under these conditions (withholding swaps the text tokens of the chosen blocks and, by
default, the pooled vector of every block):

    baseline                   plain
    pooled only                no block withheld, every block given the clean prompt's pooled vector
    all blocks, text only      every block's text tokens withheld, the pooled vector left full
    all <stream>, text only    every double- (or single-) stream block's text tokens withheld, pooled full
    all <stream>               the same with the clean pooled vector (ditloc's default)

Presence: the toy oracle's soft score, as in the ground truth (`get_evaluator("toy")`). Writes `probe.json`
(every image's score) and `probe.md` (means and paired differences, each with its 95% normal interval).
Resumable: finished concepts are kept in probe.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ditloc.bench.ground_truth import GroundTruthSettings, plan_ground_truth, sample_calls
from ditloc.bench.runner import generate_scored
from ditloc.evaluate import get_evaluator
from ditloc.stats import mean_ci
from ditloc.toy import load_pipeline


def conditions(blocks: list[str]) -> list[tuple[str, list[str] | None, str | None]]:
    double = [b for b in blocks if b.startswith("double.")]
    single = [b for b in blocks if b.startswith("single.")]
    return [("baseline", None, None), ("pooled only", [], "clean"), ("all blocks, text only", blocks, "full"),
            ("all double, text only", double, "full"), ("all double", double, None),
            ("all single, text only", single, "full"), ("all single", single, None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", default="zibbit,hazard,star,red,striped,beach,blip")
    ap.add_argument("--n-images", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/joint_probe_toy_flux")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "probe.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    settings = GroundTruthSettings(model="toy-flux", concepts=tuple(args.concepts.split(",")), n_images=args.n_images)
    plans = plan_ground_truth(settings)  # checks the names before the model loads
    pipe = load_pipeline("toy-flux")
    pipe.set_progress_bar_config(disable=True)
    evaluator = get_evaluator("toy")
    from ditloc.adapters import get_adapter

    blocks = get_adapter(pipe).block_names()
    for c in plans:
        if c.concept in done:
            continue
        groups = sample_calls(c, args.n_images)  # the ground truth's images, in its order
        rows = {}
        for label, withheld, pooled in conditions(blocks):
            t = time.time()
            kw = {} if pooled is None else {"pooled": pooled}
            scores = []
            for plan, seeds in groups:
                _, v = generate_scored(pipe, plan, withheld, evaluator, seeds=seeds, batch_size=64,
                                       options=settings.run_options, **kw)
                scores += [float(x) for x in v]
            rows[label] = scores
            print(f"{c.category}/{c.concept}: {label} {np.mean(rows[label]):.3f} ({time.time() - t:.0f}s)", flush=True)
        done[c.concept] = {"category": c.category, "conditions": rows}
        path.write_text(json.dumps({k: done[k] for k in done}, indent=1))
    write_markdown(done, out / "probe.md", args.n_images)


def write_markdown(done: dict, path: Path, n: int) -> None:
    def rate(v):
        m, lo, hi = mean_ci(v)
        return f"{m:.2f} [{lo:.2f}, {hi:.2f}]"

    def diff(a, b):
        m, lo, hi = mean_ci(np.asarray(a) - np.asarray(b))
        return f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]"

    labels = [x[0] for x in conditions(["double.0", "single.0"])]
    lines = ["# The pooled vector and the block streams of the toy FLUX (probe)", "",
             f"n = {n} held-out images per cell (the ground truth's prompts and seeds), 20 steps, true CFG 4; "
             "presence = mean toy-oracle score (soft, as in the ground truth), 95% normal interval over images.", "",
             "| category | concept | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for concept, d in done.items():
        r = d["conditions"]
        lines.append(f"| {d['category']} | {concept} | " + " | ".join(rate(r[x]) for x in labels) + " |")
    lines += ["", "Paired differences over the same images (mean, 95% normal interval):", "",
              "| concept | pooled only - baseline | all double: default - text only | all single: default - text only "
              "| all double, text only - all single, text only |", "|---|---|---|---|---|"]
    for concept, d in done.items():
        r = d["conditions"]
        lines.append(f"| {concept} | {diff(r['pooled only'], r['baseline'])} | "
                     f"{diff(r['all double'], r['all double, text only'])} | "
                     f"{diff(r['all single'], r['all single, text only'])} | "
                     f"{diff(r['all double, text only'], r['all single, text only'])} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
