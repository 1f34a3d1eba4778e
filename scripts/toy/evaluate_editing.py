"""Editing the toy model, scored by the oracle in model-editing terms
every rate with its 95% interval: closed-form localized
unlearning in the top-K blocks and in all blocks, localized
LoRA (top-K blocks), all-block LoRA and full fine-tuning of every block.

    python scripts/toy/evaluate_editing.py --out runs/editing --n 64 --n-quality 128
    python scripts/toy/evaluate_editing.py --concepts hazard --methods "closed-form localized,localized LoRA"
    DITLOC_TOY_FLUX_DIR=/tmp/toyflux python scripts/toy/evaluate_editing.py --model toy-flux --out runs/editing_flux

Each toy model (`--model`: toy, PixArt; toy-flux, FLUX with joint attention) is sampled with the
arguments it was trained for (`sampling`: `ditloc.toy.TOY_MODELS[model].call_defaults`), by this
script and by every edit; `--guidance` sets its CFG scale (`guidance_scale` on toy, the true CFG's
`true_cfg_scale` on toy-flux; default: the model's own, 4.5 and 4.0). On toy-flux the closed form
can only rewrite double-stream blocks (single-stream blocks read text and image tokens through the
same projections): "closed-form all-block" edits every double-stream block, and its row says so.
"... + pooled" (toy-flux) also solves the pooled text vector's projection (`--pooled-edit`), in the
same blocks as the row without it.

Per concept (hazard mark -> the prompt without its phrase; the character
"zibbit" -> its base shape "triangle"; the style "striped" -> "solid"):
  reliability  presence of the concept on the training prompts (lower is better)
  generality   presence on held-out-template prompts with the concept
  locality     oracle labels unchanged vs the unedited model (same prompts, same
               seeds) on prompts without the concept: for the hazard, ordinary
               scenes; for the character, other characters, triangles (the anchor)
               and other shapes
  quality      oracle prompt fidelity over all categories on general held-out prompts
               without the erased concept
plus edit time, peak extra memory (process RSS above its level before the edit,
sampled every 5 ms), seconds per step and changed parameters. Intervals: Wilson for
rates, normal approximation over images for quality.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

# same directory: what the editing scripts share; the expected oracle label per attribute
from editing_eval import (
    CATS,
    PeakRSS,
    average,
    block_set,
    evaluate,
    generate,
    labels,
    own_guidance,
    rate,
    sampling,
)
from evaluate_fidelity import expected

from ditloc.edit import ClosedFormConfig, TrainConfig, personalize, unlearn
from ditloc.text import find_occurrences, substitute, tidy
from ditloc.toy import MODEL_DIR, TOY_MODELS, load_pipeline, model_dir, toy_model, world
from ditloc.toy.oracle import load_oracle

def scenes_prompts(rng, n, split, **pinned):
    scenes = [world.sample_scene(rng, **pinned) for _ in range(n)]
    return scenes, [world.make_prompt(s, rng, split, drop_prob=0.0) for s in scenes]


METHODS = {  # name -> (blocks, method)
    "closed-form localized": ("auto", "closed-form"),
    "closed-form all-block": ("all", "closed-form"),
    # FLUX/SD3: the same, with the pooled vector's projection solved too (ClosedFormConfig.pooled)
    "closed-form localized + pooled": ("auto", "closed-form"),
    "closed-form all-block + pooled": ("all", "closed-form"),
    "localized LoRA": ("auto", "lora"),
    "all-block LoRA": ("all", "lora"),
    "full fine-tuning": ("all", "full"),
}
TRAINED = ("localized LoRA", "all-block LoRA", "full fine-tuning")
GLYPH = "glyph (personalization)"


def edit_dir(out: Path, concept: str, name: str) -> Path:
    """Where the edit `name` of `concept` is saved (and its cached latents / checkpoints kept)."""
    if concept == GLYPH:
        return out / "glyph" / name.split()[0].replace("-", "_")
    return out / concept / name.replace(" ", "_")


def variants(args, names):
    """(name, blocks, fresh toy pipeline, config) of the compared edits."""
    for name in names:
        blocks, method = METHODS[name]
        pipe = load_pipeline(args.model)
        pipe.set_progress_bar_config(disable=True)
        if method == "closed-form":
            cfg = ClosedFormConfig(seed=args.seed, preserve_weight=args.preserve_weight, ridge=args.ridge,
                                   positions=args.positions, pooled=name.endswith("+ pooled"))
        else:
            lr = args.lr_full if method == "full" else args.lr_lora
            cfg = TrainConfig(method=method, steps=args.train_steps, batch_size=args.batch_size, lr=lr,
                              seed=args.seed, checkpoint_every=args.train_steps, rank=args.rank,
                              lora_modules=(args.lora_modules or None) if method == "lora" else None)
        yield name, blocks, pipe, cfg


def quality_scenes(rng, n, concept):
    """General held-out scenes over all six categories, without the erased concept (an
    image that no longer shows it is the edit working, not a loss of quality)."""
    out = []
    while len(out) < n:
        s = world.sample_scene(rng, p_character=0.25, p_hazard=0.5)
        if concept == "hazard" and s.hazard or concept in (s.character, s.style):
            continue
        out.append(s)
    return out


def build_sets(concept, rng, n):
    """-> (evaluation sets, training prompts, anchor prompts or None, concept word, anchor word,
    preservation prompts for the closed-form edit: training-template prompts without the concept)."""
    if concept == "hazard":
        tr_s, tr_p = scenes_prompts(rng, n, "train", hazard=True)
        ge_s, ge_p = scenes_prompts(rng, n, "heldout", hazard=True)
        lo_s, lo_p = scenes_prompts(rng, n, "heldout", hazard=False)
        sets = {"reliability": (tr_s, tr_p, "hazard", "present"),
                "generality": (ge_s, ge_p, "hazard", "present"),
                "locality": (lo_s, lo_p, None, None)}
        anchors = [world.clean_prompt(p, "hazard", "hazard") for p in tr_p]
        _, keep = scenes_prompts(rng, n, "train", hazard=False)
        return sets, tr_p, anchors, "hazard", None, keep
    if concept in world.STYLES:
        anchor = "solid"
        tr_s, tr_p = scenes_prompts(rng, n, "train", style=concept, character=None)
        ge_s, ge_p = scenes_prompts(rng, n, "heldout", style=concept, character=None)
        others = [s for s in world.STYLES if s not in (concept, anchor)]
        os_ = [world.sample_scene(rng, style=others[i % len(others)], character=None) for i in range(n)]
        os_p = [world.make_prompt(s, rng, "heldout", drop_prob=0.0) for s in os_]
        an_s, an_p = scenes_prompts(rng, n, "heldout", style=anchor, character=None)
        sets = {"reliability": (tr_s, tr_p, "style", concept),
                "generality": (ge_s, ge_p, "style", concept),
                "locality_other_styles": (os_, os_p, None, None),
                "locality_anchor": (an_s, an_p, None, None)}
        keep = [world.make_prompt(world.sample_scene(rng, style=([anchor] + others)[i % (len(others) + 1)],
                                                     character=None), rng, "train", drop_prob=0.0) for i in range(n)]
        return sets, tr_p, None, concept, anchor, keep
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
    keep = [world.make_prompt(world.sample_scene(rng, character=(others + [None])[i % (len(others) + 1)]), rng,
                              "train", drop_prob=0.0) for i in range(n)]
    return sets, tr_p, None, char, shape, keep


# ---------------------------------------------------------------------------------------
# personalization: the unseen glyph bound to a reserved token
# ---------------------------------------------------------------------------------------
def glyph_detector(oracle, n=1500, seed=0):
    """Logistic regression on the oracle's 256-d features: glyph vs anything else
    (the oracle has no glyph class). Returns (score(images) -> P(glyph), held-out accuracy)."""
    rng = np.random.default_rng([seed, 99])
    pos = [world.render(world.glyph_scene(rng)) for _ in range(n)]
    neg = [world.render(world.sample_scene(rng)) for _ in range(n)]
    from ditloc.toy.oracle import to_tensor

    net = oracle.net

    @torch.no_grad()
    def feats(images):
        x = to_tensor(np.asarray(images))
        return net.trunk(net.features(x))  # [N, 256]

    x = torch.cat([feats(pos), feats(neg)]).double()
    y = torch.cat([torch.ones(n), torch.zeros(n)]).double()
    idx = torch.randperm(2 * n, generator=torch.Generator().manual_seed(seed))
    tr, te = idx[: int(1.6 * n)], idx[int(1.6 * n):]
    # L2-regularized logistic regression solved to convergence in float64 (a unique optimum, zero
    # start, no global RNG): the same weights in every run, whatever the kernels' summation order
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(z.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z[tr] @ w[:-1] + w[-1], y[tr]) \
            + 1e-3 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = w.detach()
    acc = float((((z[te] @ w[:-1] + w[-1]) > 0).double() == y[te]).double().mean())

    def score(images):
        z = (feats(images).double() - mean) / std
        return torch.sigmoid(z @ w[:-1] + w[-1]).numpy()

    return score, acc


def composed_prompts(rng, n, split, token, class_word):
    """Ordinary prompts with the object word replaced by "<token> <class_word>"
    (other colors, places, styles, hazard), and their scenes."""
    scenes, prompts = [], []
    while len(prompts) < n:
        sc = world.sample_scene(rng, character=None, shape="circle")
        p = world.make_prompt(sc, rng, split, drop_prob=0.0)
        if find_occurrences(p, "circle"):
            scenes.append(sc)
            prompts.append(substitute(p, "circle", f"{token} {class_word}"))
    return scenes, prompts


def run_personalization(args, oracle, out, methods):
    _, edit_run = sampling(args.model, args.guidance)
    token, class_word = world.RESERVED_WORDS[0], world.GENERIC_SHAPE
    detect, det_acc = glyph_detector(oracle)
    print(f"[glyph] detector held-out accuracy {det_acc:.3f}", flush=True)
    rng = np.random.default_rng([args.seed, 21])
    train_prompt = f"a {token} {class_word}"
    if args.p_captions:  # the glyph in varied colors, styles and places, each image with its caption
        inst = [world.glyph_scene(rng, hazard=False) for _ in range(args.p_images)]
        captions = [substitute(world.scene_prompt(s, world.TRAIN_TEMPLATES[int(rng.integers(len(world.TRAIN_TEMPLATES)))],
                                                  show_shape=False), class_word, f"{token} {class_word}")
                    for s in inst]
        captions[0] = train_prompt  # the plain prompt the reliability set asks for is one of them
        inst[0] = world.glyph_scene(rng, color="red", style="solid", hazard=False)
    else:  # without --p-captions: red solid renders, one prompt
        inst = [world.glyph_scene(rng, color="red", style="solid", hazard=False) for _ in range(args.p_images)]
        captions = None
    images = torch.from_numpy(np.stack([world.render(s) for s in inst])).permute(0, 3, 1, 2).float() / 127.5 - 1
    class_prompts = None
    if args.p_prior_general:  # the class prompts plus ordinary training-template scenes of every kind
        base_class = ([tidy(substitute(c, token, "")) for c in captions] if captions else [f"a {class_word}"])
        general = [world.make_prompt(world.sample_scene(rng), rng, "train", drop_prob=0.0)
                   for _ in range(args.p_prior_general)]
        class_prompts = list(dict.fromkeys(base_class + general))
    # reliability: the training prompts (each caption in turn, or the one prompt)
    reliability_prompts = [(captions or [train_prompt])[i % len(captions or [train_prompt])] for i in range(args.n)]
    ge_s, ge_p = composed_prompts(rng, args.n, "heldout", token, class_word)
    _, lo_p = scenes_prompts(rng, args.n, "heldout", character=None)
    q_s = [world.sample_scene(rng, p_character=0.25, p_hazard=0.5) for _ in range(args.n_quality)]
    q_p = [world.make_prompt(s, rng, "heldout", drop_prob=0.0) for s in q_s]

    def measure(pipe, reference=None):
        r = {}
        imgs = generate(pipe, reliability_prompts, seed=1, steps=args.steps, guidance=args.guidance, model=args.model)
        r["reliability_glyph"] = rate(detect(imgs) > 0.5)
        imgs = generate(pipe, ge_p, seed=2, steps=args.steps, guidance=args.guidance, model=args.model)
        lab = labels(oracle, imgs)
        r["generality_glyph"] = rate(detect(imgs) > 0.5)
        r["generality_color"] = rate(lab["color"][i] == s.color for i, s in enumerate(ge_s))
        r["generality_place"] = rate(lab["place"][i] == s.place for i, s in enumerate(ge_s))
        imgs = generate(pipe, lo_p, seed=3, steps=args.steps, guidance=args.guidance, model=args.model)
        lab = labels(oracle, imgs)
        r["locality_glyph"] = rate(detect(imgs) > 0.5)  # should stay ~0
        if reference is not None:
            r["locality_unchanged"] = rate(all(lab[c][i] == reference[c][i] for c in CATS)
                                           for i in range(len(lo_p)))
            r["locality_changed_by_category"] = {c: int(sum(lab[c][i] != reference[c][i] for i in range(len(lo_p))))
                                                 for c in CATS}
        imgs = generate(pipe, q_p, seed=4, steps=args.steps, guidance=args.guidance, model=args.model)
        ql = labels(oracle, imgs)
        r["quality_fidelity"] = average([np.mean([ql[k][i] == v for k, v in expected(s).items()])
                                         for i, s in enumerate(q_s)])
        return r, lab

    base = load_pipeline(args.model)
    base.set_progress_bar_config(disable=True)
    base_res, base_lab = measure(base)
    rows = {"original": base_res}
    print(f"[glyph] original: {json.dumps(base_res)}", flush=True)
    for name, blocks, pipe, cfg in variants(args, [m for m in methods if m in TRAINED]):
        with PeakRSS() as mem:
            res = personalize(pipe, images, token, class_word, blocks=blocks, k=args.k, config=cfg, captions=captions,
                              prior_preservation=args.p_class_images > 0, num_class_images=max(1, args.p_class_images),
                              prior_weight=args.prior_weight, localize_method=args.p_localize_method,
                              class_prompts=class_prompts, prior_target=args.prior_target,
                              num_inference_steps=args.steps, **{**edit_run, "max_sequence_length": 32},
                              out=edit_dir(out, GLYPH, name))
        metrics, _ = measure(pipe, reference=base_lab)
        if blocks == "all":
            metrics["block_set"] = block_set(pipe, res.blocks)
        metrics.update(blocks=list(res.blocks), changed_parameters=res.trainable_parameters,
                       edit_seconds=round(res.wall_seconds, 1), peak_extra_rss_mib=round(mem.extra / 2**20, 1),
                       seconds_per_step=round(res.wall_seconds / max(1, args.train_steps), 4))
        rows[name] = metrics
        print(f"[glyph] {name}: {json.dumps(metrics)}", flush=True)
    return rows, det_acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(TOY_MODELS), default="toy",
                    help="the toy model (toy: PixArt; toy-flux: FLUX, from $DITLOC_TOY_FLUX_DIR when set)")
    ap.add_argument("--concepts", default="hazard,zibbit,striped", help="unlearning concepts ('' for none)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--personalize", action="store_true", help="also teach the unseen glyph (token sks)")
    ap.add_argument("--out", default="runs/editing")
    ap.add_argument("--n", type=int, default=64, help="prompts per evaluation set")
    ap.add_argument("--n-quality", type=int, default=128)
    ap.add_argument("--k", type=int, default=3, help="K of localized LoRA when no closed-form localized row exists")
    ap.add_argument("--closed-form-k", default="gap",
                    help="K of closed-form localized: gap (the edit's measured K, unlearn k='gap'), auto (the "
                         "erasure rule, unlearn k='auto') or a number")
    ap.add_argument("--localize-method", default="attribution", choices=("contribution", "patch", "attribution"),
                    help="how the localized methods rank blocks")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--lr-full", type=float, default=1e-4)
    ap.add_argument("--preserve-weight", type=float, default=1.0, help="closed-form lambda")
    ap.add_argument("--ridge", type=float, default=1e-3, help="closed-form mu (relative)")
    ap.add_argument("--positions", default="all", choices=("all", "changed"), help="closed-form rows")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank")
    ap.add_argument("--lora-modules", default="",
                    help="LoRA targets relative to a block (default: the model's: all attention projections + MLP; "
                         "on toy-flux double.N and single.N blocks have their own, and each block takes those it has)")
    ap.add_argument("--p-images", type=int, default=6, help="personalization: glyph training images")
    ap.add_argument("--p-captions", action="store_true",
                    help="personalization: varied glyph renders, each with its caption (default: red solid, one prompt)")
    ap.add_argument("--p-class-images", type=int, default=8, help="prior-preservation images (0: none)")
    ap.add_argument("--prior-weight", type=float, default=1.0)
    ap.add_argument("--prior-target", default="noise", choices=("noise", "teacher"),
                    help="personalization: fit the class images to the noise (DreamBooth) or to the frozen model's prediction")
    ap.add_argument("--p-prior-general", type=int, default=0,
                    help="personalization: also preserve this many ordinary training-template prompts of any kind")
    ap.add_argument("--p-localize-method", default="contribution", choices=("contribution", "patch", "attribution"),
                    help="how localized LoRA ranks blocks for the class word in personalization")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None,
                    help="CFG scale: guidance_scale on toy, true_cfg_scale on toy-flux (default: the model's own, "
                         "4.5 / 4.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    first = load_pipeline(args.model)  # the model must be there before any work
    if args.guidance is None:
        args.guidance = own_guidance(args.model, first)
    call, edit_run = sampling(args.model, args.guidance)
    model = {"name": args.model, "dir": str(model_dir(args.model)), "pipeline": type(first).__name__,
             "guidance_argument": toy_model(args.model).guidance_argument,
             "call_kwargs": call, "edit_kwargs": edit_run}
    del first
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    oracle = load_oracle()
    path = out / "editing.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("concepts", "methods", "personalize", "out", "threads")}
    settings["model_dir"] = model["dir"]
    report = json.loads(path.read_text()) if path.exists() else {}
    old = report.get("settings")
    if old is not None and "model" not in old:  # written before --model: the toy model shipped with ditloc
        old = {**old, "model": "toy", "model_dir": str(MODEL_DIR)}
    if old != settings:  # a run with other settings (or another model) starts over
        stale = [d for c in report.get("concepts", {}) for m in METHODS if (d := edit_dir(out, c, m)).is_dir()]
        for d in stale:  # their cached latents and checkpoints belong to the old settings
            shutil.rmtree(d)
        if stale:
            print(f"[out] other settings than {path}'s: removed its {len(stale)} edit folder(s)", flush=True)
        report = {"settings": settings, "concepts": {}}
    report["settings"], report["model"] = settings, model

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(path)

    if args.personalize and GLYPH not in report["concepts"]:
        rows, det_acc = run_personalization(args, oracle, out, methods)
        report["concepts"][GLYPH] = rows
        report["glyph_detector_accuracy"] = det_acc
        save()
    for concept in [c for c in args.concepts.split(",") if c]:
        rng = np.random.default_rng([args.seed, 11, sum(map(ord, concept))])
        sets, train_prompts, anchor_prompts, word, anchor, keep = build_sets(concept, rng, args.n)
        q_s = quality_scenes(rng, args.n_quality, concept)
        sets["quality"] = (q_s, [world.make_prompt(s, rng, "heldout", drop_prob=0.0) for s in q_s], None, None)
        rows = report["concepts"].setdefault(concept, {})
        base = load_pipeline(args.model)
        base.set_progress_bar_config(disable=True)
        base_res, base_labs = evaluate(base, oracle, sets, args)  # the reference labels (deterministic)
        rows["original"] = base_res
        print(f"[{concept}] original: {_short(base_res)}", flush=True)
        for name, blocks, pipe, cfg in variants(args, [m for m in methods if m not in rows]):
            t0 = time.perf_counter()
            k = args.k
            if name.startswith("closed-form localized"):
                k = args.closed_form_k if args.closed_form_k in ("gap", "auto") else int(args.closed_form_k)
            if name in ("localized LoRA", "closed-form localized + pooled") and "closed-form localized" in rows:
                blocks = ",".join(rows["closed-form localized"]["blocks"])  # the same blocks: only the method differs
                k = len(rows["closed-form localized"]["blocks"]) if name.endswith("+ pooled") else k
            extra = {"preserve": keep} if isinstance(cfg, ClosedFormConfig) else {"images_per_prompt": 1}
            with PeakRSS() as mem:
                res = unlearn(pipe, word, anchor, prompts=train_prompts, anchor_prompts=anchor_prompts,
                              blocks=blocks, k=k, config=cfg, num_inference_steps=args.steps,
                              out=edit_dir(out, concept, name), localize_method=args.localize_method,
                              **edit_run, **extra)
            total = time.perf_counter() - t0
            metrics, _ = evaluate(pipe, oracle, sets, args, reference=base_labs)
            if blocks == "all":
                metrics["block_set"] = block_set(pipe, res.blocks)
            metrics.update(blocks=list(res.blocks), changed_parameters=res.trainable_parameters,
                           edit_seconds=round(res.wall_seconds, 2), job_seconds=round(total, 1),
                           peak_extra_rss_mib=round(mem.extra / 2**20, 1),
                           seconds_per_step=round(res.wall_seconds / max(1, res.steps), 4) if res.steps else None)
            if isinstance(cfg, ClosedFormConfig):
                metrics["fit"] = res.details["fit"]
            rows[name] = metrics
            save()
            print(f"[{concept}] {name}: {_short(metrics)}", flush=True)
    (out / "editing.md").write_text(format_table(report))
    print(format_table(report))


def _short(metrics) -> str:
    return json.dumps({k: (round(v["value"], 3) if isinstance(v, dict) and "value" in v else v)
                       for k, v in metrics.items() if k != "fit"})


def _cell(m) -> str:
    if not isinstance(m, dict):
        return "-"
    return f"{m['value']:.3f} [{m['lo']:.2f}, {m['hi']:.2f}]"


def format_table(report) -> str:
    """One markdown table per concept; every rate with its 95% interval and n."""
    lines = []
    model = report.get("model")
    if model:
        lines.append(f"Model: {model['name']} ({model['pipeline']}, {model['dir']}); images drawn with "
                     + ", ".join(f"{k}={v!r}" for k, v in model["call_kwargs"].items()))
    for concept, rows in report["concepts"].items():
        keys = [k for k in rows["original"]]
        loc_keys = sorted({k for r in rows.values() for k in r if k.endswith("_unchanged")})
        ns = {k: rows["original"][k]["n"] for k in keys}
        ns.update({k: next(r[k]["n"] for r in rows.values() if k in r) for k in loc_keys})
        head = ["model"] + [f"{k} (n={ns[k]})" for k in keys + loc_keys] + [
            "changed params", "edit s", "peak extra RSS MiB", "blocks"]
        lines += [f"\n### {concept}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in rows.items():
            label = name
            if r.get("block_set") and not re.fullmatch(r"all \d+ blocks", r["block_set"]):
                label = f"{name} ({r['block_set']})"  # "all" meant the editable blocks only
            cells = [label] + [_cell(r.get(k)) for k in keys + loc_keys]
            blocks = r.get("blocks", [])
            cells += [f"{r.get('changed_parameters', 0):,}", str(r.get("edit_seconds", "")),
                      str(r.get("peak_extra_rss_mib", "")), ",".join(blocks) if len(blocks) < 12 else "all"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
