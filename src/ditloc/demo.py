"""`ditloc demo`: the whole localize -> verify loop on an embedded toy model
(``toy``, PixArt-alpha, or ``toy-flux``, FLUX; each sampled as it was trained, see `ditloc.toy`).

For one concept of each of the six toy categories: localize it by the set-level
search on training-template prompts (the oracle's soft presence,
at half the sampling steps, over the 8 blocks that read the concept most), take K
from the search's curve (the smallest K whose
set halves presence; its largest set where none does), then on held-out prompts
withhold the concept from the searched K-set and from random K-sets, and measure
its presence with the oracle (the fraction of images it classifies as the
concept). Generating and scoring, the random-K draw and the figures are the
bench's and the report's; the demo adds its prompts (drawn from the toy world)
and its summary. Writes `localization.json` per category, a heat map (categories
x blocks: each block's first-order effect on presence, the search's first ranking), image grids (original | searched set
withheld | random set withheld) and `summary.json`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import _progress
from ._io import write_json
from .bench import ConceptPlan, generate_scored, random_blocks, slugify
from .evaluate.toy import ToyOracle
from .localization import AUTO_K_DROP, SearchConfig, localize
from .options import RunOptions
from .report.figures import grid_figure, heatmap_figure, save_figure
from .toy import world

LOCALIZE_BATCH = 8  # prompts per localize call (localize's default)
#: one concept per category; the word the prompt contains and the oracle label it must produce
DEMO_CONCEPTS = {
    "shape": ("star", "star"),
    "color": ("red", "red"),
    "style": ("striped", "striped"),
    "place": ("beach", "beach"),
    "character": ("blip", "blip"),
    "hazard": ("hazard", "present"),
}


@dataclass(frozen=True)
class DemoConfig:
    model: str = "toy"  # the toy model: "toy" or "toy-flux"
    k: int | None = None  # None: K from the search's curve
    steps: int = 20
    n_localize: int = 6  # training-template prompts per concept (the search's, with `seeds`)
    n_eval: int = 8  # held-out prompts per concept
    seeds: tuple[int, ...] = (0, 1)
    n_random: int = 3  # random K-block sets averaged for the control
    seed: int = 0
    guidance_scale: float | None = None
    max_k: int = 4  # the search's largest set
    search_steps: int | None = None  # None: the default search's (SearchConfig().search_steps), at most `steps`
    search_seeds: tuple[int, ...] = (0, 1)  # the search's images: n_localize prompts x these seeds
    candidates: int | None = None  # None: the search ranks every block (else the M that read the concept most)

    @classmethod
    def fast(cls, model: str = "toy") -> DemoConfig:
        """For CI: the same loop, smaller."""
        return cls(model=model, k=None, steps=4, n_localize=2, n_eval=2, seeds=(0,), n_random=1, max_k=2,
                   candidates=None)

    @classmethod
    def for_model(cls, model: str = "toy") -> DemoConfig:
        """The demo's settings for a toy model, each about 4-5 minutes on 2 CPU cores. toy-flux costs about
        twice the toy PixArt per image (true CFG runs the negative prompt as a second transformer call; FLUX's
        MLPs and RoPE): its search runs on 4 prompts, and 2 random sets are the control."""
        if model == "toy-flux":
            return cls(model=model, n_localize=4, n_random=2)
        return cls(model=model)


def _pin(category: str, concept: str) -> dict:
    if category == "character":
        return {"character": concept}
    if category == "hazard":
        return {"hazard": True, "character": None}
    return {category: concept, "character": None}


def _prompts(rng, category, concept, n, split):
    out = []
    while len(out) < n:
        scene = world.sample_scene(rng, **_pin(category, concept))
        p = world.make_prompt(scene, rng, split, drop_prob=0.0)
        if world.concept_span(p, concept) is not None and p not in out:
            out.append(p)
    return out


def _concept(rng, category: str, concept: str, label: str, cfg: DemoConfig) -> ConceptPlan:
    """The concept's prompts, drawn from `rng`: localization from the training templates, evaluation held out."""
    loc_prompts = _prompts(rng, category, concept, cfg.n_localize, "train")
    eval_prompts = _prompts(rng, category, concept, cfg.n_eval, "heldout")
    return ConceptPlan(category=category, concept=concept, slug=slugify(concept),
                       localization_prompts=tuple(loc_prompts), evaluation_prompts=tuple(eval_prompts),
                       clean_prompts=tuple(world.clean_prompt(p, category, concept) for p in eval_prompts),
                       eval_text=f"{category}: {label}")


def _scaled(scores: list[float]) -> list[float]:
    """Min-max scaled to [0, 1] over the measured scores (all 0 when they are equal); a block not
    measured stays NaN (the heat map's "not searched")."""
    measured = [s for s in scores if not np.isnan(s)]
    lo, hi = min(measured, default=0.0), max(measured, default=0.0)
    return [s if np.isnan(s) else (s - lo) / (hi - lo) if hi > lo else 0.0 for s in scores]


def run_demo(out_dir="runs/demo", config: DemoConfig | None = None, *, pipe=None, oracle=None, progress=print) -> dict:
    """Run the demo; returns the summary (also written to `out_dir/summary.json`)."""
    from .toy import load_pipeline

    cfg = config or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pipe = pipe if pipe is not None else load_pipeline(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    evaluator = ToyOracle(oracle, hard=True)  # presence: the oracle classifies the image as the concept
    rng = np.random.default_rng(cfg.seed)
    # the other sampling settings are the toy model's own (ditloc.toy.ToyModel.call_defaults); both toys were
    # trained on prompts padded to 32 tokens (PixArt masks the padding: 32 gives the images of its default 120)
    options = RunOptions(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, max_sequence_length=32)
    options.resolve(pipe)  # settings the pipeline cannot take are refused before any work
    summary, heat = {}, {}
    # one bar over every denoising step: per category one localize call per batch, then one generate call per
    # condition (original, top-K, each random set)
    # pruning to the 8 blocks that read the concept most keeps the demo within 5 minutes on 2 CPU cores; on the
    # toy ground truth it kept both blocks of every concept's best pair (15 of 15, docs/recipes.md)
    # K from the curve (the smallest K whose set halves presence): the search stops at that K
    search = SearchConfig(objective="evaluator", max_k=cfg.max_k, candidates=cfg.candidates,
                          candidate_method="contribution", search_steps=min(cfg.search_steps or SearchConfig().search_steps, cfg.steps),
                          stop_drop=AUTO_K_DROP if cfg.k is None else None)
    with _progress.bar(desc="demo", unit="set") as bar:
        for n, (category, (concept, label)) in enumerate(DEMO_CONCEPTS.items(), 1):
            c = _concept(rng, category, concept, label, cfg)
            bar.set_description(f"demo [{n}/6] {category}: search")
            progress(f"[{n}/6] {category} {concept!r}: search block sets on {len(c.localization_prompts)} prompts x "
                     f"{len(cfg.search_seeds)} seed(s) ({_progress.elapsed(t0)} since the start)")

            def tick(done, total):
                bar.total, bar.n = total, done
                bar.refresh()

            loc = localize(pipe, list(c.localization_prompts), concept, method="search", search=search,
                           evaluator=ToyOracle(oracle), eval_text=c.eval_text, seed=list(cfg.search_seeds),
                           clean_prompts=[world.clean_prompt(p, category, concept) for p in c.localization_prompts],
                           options=options, progress=tick)
            loc.save(out / category / "localization.json")
            heat[category] = loc.scores.tolist()  # the search's first ranking: each block's attribution at the baseline
            k = cfg.k if cfg.k is not None else loc.k_auto()
            top, blocks = loc.top(k), list(loc.blocks)
            random_sets = [random_blocks(blocks, k, rng) for _ in range(cfg.n_random)]
            bar.set_description(f"demo [{n}/6] {category}: verify")
            progress(f"[{n}/6] {category}: generate {len(c.evaluation_prompts)}x{len(cfg.seeds)} held-out images, "
                     f"withhold the searched {k}-set {top} vs {cfg.n_random} random sets")
            before, withheld, *randoms = [generate_scored(pipe, c, withhold, evaluator, seeds=cfg.seeds,
                                                          options=options)
                                          for withhold in [None, top, *random_sets]]  # (images, scores) each
            summary[category] = {
                "concept": concept,
                "oracle_label": label,
                "k": k,
                "k_from_curve": cfg.k is None,
                "auto_k": loc.search.k_for_drop(AUTO_K_DROP),
                "top_k_blocks": top,
                "curve": loc.search.relative_curve,
                "search_sets": [list(x) for x in loc.search.sets],
                "search_generations": loc.search.cost["generations"],
                "random_k_blocks": random_sets,
                "presence_before": float(np.mean(before[1])),
                "presence_top_k": float(np.mean(withheld[1])),
                "presence_random_k": float(np.mean([np.mean(scores) for _, scores in randoms])),
                "n_images": len(before[0]),
                "localization_prompts": list(c.localization_prompts),
                "eval_prompts": list(c.evaluation_prompts),
                "clean_prompts": list(c.clean_prompts),
            }
            samples = [(i, seed) for i in range(len(c.evaluation_prompts)) for seed in cfg.seeds][:4]
            save_figure(grid_figure([[before[0][r], withheld[0][r], randoms[0][0][r]] for r in range(len(samples))],
                                    ["original", f"searched {k}-set withheld", f"random {k}-set withheld"],
                                    [f"p{i}: {c.evaluation_prompts[i]}\nseed {seed}" for i, seed in samples],
                                    title=f"{category} / {concept}: original and withheld"),
                        out / category / "grid.png")
    rows = {f"{category}: {summary[category]['concept']}": _scaled(scores) for category, scores in heat.items()}
    marked = {f"{category}: {e['concept']}": e["top_k_blocks"] for category, e in summary.items()}
    save_figure(heatmap_figure(rows, list(loc.blocks), title="Each block's first-order effect on presence",
                               subtitle="the search's first ranking (attribution at the baseline, the other blocks "
                                        "half withheld); each row scaled to its own range (lowest white, highest red)",
                               quantity="attribution (scaled per row)", marked=marked,
                               mark_label="searched set (withheld)", row_axis="category: concept"),
                out / "heatmap.png")
    result = {
        "categories": summary,
        "blocks": list(loc.blocks),
        "settings": {**asdict(cfg), "seconds": round(time.time() - t0, 1)},
    }
    write_json(out / "summary.json", result)
    return result


def _short(block: str) -> str:
    """A block's name in the table: its index (``block.3`` -> 3), led by its kind's initial where a model has
    two (``double.1`` -> d1, ``single.4`` -> s4)."""
    kind, _, index = block.partition(".")
    return index if kind == "block" else kind[:1] + index


def format_table(result: dict) -> str:
    lines = [(f"{'category':<10} {'concept':<9} {'searched set':<16} {'K':>2} {'before':>7} {'searched':>9} "
              f"{'random':>7}")]
    for cat, e in result["categories"].items():
        k = f"{e['k']}" + ("" if not e.get("k_from_curve") or e.get("auto_k") else "*")
        lines.append(
            f"{cat:<10} {e['concept']:<9} {','.join(_short(b) for b in e['top_k_blocks']):<16} {k:>2} "
            f"{e['presence_before']:>7.2f} {e['presence_top_k']:>9.2f} {e['presence_random_k']:>7.2f}"
        )
    if any(e.get("k_from_curve") and not e.get("auto_k") for e in result["categories"].values()):
        lines.append("* no set of up to max-K blocks halved presence in the search: its largest set")
    return "\n".join(lines)
