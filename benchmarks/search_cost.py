"""Cost of the set-level search as a ratio to one plain generation of the
same prompts, measured side by side in one process: search to K = 4 with and without
candidate pruning, with the evaluator objective and with the model as its own judge.

    python benchmarks/search_cost.py --model toy                       # the shipped toy PixArt, toy oracle
    python benchmarks/search_cost.py --model toy-flux                  # the shipped toy FLUX
    python benchmarks/search_cost.py --model pixart --size small       # CPU-sized shapes of each family
    python benchmarks/search_cost.py --model flux --size small
    python benchmarks/search_cost.py --counts                          # generations at real-model sizes
    python benchmarks/search_cost.py --depth --steps 6                 # 12 vs 57 blocks of a tiny FLUX shape

Every run uses the same prompts x seeds; the plain generation runs at `--steps` sampling
steps; the default search at its own (`SearchConfig().search_steps`), the exhaustive greedy
(rank "generation") at `--search-steps` (default half of `--steps`).
On the toy the evaluator is the toy oracle; on random-weight shapes a stand-in (the
mean of one color channel: cheap, so the evaluator objective's ratio is the generations'
own cost). Wall times are medians of `--repeats` runs after one warm-up; the search
runs without a checkpoint. Benchmark idle: other processes on the cores change the
numbers, not only the ratios.

`--counts` prints, without running anything, the number of generations the search needs
(one generation = every prompt x seed once, at the search's steps) for PixArt-XL (28 blocks),
SANA-1600M (20), SD3.5-large (38) and FLUX.1-dev (57), and the equivalent number of plain
generations at 20 steps: the exhaustive greedy at 10 steps, and the default search.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ditloc  # noqa: E402
from ditloc.evaluate.base import Evaluator  # noqa: E402
from ditloc.localization import SearchConfig  # noqa: E402
from ditloc.localization.judge import DRAWS, LEVELS  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from localize_overhead import SHAPES, build_pipeline  # noqa: E402

TOY_PROMPTS = ["a zibbit in the forest", "a photo of a zibbit on the beach", "there is a zibbit in the snow",
               "a picture of a zibbit at night", "a zibbit in the desert", "a drawing of a zibbit in the ocean"]
SHAPE_PROMPTS = [f"a photo of van gogh {w}" for w in ("at night", "in the city", "with a dog", "by the river",
                                                       "in the snow", "on the beach")]


class MeanChannel(Evaluator):
    """A stand-in evaluator for random-weight shapes: the mean of the red channel."""

    def _score_batch(self, images, texts):
        return np.array([np.asarray(im, dtype=np.float64)[..., 0].mean() / 255 for im in images])


def generations(n_blocks: int, max_k: int = 4, candidates: int | None = None, objective: str = "evaluator") -> int:
    """Generations of the exhaustive greedy forward search (rank "generation", beam 1): the
    baseline, (the clean prompt's for self), and m + (m-1) + ... + (m-max_k+1) sets over m blocks."""
    m = candidates or n_blocks
    return 1 + (objective == "self") + sum(m - k for k in range(max_k))


def ranked_generations(max_k: int = 4, verify: int = 2, objective: str = "evaluator") -> int:
    """Generations of the gradient-ranked search (the default): the baseline, (the clean prompt's
    for self), and `verify` sets per step, whatever the number of blocks (a kept set the
    ranking did not expect to win is generated once more; not counted)."""
    return 1 + (objective == "self") + max_k * verify


def counts_table(steps: int = 20) -> str:
    """Generations for real-model sizes, and their cost in plain generations at `steps`."""
    default = SearchConfig()
    s_new, verify, g_steps = default.search_steps, default.verify, default.gradient_steps
    lines = ["| model | blocks | search | generations | = plain generations at 20 steps |", "|---|---:|---|---:|---:|"]
    # rows of one denoising step: PixArt, SANA and SD3.5 sample with CFG (2), FLUX.1-dev is guidance-distilled (1)
    models = (("PixArt-XL", 28, 2), ("SANA-1600M", 20, 2), ("SD3.5-large", 38, 2),
              ("FLUX.1-dev (19 double + 38 single)", 57, 1))
    for name, n, rows in models:
        for objective in ("evaluator", "self"):
            # self: each image is also judged by len(LEVELS) x DRAWS x 2 single-row forwards
            judge = len(LEVELS) * DRAWS * 2 / rows
            g = generations(n, 4, None, objective)
            plain = g * 10 / steps * (1 + (judge / 10 if objective == "self" else 0.0))
            lines.append(f"| {name} | {n} | exhaustive greedy K <= 4, 10 steps, {objective} | {g} | {plain:.0f} |")
            g = ranked_generations(4, verify, objective)
            # a gradient step: a clean pass, a differentiable forward and its backward (~2 forwards) of the
            # conditional rows, at `g_steps` steps of each of the K kept sets; the VAE decode is not counted
            extra = 4 * g_steps * 4 / (rows * steps)
            plain = g * s_new / steps * (1 + (judge / s_new if objective == "self" else 0.0)) + extra
            lines.append(f"| {name} | {n} | default (gradient, verify {verify}, {s_new} steps), {objective} | {g} | "
                         f"{plain:.1f} |")
    return "\n".join(lines)


def _pipe(model: str, size: str):
    if model in ("toy", "toy-flux"):
        pipe = ditloc.toy.load_pipeline(model)
        run = dict(max_sequence_length=32) if model == "toy-flux" else dict(max_sequence_length=32, clean_caption=False)
        return pipe, TOY_PROMPTS, "zibbit", None, run
    pipe, call = build_pipeline(model, SHAPES[model][size], "cpu", torch.float32)  # call: the shape's pipe(...) kwargs
    return pipe, SHAPE_PROMPTS, "van gogh", MeanChannel(), dict(call)


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    pipe, prompts, concept, evaluator, run = _pipe(args.model, args.size)
    pipe.set_progress_bar_config(disable=True)
    prompts = prompts[: args.prompts]
    seeds = list(range(args.seeds))
    n_blocks = len(ditloc.get_adapter(pipe).block_names())
    search_steps = args.search_steps or max(2, args.steps // 2)
    candidates = args.candidates or max(args.max_k, 2 * n_blocks // 3)
    variants = {"plain": None}
    for objective in ("evaluator", "self"):
        variants[f"search {objective} (default)"] = SearchConfig(objective=objective, max_k=args.max_k)
        if args.variants == "default":  # the exhaustive greedy once, as the reference
            if objective == "evaluator":
                variants["exhaustive greedy evaluator"] = SearchConfig(
                    objective=objective, max_k=args.max_k, search_steps=search_steps, rank="generation")
            continue
        for cand in (None, candidates):
            label = f"exhaustive greedy {objective}" + (f", candidates {cand}" if cand else "")
            variants[label] = SearchConfig(objective=objective, max_k=args.max_k, candidates=cand,
                                           search_steps=search_steps, rank="generation")

    def run_variant(config):
        t0 = time.perf_counter()
        if config is None:
            ditloc.generate(pipe, prompts, seed=seeds, num_inference_steps=args.steps, output_type="latent", **run)
            return time.perf_counter() - t0, None
        loc = ditloc.localize(pipe, prompts, concept, method="search", search=config, evaluator=evaluator,
                              seed=seeds, num_inference_steps=args.steps, **run)
        return time.perf_counter() - t0, loc

    for config in variants.values():  # warm-up
        if config is None:
            run_variant(None)
    times = {name: [] for name in variants}
    found = {}
    for _ in range(args.repeats):
        for name, config in variants.items():
            seconds, loc = run_variant(config)
            times[name].append(seconds)
            if loc is not None:
                found[name] = {"sets": [list(s) for s in loc.search.sets], "generations": loc.search.cost["generations"]}
    plain = statistics.median(times["plain"])
    rows = {name: {"seconds": statistics.median(t), "ratio": statistics.median(t) / plain, **found.get(name, {})}
            for name, t in times.items()}
    return {"model": args.model, "size": args.size if not args.model.startswith("toy") else None, "blocks": n_blocks,
            "prompts": len(prompts), "seeds": len(seeds), "steps": args.steps, "search_steps": search_steps,
            "max_k": args.max_k, "threads": args.threads, "repeats": args.repeats, "rows": rows,
            "cpu": _cpu_name(), "torch": torch.__version__}


def depth_scan(args) -> dict:
    """The default search's cost at 12 and 57 blocks of the same tiny FLUX shape (4 + 8 and
    19 + 38 double + single blocks), each as a ratio to a plain generation of that model,
    with the generations it counted against `ranked_generations`."""
    import dataclasses

    torch.set_num_threads(args.threads)
    base = SHAPES["flux"]["tiny"]
    rows = {}
    for double, single in ((4, 8), (19, 38)):
        shape = dataclasses.replace(base, config=dict(base.config, num_layers=double, num_single_layers=single))
        pipe, call = build_pipeline("flux", shape, "cpu", torch.float32)
        pipe.set_progress_bar_config(disable=True)
        prompts, seeds = SHAPE_PROMPTS[: args.prompts], list(range(args.seeds))
        config = SearchConfig(max_k=args.max_k, search_steps=None)
        kw = dict(call, num_inference_steps=args.steps)
        ditloc.generate(pipe, prompts, seed=seeds, output_type="latent", **kw)  # warm-up
        plain, search = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ditloc.generate(pipe, prompts, seed=seeds, output_type="latent", **kw)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            loc = ditloc.localize(pipe, prompts, "van gogh", method="search", search=config, evaluator=MeanChannel(),
                                  seed=seeds, **kw)
            search.append(time.perf_counter() - t0)
        n = double + single
        rows[n] = {"plain_s": statistics.median(plain), "search_s": statistics.median(search),
                   "ratio": statistics.median(search) / statistics.median(plain),
                   "sets_evaluated": loc.search.cost["sets_evaluated"], "generations": loc.search.cost["generations"],
                   "gradient_generations": loc.search.cost["gradient_generations"],
                   "formula_sets": ranked_generations(args.max_k, config.verify)}
    return rows


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy", choices=("toy", "toy-flux", "pixart", "sana", "flux", "sd3"))
    ap.add_argument("--size", default="small", choices=("tiny", "small"))
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--search-steps", type=int, default=None)
    ap.add_argument("--max-k", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=None, help="default: 2/3 of the blocks")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--counts", action="store_true", help="only the generation counts at real-model sizes")
    ap.add_argument("--variants", default="all", choices=("all", "default"),
                    help="default: plain, the default search (both objectives) and the exhaustive greedy (evaluator)")
    ap.add_argument("--depth", action="store_true",
                    help="the default search at 12 and 57 blocks of a tiny FLUX shape (search steps = --steps)")
    args = ap.parse_args(argv)
    if args.counts:
        print(counts_table())
        return 0
    if args.depth:
        rows = depth_scan(args)
        print(f"tiny FLUX, {args.prompts} prompts x {args.seeds} seeds, {args.steps} steps, K <= {args.max_k}, "
              f"{args.threads} threads, {_cpu_name()}")
        print(f"{'blocks':>6} {'plain s':>8} {'search s':>9} {'x plain':>8} {'sets':>5} {'formula':>8} {'gradient':>8}")
        for n, r in rows.items():
            print(f"{n:>6} {r['plain_s']:>8.2f} {r['search_s']:>9.2f} {r['ratio']:>8.2f} {r['sets_evaluated']:>5} "
                  f"{r['formula_sets']:>8} {r['gradient_generations']:>8}")
        print(f"57 blocks / 12 blocks, in plain generations: {rows[57]['ratio'] / rows[12]['ratio']:.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    result = measure(args)
    print(f"{args.model} ({result['blocks']} blocks), {result['prompts']} prompts x {result['seeds']} seeds, "
          f"{args.steps} steps (search {result['search_steps']}), {args.threads} threads, {result['cpu']}")
    print(f"{'run':<40} {'seconds':>8} {'x plain':>8} {'generations':>12}  sets")
    for name, r in result["rows"].items():
        print(f"{name:<40} {r['seconds']:>8.2f} {r['ratio']:>8.1f} {r.get('generations', ''):>12}  {r.get('sets', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
