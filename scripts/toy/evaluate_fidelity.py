"""Prompt fidelity of a toy pipeline, measured by the oracle on images
generated from HELD-OUT prompt templates.

    python scripts/toy/evaluate_fidelity.py --n 512 --guidance 4.5 \
        --json toy_training/runs/fidelity.json
    DITLOC_TOY_FLUX_DIR=/tmp/toyflux python scripts/toy/evaluate_fidelity.py --model toy-flux --n 512

Each model is sampled with the arguments it was trained for (`ditloc.toy.ToyModel.call_defaults`,
as every ditloc run of it is); `--guidance` sets its CFG scale (`guidance_scale` for toy, the true
CFG's `true_cfg_scale` for toy-flux; default: the model's own).

For every generated image, each attribute the prompt specifies is compared with
the oracle's label:
  shape/color/style  ordinary-object prompts only
  place              all prompts
  character          character prompts (expected = the character name)
  hazard             all prompts (prompt has the phrase -> present, else absent)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import common
import numpy as np
import torch

from ditloc.toy import world
from ditloc.toy.oracle import load_oracle


def make_eval_set(n, seed):
    rng = np.random.default_rng([seed, 77])
    scenes = [world.sample_scene(rng, p_character=0.25, p_hazard=0.5) for _ in range(n)]
    prompts = [world.make_prompt(s, rng, "heldout", drop_prob=0.0) for s in scenes]
    return scenes, prompts


def expected(scene):
    e = {"place": scene.place, "hazard": "present" if scene.hazard else "absent"}
    if scene.character:
        e["character"] = scene.character
    else:
        e.update(shape=scene.shape, color=scene.color, style=scene.style, character="none")
    return e


def score(scenes, labels):
    hits, tot = {}, {}
    for i, s in enumerate(scenes):
        for k, v in expected(s).items():
            key = k
            if k == "character" and v == "none":
                key = "character_none"
            tot[key] = tot.get(key, 0) + 1
            hits[key] = hits.get(key, 0) + int(labels[k][i] == v)
    return {k: hits[k] / tot[k] for k in sorted(tot)}, tot


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("toy", "toy-flux"), default="toy",
                    help="the toy model (toy-flux: from $DITLOC_TOY_FLUX_DIR when set)")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, nargs="+", default=None,
                    help="CFG scales to measure (default: the model's own)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(common.RUNS / "fidelity.json"))
    ap.add_argument("--grid", default=None, help="PNG grid of the first 64 images")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ditloc.options import RunOptions
    from ditloc.toy import load_pipeline, model_dir, toy_model

    torch.set_num_threads(args.threads)
    spec = toy_model(args.model)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    # the model's own sampling arguments, as ditloc resolves them; 32 tokens hold every toy prompt
    run = RunOptions(num_inference_steps=args.steps, max_sequence_length=32).resolve(pipe)
    guidances = args.guidance or [run.effective(spec.guidance_argument)]
    oracle = load_oracle()
    scenes, prompts = make_eval_set(args.n, args.seed)

    ref = oracle.classify(world.render_batch(scenes))
    ref_acc, _ = score(scenes, ref.labels)
    results = {"n": args.n, "steps": args.steps, "seed": args.seed, "model": args.model,
               "model_dir": str(model_dir(args.model)), "guidance_argument": spec.guidance_argument,
               "call_kwargs": run.record()["pipeline_kwargs"], "oracle_on_true_renders": ref_acc, "runs": []}
    print("oracle on true renders:", {k: round(v, 3) for k, v in ref_acc.items()}, flush=True)
    for cfg in guidances:
        t0 = time.time()
        imgs = []
        kw = {**run.call_kwargs, spec.guidance_argument: cfg}
        for i in range(0, args.n, args.batch):
            out = pipe(
                prompts[i : i + args.batch],
                generator=torch.Generator().manual_seed(args.seed * 100003 + i),
                output_type="np",
                **kw,
            ).images
            imgs.append((out * 255).round().astype(np.uint8))
        imgs = np.concatenate(imgs)
        res = oracle.classify(imgs)
        acc, tot = score(scenes, res.labels)
        dt = time.time() - t0
        print(f"guidance {cfg}: " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()) + f" ({dt:.0f}s)",
              flush=True)
        results["runs"].append({"guidance": cfg, "fidelity": acc, "counts": tot, "wall_s": dt})
        if args.grid:
            g = Path(args.grid)
            common.save_grid(imgs[:64], g.with_name(f"{g.stem}_cfg{cfg}{g.suffix}"))
            (g.with_name(f"{g.stem}_cfg{cfg}.txt")).write_text("\n".join(prompts[:64]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print("wrote", args.json)


if __name__ == "__main__":
    main()
