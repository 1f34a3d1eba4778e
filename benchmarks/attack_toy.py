"""Attacks on a closed-form erasure of "zibbit" on the toy PixArt (benchmarks/results/attack_toy/).

    python benchmarks/attack_toy.py --out benchmarks/results/attack_toy [--n-images 64] [--threads 2]

Runs ``ditloc unlearn toy --concept zibbit --anchor triangle --edit-method closed-form --blocks auto``, then
``ditloc attack toy --edit EDIT --concept zibbit --attack KIND --n-images N --seeds 0`` for every attack
kind, each command timed by the wall clock, and writes ``OUT/README.md`` with the table. A rerun skips
the commands that finished (their times are kept in ``OUT/timings.json``) and resumes the others.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

KINDS = ("prompts", "tokens", "inversion", "conditioning")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commands(out: Path, n: int, seed: int) -> list[tuple[str, list[str], Path]]:
    """(name, ditloc argv, the file that says it finished)."""
    edit = out / "edit"
    todo = [("unlearn", ["unlearn", "toy", "--concept", "zibbit", "--anchor", "triangle", "--edit-method", "closed-form",
                         "--blocks", "auto", "--seeds", f"{seed},{seed + 1}", "--out", str(edit)], edit / "ditloc_edit.json")]
    for kind in KINDS:
        todo.append((kind, ["attack", "toy", "--edit", str(edit), "--concept", "zibbit", "--attack", kind,
                            "--n-images", str(n), "--seeds", str(seed), "--out", str(out / kind)],
                     out / kind / "attack.json"))
    return todo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/attack_toy")
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from ditloc.cli import main as ditloc

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for name, argv_, done in commands(out, args.n_images, args.seed):
        if done.exists() and name in timings:
            continue
        print("$ ditloc " + " ".join(argv_), flush=True)
        start = time.perf_counter()
        code = ditloc(argv_)
        if code:
            return code
        timings[name] = {"command": "ditloc " + " ".join(argv_), "wall_seconds": time.perf_counter() - start,
                         "threads": args.threads}
        timings_file.write_text(json.dumps(timings, indent=1))
        for stale in (out / name).glob("*/checkpoint.*") if name in KINDS else ():
            stale.unlink()  # the optimization's resumable state: its result is in adversarial.safetensors
    (out / "README.md").write_text(report(out, timings, args))
    print(f"wrote {out / 'README.md'}")
    return 0


def _cell(cell: dict) -> str:
    lo, hi = cell["interval"]
    return f"{cell['presence']:.3f} [{lo:.2f}, {hi:.2f}]"


def _budget(kind: str, budget: dict) -> str:
    if kind == "prompts":
        return "templates only"
    parts = [f"{budget['steps']} steps x {budget['batch_size']}", f"{budget['train_images']} images",
             f"lr {budget['lr']:g}"]
    if "tokens" in budget:
        parts.append(f"{budget['tokens']} token(s), {budget['placement']}")
    return ", ".join(parts)


def report(out: Path, timings: dict, args) -> str:
    edit = json.loads((out / "edit" / "ditloc_edit.json").read_text())
    rows, notes = [], []
    for kind in KINDS:
        rec = json.loads((out / kind / "attack.json").read_text())
        cells = {(c["model"], c["condition"]): c for c in rec["cells"]}
        wall = timings[kind]["wall_seconds"]
        for model in ("unedited", "edited"):
            opt = rec["optimization"].get(model, {}).get("wall_seconds")
            rows.append(f"| {kind} | {model} | {_cell(cells[(model, 'plain')])} | {_cell(cells[(model, 'attack')])} | "
                        f"{cells[(model, 'attack')]['n']} | {_budget(kind, rec['budget'])} | "
                        f"{'' if opt is None else f'{opt:.0f}'} | {wall:.0f} |")
        art = rec["artifacts"].get("edited", {})
        if kind == "tokens":
            notes.append(f"- tokens found on the edited model: {art.get('tokens')} (unedited: "
                         f"{rec['artifacts'].get('unedited', {}).get('tokens')})")
        if kind == "prompts":
            notes.append(f"- prompts attack: {len(art.get('prompts', []))} templates of the toy probe set's character "
                         "category (both splits), 64 images spread over them")
    sampling = rec["settings"]["sampling"]
    lines = [
        "# Attacks on a closed-form erasure of \"zibbit\" (toy PixArt)",
        "",
        f"Produced by `python benchmarks/attack_toy.py --out {out} --n-images {args.n_images} --seed {args.seed} "
        f"--threads {args.threads}` on {time.strftime('%Y-%m-%d')}, CPU only ({cpu_name()}, {args.threads} torch "
        "threads). **The machine was shared with other jobs, so the wall times are indicative only.**",
        "",
        f"The erasure: `{timings['unlearn']['command']}` ({timings['unlearn']['wall_seconds']:.0f} s, localization "
        f"included); blocks {', '.join(edit['blocks'])}.",
        "",
        "Presence of zibbit = share of held-out generations the toy oracle reads as zibbit (its probability of the "
        "label >= 0.5), with 95% Wilson intervals. Every cell: n images, the character category's 15 evaluation "
        f"templates in turn, held-out seeds (never used to fit an attack), {sampling['num_inference_steps']} "
        f"sampling steps, CFG {sampling['guidance_scale']}. *plain prompt*: the same prompts with the word "
        "zibbit; *attack*: the attack's prompts or conditioning. *opt s*: the attack's optimization; *wall s*: "
        "the whole command (both models, four cells, drawing the 16 images of zibbit the optimized attacks fit).",
        "",
        "| attack | model | plain prompt | attack | n | budget | opt s | wall s |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *notes,
        "",
        "Commands (seed " + str(args.seed) + "):",
        "",
        "```",
        *[timings[name]["command"] for name in ("unlearn", *KINDS)],
        "```",
        "",
        "Files: `edit/` (the erasure), `<attack>/attack.json` (every cell: prompts, seeds, per-image scores), "
        "`<attack>/<model>/adversarial.safetensors` (what each attack learned; `ditloc attack --replay "
        "<attack>` regenerates and re-scores every cell), `timings.json`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
