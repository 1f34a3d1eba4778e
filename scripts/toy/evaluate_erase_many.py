"""Erasing N concepts at once on the toy model, scored by the oracle:
for N = 1, 3, 10 erased concepts and each method (localized / all-block closed form,
localized / all-block LoRA with the teacher target on preserved prompts):

  presence    of each erased concept on held-out-template prompts with it (n per concept)
  unchanged   per non-erased attribute (shape, color, style, place, character, hazard):
              the oracle's label equals the unedited model's (same prompt, same seed) on
              held-out prompts with none of the erased concepts; and all six at once
  quality     oracle prompt fidelity on those prompts, against the unedited model's
  wall time   the edit (the solve or the training) and, for localized methods, the
              set-level search of each concept (run once, shared by every method and N)

Every rate has its 95% Wilson interval, means a normal interval. Resumable: each finished
(N, method) row is saved in OUT/erase_many.json, and a rerun skips it.

    python scripts/toy/evaluate_erase_many.py --out benchmarks/results/erase_many_toy
    python scripts/toy/evaluate_erase_many.py --sizes 10 --methods "closed-form localized" \
        --preserve-mode nullspace --out runs/nullspace
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from editing_eval import CATS, average, generate, labels, rate  # same directory
from evaluate_fidelity import expected

from ditloc.edit import ClosedFormConfig, TrainConfig, unlearn
from ditloc.edit.blocks import choose_blocks
from ditloc.localization import Localization
from ditloc.options import RunOptions
from ditloc.toy import load_pipeline, world
from ditloc.toy.oracle import load_oracle

#: concept -> (category, anchor word; None: drop the phrase); the first N are erased
CONCEPTS = {
    "zibbit": ("character", "triangle"),
    "striped": ("style", "solid"),
    "hazard": ("hazard", None),
    "blip": ("character", "circle"),
    "red": ("color", "blue"),
    "star": ("shape", "circle"),
    "night": ("place", "forest"),
    "dotted": ("style", "solid"),
    "cross": ("shape", "square"),
    "snow": ("place", "desert"),
}
METHODS = ("closed-form localized", "closed-form all-block", "localized LoRA", "all-block LoRA")


def pin(concept: str) -> dict:
    cat = CONCEPTS[concept][0]
    if cat == "hazard":
        return {"hazard": True}
    if cat == "character":
        return {"character": concept}
    return {cat: concept, "character": None} if cat in ("shape", "color", "style") else {cat: concept}


def shows(scene, concept: str) -> bool:
    """Whether `scene`'s prompt names `concept`."""
    cat = CONCEPTS[concept][0]
    if cat == "hazard":
        return scene.hazard
    if cat == "character":
        return scene.character == concept
    if cat in ("shape", "color", "style") and scene.character is not None:
        return False  # a character's prompt names the character, not its look
    return getattr(scene, cat) == concept


def scenes(rng, n, split, erased, concept=None):
    """n scenes showing `concept` (None: an ordinary scene) and none of the other erased
    concepts, with their fully specified prompts."""
    pinned = pin(concept) if concept else ({"hazard": False} if "hazard" in erased else {})
    out = []
    while len(out) < n:
        s = world.sample_scene(rng, p_character=0.25, **pinned)
        if not any(shows(s, c) for c in erased if c != concept):
            out.append(s)
    return out, [world.make_prompt(s, rng, split, drop_prob=0.0) for s in out]


def anchor_of(prompt: str, concept: str) -> str:
    cat, anchor = CONCEPTS[concept]
    if anchor is None:
        return world.clean_prompt(prompt, cat, concept)
    if cat == "place":
        return prompt.replace(world.PLACE_PHRASE[concept], world.PLACE_PHRASE[anchor])
    from ditloc.text import substitute

    return substitute(prompt, concept, anchor, articles=True)


def build(erased, args):
    """Training prompts and anchors, and the evaluation sets of one N."""
    rng = np.random.default_rng([args.seed, 28, len(erased)])
    train, anchors = [], []
    for c in erased:
        _, p = scenes(rng, args.n_train, "train", erased, c)
        train += p
        anchors += [anchor_of(q, c) for q in p]
    sets = {}
    for c in erased:
        s, p = scenes(rng, args.n, "heldout", erased, c)
        sets[f"presence:{c}"] = (s, p)
    sets["locality"] = scenes(rng, args.n_locality, "heldout", erased)
    return train, anchors, sets


def evaluate(pipe, oracle, sets, args, reference=None):
    res, labs = {}, {}
    for name, (sc, prompts) in sets.items():
        imgs = generate(pipe, prompts, seed=zlib.crc32(name.encode()) % 997, steps=args.steps, guidance=args.guidance)
        lab = labels(oracle, imgs)
        labs[name] = lab
        if name.startswith("presence:"):
            c = name.split(":", 1)[1]
            cat = CONCEPTS[c][0]
            want = "present" if cat == "hazard" else c
            res[name] = rate(v == want for v in lab[cat])
        else:
            res["quality"] = average([np.mean([lab[k][i] == v for k, v in expected(s).items()])
                                      for i, s in enumerate(sc)])
            if reference is not None:
                ref = reference[name]
                n = len(prompts)
                flags = {c: [lab[c][i] == ref[c][i] for i in range(n)] for c in CATS}
                res["unchanged"] = rate([f for c in CATS for f in flags[c]])
                res["unchanged_all"] = rate([all(flags[c][i] for c in CATS) for i in range(n)])
                res["unchanged_by_category"] = {c: rate(flags[c]) for c in CATS}
                q_ref = [np.mean([ref[k][i] == v for k, v in expected(s).items()]) for i, s in enumerate(sc)]
                q_new = [np.mean([lab[k][i] == v for k, v in expected(s).items()]) for i, s in enumerate(sc)]
                res["quality_change"] = average(np.array(q_new) - np.array(q_ref))
    return res, labs


def localizations(pipe, erased, train, args, folder: Path) -> tuple[dict, dict]:
    """Each concept's set-level search (10 steps, the first 6 of its training prompts x
    seeds 0, 1; as `--blocks auto` runs it), saved in `folder` and reused."""
    locs, seconds = {}, {}
    folder.mkdir(parents=True, exist_ok=True)
    for c in erased:
        path = folder / f"{c}.json"
        if path.exists():
            locs[c] = Localization.load(path)
            seconds[c] = json.loads((folder / f"{c}.seconds").read_text())
            continue
        prompts = [p for p in train if world.concept_span(p, c)][:6]
        t0 = time.perf_counter()
        options = RunOptions.of(None, num_inference_steps=args.steps, guidance_scale=args.guidance, height=32, width=32)
        _, loc = choose_blocks(pipe, "auto", None, prompts, c, checkpoint=folder / f"{c}.jsonl", options=options)
        seconds[c] = time.perf_counter() - t0
        loc.save(path)
        (folder / f"{c}.seconds").write_text(json.dumps(seconds[c]))
        locs[c] = loc
        print(f"  localized {c}: K={loc.k_auto()} {loc.top(loc.k_auto())} in {seconds[c]:.0f}s", flush=True)
    return locs, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/erase_many")
    ap.add_argument("--sizes", default="1,3,10", help="numbers of erased concepts (the first N of the list)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--concepts", default=",".join(CONCEPTS), help="the erasure order (N erases the first N)")
    ap.add_argument("--localizations", default=None, help="folder of saved searches (default OUT/localizations)")
    ap.add_argument("--n", type=int, default=64, help="held-out images per erased concept")
    ap.add_argument("--n-locality", type=int, default=128, help="held-out images without the erased concepts")
    ap.add_argument("--n-train", type=int, default=24, help="training prompts per concept")
    ap.add_argument("--preserve-mode", default="weighted", choices=("weighted", "nullspace"))
    ap.add_argument("--lora-preserve", default="teacher", choices=("teacher", "none"))
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "erase_many.json"
    order = [c.strip() for c in args.concepts.split(",") if c.strip()]
    unknown = [c for c in order if c not in CONCEPTS]
    if unknown:
        ap.error(f"unknown concept {unknown[0]!r}; choose from {', '.join(CONCEPTS)}")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "sizes", "methods", "threads", "localizations")}
    report = json.loads(path.read_text()) if path.exists() else {}
    if report.get("settings") != settings:
        report = {"settings": settings, "sizes": {}}

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(path)

    oracle = load_oracle()
    for n_erased in [int(s) for s in args.sizes.split(",")]:
        erased = order[:n_erased]
        train, anchors, sets = build(erased, args)
        rows = report["sizes"].setdefault(str(n_erased), {"concepts": {c: CONCEPTS[c][1] for c in erased}})
        base = load_pipeline()
        base.set_progress_bar_config(disable=True)
        base_res, base_labs = evaluate(base, oracle, sets, args)
        rows["original"] = base_res
        print(f"[N={n_erased}] original: {short(base_res)}", flush=True)
        need_loc = any("localized" in m.split() for m in methods if m not in rows)
        locs, loc_seconds = localizations(base, erased, train, args, Path(args.localizations or out / "localizations")) if need_loc else ({}, {})
        pairs = [(c, None) for c in erased]
        for name in [m for m in methods if m not in rows]:
            pipe = load_pipeline()
            pipe.set_progress_bar_config(disable=True)
            localized = "localized" in name.split()
            blocks = {c: locs[c] for c in erased} if localized else "all"
            if name.startswith("closed-form"):
                cfg = ClosedFormConfig(seed=args.seed, preserve_mode=args.preserve_mode)
                extra = {}
            else:
                cfg = TrainConfig(method="lora", steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
                                  seed=args.seed, checkpoint_every=args.train_steps)
                extra = dict(images_per_prompt=1)
                if args.lora_preserve == "teacher":
                    extra.update(preserve_target="teacher")
            t0 = time.perf_counter()
            res = unlearn(pipe, concepts=pairs, prompts=train, anchor_prompts=anchors, blocks=blocks, config=cfg,
                          num_inference_steps=args.steps, guidance_scale=args.guidance,
                          out=out / f"N{n_erased}" / name.replace(" ", "_"), **extra)
            job = time.perf_counter() - t0
            metrics, _ = evaluate(pipe, oracle, sets, args, reference=base_labs)
            metrics.update(
                blocks={c["concept"]: c["blocks"] for c in res.details["concepts"]},
                changed_parameters=res.trainable_parameters, edit_seconds=round(res.wall_seconds, 2),
                solve_seconds=round(res.details.get("solve_seconds", 0.0), 3) or None, job_seconds=round(job, 1),
                search_seconds=round(sum(loc_seconds[c] for c in erased), 1) if localized else None)
            rows[name] = metrics
            save()
            print(f"[N={n_erased}] {name}: {short(metrics)}", flush=True)
        save()
    (out / "erase_many.md").write_text(format_table(report))
    print(format_table(report))


def short(m) -> str:
    keep = {}
    for k, v in m.items():
        if isinstance(v, dict) and "value" in v:
            keep[k] = round(v["value"], 3)
        elif k in ("edit_seconds", "search_seconds"):
            keep[k] = v
    return json.dumps(keep)


def cell(m) -> str:
    return f"{m['value']:.3f} [{m['lo']:.2f}, {m['hi']:.2f}]" if isinstance(m, dict) and "value" in m else "-"


def format_table(report) -> str:
    lines = []
    for n_erased, rows in report["sizes"].items():
        erased = list(rows["concepts"])
        methods = [m for m in rows if m not in ("concepts", "original")]
        orig = rows["original"]
        n_p = orig[f"presence:{erased[0]}"]["n"]
        n_l = None
        for m in methods:
            if "unchanged" in rows[m]:
                n_l = rows[m]["unchanged_all"]["n"]
        lines += [f"\n### N = {n_erased}: {', '.join(erased)}\n",
                  f"Presence of each erased concept (n = {n_p} images each), 95% Wilson intervals:\n",
                  "| model | " + " | ".join(erased) + " |", "|" + "---|" * (len(erased) + 1)]
        for m in ["original"] + methods:
            lines.append(f"| {m} | " + " | ".join(cell(rows[m].get(f"presence:{c}")) for c in erased) + " |")
        lines += ["", f"Non-erased attributes on held-out prompts without the erased concepts (n = {n_l} images; "
                  "unchanged = oracle label equal to the unedited model's, per attribute pooled over the six "
                  f"categories (n = {6 * (n_l or 0)}) and all six at once), quality = prompt fidelity:\n",
                  "| model | unchanged (per attribute) | unchanged (all six) | quality | quality change | "
                  "edit s | search s | changed params |", "|---|---|---|---|---|---|---|---|"]
        lines.append(f"| original | - | - | {cell(orig['quality'])} | - | | | 0 |")
        for m in methods:
            r = rows[m]
            lines.append(f"| {m} | {cell(r.get('unchanged'))} | {cell(r.get('unchanged_all'))} | "
                         f"{cell(r.get('quality'))} | {cell(r.get('quality_change'))} | {r.get('edit_seconds')} | "
                         f"{r.get('search_seconds') or '-'} | {r.get('changed_parameters', 0):,} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
