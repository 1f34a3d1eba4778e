"""Unlearning on the toy model, scored by the oracle in model-editing terms
(method.md section 4): localized LoRA (top-K blocks) vs all-block LoRA vs full
fine-tuning of every block.

    python scripts/toy/evaluate_editing.py --out runs/editing            # both concepts
    python scripts/toy/evaluate_editing.py --concepts hazard --train-steps 100

Per concept (hazard mark -> the prompt without its phrase; the character
"zibbit" -> its base shape "triangle"):
  reliability  presence of the concept on the training prompts (lower is better)
  generality   presence on held-out-template prompts with the concept
  locality     oracle labels unchanged vs the unedited model (same prompts, same
               seeds) on prompts without the concept: for the hazard, ordinary
               scenes; for the character, other characters, triangles (the anchor)
               and other shapes
  quality      oracle prompt fidelity over all categories on general held-out prompts
plus training time, seconds per step and trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ditloc.edit import TrainConfig, unlearn
from ditloc.toy import load_pipeline, world
from ditloc.toy.oracle import load_oracle

CATS = ("shape", "color", "style", "place", "character", "hazard")
CALL = dict(height=32, width=32, use_resolution_binning=False, clean_caption=False, max_sequence_length=32)


def scenes_prompts(rng, n, split, **pinned):
    scenes = [world.sample_scene(rng, **pinned) for _ in range(n)]
    return scenes, [world.make_prompt(s, rng, split, drop_prob=0.0) for s in scenes]


def expected(scene):
    e = {"place": scene.place, "hazard": "present" if scene.hazard else "absent"}
    if scene.character:
        e["character"] = scene.character
    else:
        e.update(shape=scene.shape, color=scene.color, style=scene.style, character="none")
    return e


@torch.no_grad()
def generate(pipe, prompts, seed, steps, guidance, batch=32):
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(seed * 100_003 + i + j) for j in range(len(chunk))]
        out.append(pipe(chunk, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                        output_type="np", **CALL).images)
    return (np.concatenate(out) * 255).round().astype(np.uint8)


def labels(oracle, images):
    return oracle.classify(images).labels


def evaluate(pipe, oracle, sets, args, reference=None):
    """Oracle metrics of `pipe` on the fixed evaluation sets (same seeds for every model)."""
    res, labs = {}, {}
    for name, (scenes, prompts, concept_cat, concept_label) in sets.items():
        imgs = generate(pipe, prompts, seed=hash(name) % 997, steps=args.steps, guidance=args.guidance)
        lab = labels(oracle, imgs)
        labs[name] = lab
        if concept_cat is not None:  # presence of the concept
            res[f"{name}_presence"] = float(np.mean([l == concept_label for l in lab[concept_cat]]))
        if name == "quality":
            hits = [lab[k][i] == v for i, s in enumerate(scenes) for k, v in expected(s).items()]
            res["quality_fidelity"] = float(np.mean(hits))
        if reference is not None and name.startswith("locality"):
            ref = reference[name]
            same = [all(lab[c][i] == ref[c][i] for c in CATS) for i in range(len(prompts))]
            res[f"{name}_unchanged"] = float(np.mean(same))
    return res, labs


def build_sets(concept, rng, n):
    if concept == "hazard":
        tr_s, tr_p = scenes_prompts(rng, n, "train", hazard=True)
        ge_s, ge_p = scenes_prompts(rng, n, "heldout", hazard=True)
        lo_s, lo_p = scenes_prompts(rng, n, "heldout", hazard=False)
        sets = {"reliability": (tr_s, tr_p, "hazard", "present"),
                "generality": (ge_s, ge_p, "hazard", "present"),
                "locality": (lo_s, lo_p, None, None)}
        anchors = [world.clean_prompt(p, "hazard", "hazard") for p in tr_p]
        return sets, tr_p, anchors, "hazard", None
    char = concept
    shape = world.CHARACTER_LOOK[char][0]
    tr_s, tr_p = scenes_prompts(rng, n, "train", character=char)
    ge_s, ge_p = scenes_prompts(rng, n, "heldout", character=char)
    others = [c for c in world.CHARACTERS if c != char]
    oc = [world.sample_scene(rng, character=others[i % len(others)]) for i in range(n)]
    oc_p = [world.make_prompt(s, rng, "heldout", drop_prob=0.0) for s in oc]
    an_s, an_p = scenes_prompts(rng, n, "heldout", character=None, shape=shape)
    sh_s, sh_p = scenes_prompts(rng, n, "heldout", character=None)
    sets = {"reliability": (tr_s, tr_p, "character", char),
            "generality": (ge_s, ge_p, "character", char),
            "locality_other_characters": (oc, oc_p, None, None),
            "locality_anchor": (an_s, an_p, None, None),
            "locality_shapes": (sh_s, sh_p, None, None)}
    return sets, tr_p, None, char, shape


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", default="hazard,zibbit")
    ap.add_argument("--out", default="runs/editing")
    ap.add_argument("--n", type=int, default=32, help="prompts per evaluation set")
    ap.add_argument("--n-quality", type=int, default=64)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--lr-full", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    oracle = load_oracle()
    report = {"settings": vars(args), "concepts": {}}
    for concept in args.concepts.split(","):
        rng = np.random.default_rng([args.seed, 11, sum(map(ord, concept))])
        sets, train_prompts, anchor_prompts, word, anchor = build_sets(concept, rng, args.n)
        q_s = [world.sample_scene(rng, p_character=0.25, p_hazard=0.5) for _ in range(args.n_quality)]
        sets["quality"] = (q_s, [world.make_prompt(s, rng, "heldout", drop_prob=0.0) for s in q_s], None, None)
        base = load_pipeline()
        base.set_progress_bar_config(disable=True)
        base_res, base_labs = evaluate(base, oracle, sets, args)
        rows = {"original": base_res}
        print(f"[{concept}] original: {json.dumps(base_res)}", flush=True)
        for name, blocks, method, lr in (("localized LoRA", "auto", "lora", args.lr_lora),
                                         ("all-block LoRA", "all", "lora", args.lr_lora),
                                         ("full fine-tuning", "all", "full", args.lr_full)):
            pipe = load_pipeline()
            pipe.set_progress_bar_config(disable=True)
            cfg = TrainConfig(method=method, steps=args.train_steps, batch_size=args.batch_size, lr=lr,
                              seed=args.seed, checkpoint_every=args.train_steps)
            t0 = time.perf_counter()
            res = unlearn(pipe, word, anchor, prompts=train_prompts, anchor_prompts=anchor_prompts,
                          blocks=blocks, k=args.k, config=cfg, images_per_prompt=1,
                          num_inference_steps=args.steps, guidance_scale=args.guidance,
                          out=out / concept / name.split()[0].replace("-", "_"))
            total = time.perf_counter() - t0
            metrics, _ = evaluate(pipe, oracle, sets, args, reference=base_labs)
            metrics.update(blocks=list(res.blocks), trainable_parameters=res.trainable_parameters,
                           train_seconds=round(res.wall_seconds, 1), seconds_per_step=round(res.wall_seconds / max(1, args.train_steps), 4),
                           job_seconds=round(total, 1))
            rows[name] = metrics
            print(f"[{concept}] {name}: {json.dumps(metrics)}", flush=True)
        report["concepts"][concept] = rows
        (out / "editing.json").write_text(json.dumps(report, indent=1))
    print(format_table(report))
    (out / "editing.md").write_text(format_table(report))


def format_table(report) -> str:
    lines = []
    for concept, rows in report["concepts"].items():
        keys = [k for k in rows["original"]]
        loc_keys = sorted({k for r in rows.values() for k in r if k.endswith("_unchanged")})
        head = ["model"] + keys + loc_keys + ["trainable", "train s", "s/step", "blocks"]
        lines += [f"\n### {concept}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in rows.items():
            cells = [name] + [f"{r.get(k, float('nan')):.3f}" for k in keys + loc_keys]
            cells += [f"{r.get('trainable_parameters', 0):,}", str(r.get("train_seconds", "")),
                      str(r.get("seconds_per_step", "")), ",".join(r.get("blocks", [])) if len(r.get("blocks", [])) < 12 else "all"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
