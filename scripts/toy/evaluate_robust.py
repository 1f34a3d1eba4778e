"""Erasures under attack on a toy model: for each concept and erasure method, the edit, then

  attacks     `ditloc.attack` with each attack (prompts, tokens, inversion, conditioning): presence
              of the concept under the plain prompt and under the attack, on held-out prompts and
              seeds (n images per cell), on the edited and the unedited model
  locality    per non-erased attribute (shape, color, style, place, character, hazard): the oracle's
              label equals the unedited model's (same prompt, same seed), on held-out prompts
              without the concept (n_locality images x 6 attributes)
  quality     oracle prompt fidelity on those prompts, and its change from the unedited model's
  time        the edit (`unlearn`, localization and drawing included) and its training or solve

Methods: ``robust auto`` (`unlearn --robust --blocks auto`), ``robust pair`` (the same training in
the top two blocks of that localization), ``robust all`` (every block), ``closed-form auto`` (`unlearn --edit-method
closed-form --blocks auto`). The unedited model's attack cells do not depend on the edit: the
first method computes them and the others copy them (same concept, attack, settings and seeds).
Resumable: every finished part is kept under OUT and a rerun skips it.

    cd scripts/toy
    python evaluate_robust.py --out ../../benchmarks/results/robust_toy --concepts zibbit,hazard
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import evaluate_erase_many  # same directory
from editing_eval import generate, own_guidance, rate
from evaluate_erase_many import build, evaluate

from ditloc.attacks import attack
from ditloc.edit import ClosedFormConfig, RobustConfig, load_edit, unlearn
from ditloc.localization import Localization
from ditloc.toy import load_pipeline
from ditloc.toy.oracle import load_oracle

#: concept -> anchor (None: the prompt without the concept's phrase, with the erase-many set's prompts)
ANCHORS = {"zibbit": "triangle", "blip": "circle", "striped": "solid", "hazard": None}
METHODS = ("robust auto", "robust pair", "robust all", "closed-form auto")
KINDS = ("prompts", "tokens", "inversion", "conditioning")


def edit(concept: str, method: str, folder: Path, args) -> dict:
    """Run the erasure (or read the finished one) -> its record."""
    record_path = folder / "edit_record.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    anchor = ANCHORS[concept]
    prompt_kw = {}
    if anchor is None:  # the hazard mark: its phrase dropped, on the erase-many set's training prompts
        train, anchors, _ = build([concept], args)
        prompt_kw = dict(prompts=train, anchor_prompts=anchors)
    if method.startswith("robust"):
        config = RobustConfig(seed=args.seed, steps=args.train_steps)
    else:
        config = ClosedFormConfig(seed=args.seed)
    blocks = "all" if method == "robust all" else "auto"
    if method == "robust pair":
        loc = Localization.load(folder.parent / "robust_auto" / "edit" / "localization.json")
        blocks = loc.search.sets[1] if loc.search is not None else loc.top(2)
    t0 = time.perf_counter()
    res = unlearn(pipe, concept, anchor, blocks=blocks, config=config, out=folder / "edit", progress=print,
                  **prompt_kw)
    record = {"blocks": list(res.blocks), "job_seconds": round(time.perf_counter() - t0, 1),
              "train_or_solve_seconds": round(res.wall_seconds, 1), "changed_parameters": res.trainable_parameters,
              "config": res.config}
    record_path.write_text(json.dumps(record, indent=1))
    return record


def locality(concept: str, folder: Path, args, oracle, reference) -> dict:
    path = folder / "locality.json"
    if path.exists():
        return json.loads(path.read_text())
    _, _, sets = build([concept], args)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    load_edit(pipe, folder / "edit")
    res, _ = evaluate(pipe, oracle, sets, args, reference=reference)
    path.write_text(json.dumps(res, indent=1))
    return res


def reference_labels(concept: str, out: Path, args, oracle):
    path = out / concept / "unedited_labels.json"
    if path.exists():
        data = json.loads(path.read_text())
        return data["result"], data["labels"]
    _, _, sets = build([concept], args)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    res, labs = evaluate(pipe, oracle, sets, args)
    labs = {k: {c: [x.item() if hasattr(x, "item") else x for x in v] for c, v in d.items()} for k, d in labs.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"result": res, "labels": labs}))
    return res, labs


def attacks(concept: str, method: str, folder: Path, out: Path, args) -> dict:
    results = {}
    for kind in args.kinds:
        target = folder / f"attack_{kind}"
        done = target / "attack.json"
        if not done.exists():
            for other in METHODS:  # the unedited model's cells and optimization, computed once per concept
                source = out / concept / other.replace(" ", "_") / f"attack_{kind}" / "unedited"
                if other != method and (source / "attack.json").exists() and not (target / "unedited").exists():
                    shutil.copytree(source, target / "unedited")
                    break
            pipe = load_pipeline(args.model)
            pipe.set_progress_bar_config(disable=True)
            attack(pipe, concept, edit=folder / "edit", kind=kind, n_images=args.n, seeds=args.seed, out=target,
                   progress=print)
        data = json.loads(done.read_text())
        results[kind] = data
    return results


def summary(result: dict) -> dict:
    """{model: {condition: rate}} from an attack's saved result."""
    out = {}
    for cell in result["cells"]:
        flags = [s >= cell["threshold"] for s in cell["scores"]]
        out.setdefault(cell["model"], {})[cell["condition"]] = rate(flags)
    return out


def fmt(r: dict | None) -> str:
    if r is None:
        return ""
    return f"{r['value']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def table(report: dict) -> str:
    lines = ["| concept | erasure | blocks | plain | prompts | tokens | inversion | conditioning | unchanged "
             "(per attribute) | quality change | edit s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for concept, rows in report.items():
        unedited = None
        for method, row in rows.items():
            cells = {k: summary(v) for k, v in row["attacks"].items()}
            some = next(iter(cells.values()), {})
            unedited = unedited or {k: c.get("unedited", {}).get("attack") for k, c in cells.items()}
            plain = some.get("edited", {}).get("plain")
            loc = row["locality"]
            lines.append(
                f"| {concept} | {method} | {len(row['edit']['blocks'])} | {fmt(plain)} | "
                + " | ".join(fmt(cells.get(k, {}).get("edited", {}).get("attack")) for k in KINDS)
                + f" | {fmt(loc.get('unchanged'))} | {fmt(loc.get('quality_change'))} | "
                f"{row['edit']['job_seconds']:.0f} |")
        if unedited:
            lines.append(f"| {concept} | (unedited) | 0 | | " + " | ".join(fmt(unedited.get(k)) for k in KINDS)
                         + " | | | |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/robust")
    ap.add_argument("--model", default="toy", choices=("toy", "toy-flux"))
    ap.add_argument("--concepts", default="zibbit,hazard")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--n", type=int, default=64, help="held-out images per attack cell and per presence set")
    ap.add_argument("--n-locality", type=int, default=128, help="held-out images without the concept")
    ap.add_argument("--n-train", type=int, default=24, help="training prompts (the hazard mark)")
    ap.add_argument("--train-steps", type=int, default=None, help="robust training steps (default: RobustConfig's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for c in concepts:
        if c not in ANCHORS:
            ap.error(f"unknown concept {c!r}; choose from {', '.join(ANCHORS)}")
    if args.train_steps is None:
        args.train_steps = RobustConfig().steps
    if args.guidance is None:
        args.guidance = own_guidance(args.model, load_pipeline(args.model))
    # the locality sets are drawn as the model samples (toy-flux: its own sampling arguments)
    evaluate_erase_many.generate = lambda *a, **k: generate(*a, model=args.model, **k)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    oracle = load_oracle()
    report = {}
    for concept in concepts:
        _, reference = reference_labels(concept, out, args, oracle)
        for method in methods:
            folder = out / concept / method.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            print(f"[{concept}] {method}", flush=True)
            row = {"edit": edit(concept, method, folder, args)}
            row["locality"] = locality(concept, folder, args, oracle, reference)
            row["attacks"] = attacks(concept, method, folder, out, args)
            report.setdefault(concept, {})[method] = row
            (out / "robust.md").write_text(table(report))
            print(table(report), flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    (out / "settings.json").write_text(json.dumps(settings, indent=1))


if __name__ == "__main__":
    main()
