"""`ditloc demo`: the whole localize -> verify loop on the embedded toy model.

For one concept of each of the six toy categories: localize it with
training-template prompts, then on held-out prompts withhold it from the top-K
blocks and from random K blocks, and measure its presence with the oracle.
Writes `localization.json` per category, a heat map (categories x blocks),
image grids (original | top-K withheld | random-K withheld) and `summary.json`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .._io import write_json
from .. import generate, localize
from . import world

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
    k: int = 3
    steps: int = 20
    n_localize: int = 6  # training-template prompts per concept
    n_eval: int = 8  # held-out prompts per concept
    seeds: tuple[int, ...] = (0, 1)
    n_random: int = 3  # random K-block sets averaged for the control
    seed: int = 0
    guidance_scale: float | None = None

    @classmethod
    def fast(cls) -> "DemoConfig":
        """For CI: the same loop, smaller."""
        return cls(k=3, steps=4, n_localize=2, n_eval=2, seeds=(0,), n_random=1)


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


def _presence(oracle, images: np.ndarray, category: str, label: str) -> float:
    labels = oracle.classify(images).labels[category]
    return float(np.mean([x == label for x in labels]))


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def _grid(columns: list[np.ndarray], titles: list[str], scale: int = 4) -> Image.Image:
    """Rows = images, columns = conditions; nearest-neighbour upscaled."""
    n, h, w, _ = columns[0].shape
    pad, head = 4, 14
    W, H = len(columns) * (w * scale + pad) + pad, head + n * (h * scale + pad) + pad
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (imgs, title) in enumerate(zip(columns, titles)):
        x = pad + c * (w * scale + pad)
        draw.text((x, 1), title, fill="black")
        for r in range(n):
            tile = Image.fromarray(imgs[r]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (x, head + pad + r * (h * scale + pad)))
    return canvas


def _heatmap(rows: dict[str, list[float]], blocks: list[str], path: Path, cell: int = 28) -> None:
    """Categories x blocks, each row min-max scaled (white = its lowest block, red = its highest)."""
    left, top = 80, 40
    W, H = left + cell * len(blocks) + 10, top + cell * len(rows) + 10
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 4), "attention contribution (each row: min white, max red)", fill="black")
    for j, b in enumerate(blocks):
        d.text((left + j * cell + 6, 22), b.split(".")[-1], fill="black")
    for i, (name, scores) in enumerate(rows.items()):
        lo, hi = min(scores), max(scores)
        d.text((4, top + i * cell + 8), name, fill="black")
        for j, s in enumerate(scores):
            v = (s - lo) / (hi - lo) if hi > lo else 0.0
            color = (255, int(255 * (1 - v)), int(255 * (1 - v)))
            d.rectangle([left + j * cell, top + i * cell, left + (j + 1) * cell - 2, top + (i + 1) * cell - 2], fill=color)
    img.save(path)


def run_demo(out_dir="runs/demo", config: DemoConfig | None = None, *, pipe=None, oracle=None, progress=print) -> dict:
    """Run the demo; returns the summary (also written to `out_dir/summary.json`)."""
    from . import load_pipeline
    from .oracle import load_oracle

    cfg = config or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pipe = pipe if pipe is not None else load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    oracle = oracle if oracle is not None else load_oracle()
    rng = np.random.default_rng(cfg.seed)
    # the toy prompts are < 32 tokens and padding is masked: 32 gives the same images as the default 120, faster
    common = dict(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, clean_caption=False,
                  max_sequence_length=32)
    summary, heat = {}, {}
    for n, (category, (concept, label)) in enumerate(DEMO_CONCEPTS.items(), 1):
        loc_prompts = _prompts(rng, category, concept, cfg.n_localize, "train")
        eval_prompts = _prompts(rng, category, concept, cfg.n_eval, "heldout")
        clean = [world.clean_prompt(p, category, concept) for p in eval_prompts]
        progress(f"[{n}/6] {category} {concept!r}: localize on {len(loc_prompts)} prompts ({time.time() - t0:.0f}s)")
        loc = localize(pipe, loc_prompts, concept, seed=cfg.seed, **common)
        loc.save(out / category / "localization.json")
        heat[category] = loc.scores.tolist()
        top = loc.top(cfg.k)
        blocks = list(loc.blocks)
        random_sets = [sorted(rng.choice(blocks, cfg.k, replace=False).tolist(), key=blocks.index)
                       for _ in range(cfg.n_random)]
        progress(f"[{n}/6] {category}: generate {len(eval_prompts)}x{len(cfg.seeds)} held-out images, "
                 f"withhold top-{cfg.k} {top} vs {cfg.n_random} random sets")
        gen = dict(seed=list(cfg.seeds), output_type="np", **common)
        before = _to_uint8(generate(pipe, eval_prompts, **gen))
        withheld = _to_uint8(generate(pipe, eval_prompts, withhold=top, clean_prompts=clean, **gen))
        randoms = [_to_uint8(generate(pipe, eval_prompts, withhold=r, clean_prompts=clean, **gen)) for r in random_sets]
        entry = {
            "concept": concept,
            "oracle_label": label,
            "k": cfg.k,
            "top_k_blocks": top,
            "random_k_blocks": random_sets,
            "presence_before": _presence(oracle, before, category, label),
            "presence_top_k": _presence(oracle, withheld, category, label),
            "presence_random_k": float(np.mean([_presence(oracle, r, category, label) for r in randoms])),
            "n_images": int(len(before)),
            "localization_prompts": loc_prompts,
            "eval_prompts": eval_prompts,
            "clean_prompts": clean,
        }
        summary[category] = entry
        rows = min(4, len(before))
        _grid([before[:rows], withheld[:rows], randoms[0][:rows]], ["original", f"top-{cfg.k} withheld", "random-K"]).save(
            out / category / "grid.png"
        )
    _heatmap(heat, list(loc.blocks), out / "heatmap.png")
    result = {
        "categories": summary,
        "blocks": list(loc.blocks),
        "settings": {**asdict(cfg), "model": "ditloc.toy", "seconds": round(time.time() - t0, 1)},
    }
    write_json(out / "summary.json", result)
    return result


def format_table(result: dict) -> str:
    lines = [f"{'category':<10} {'concept':<9} {'top-K blocks':<28} {'before':>7} {'top-K':>7} {'random-K':>9}"]
    for cat, e in result["categories"].items():
        lines.append(
            f"{cat:<10} {e['concept']:<9} {','.join(b.split('.')[1] for b in e['top_k_blocks']):<28} "
            f"{e['presence_before']:>7.2f} {e['presence_top_k']:>7.2f} {e['presence_random_k']:>9.2f}"
        )
    return "\n".join(lines)
