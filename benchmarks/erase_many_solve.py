"""Cost of the joint closed-form solve for N concepts at a real model's text shape:
time and peak memory of everything after the text states are recorded.

Random text states stand in for recorded ones (the cost does not depend on their values).
Each configuration runs in its own process, so its peak resident memory (VmHWM) is its own.
Stages, as `ditloc.edit.closed_form` runs them for a cross-attention family (every block
reads the same text states):
  moments   each concept's C, A (and the fit's AA) and the preserved D, float64 (random states drawn
            here too: an upper bound)
  fold      each finished concept added to the sums of the blocks it is localized in, then freed
  solve     one factorization per block (weighted least squares or null space)
  apply     W' = W M for the block's key and value projections

    python benchmarks/erase_many_solve.py                      # PixArt-XL: 28 blocks, 1152-d
    python benchmarks/erase_many_solve.py --dim 4096           # projections reading 4096-d T5 states
    python benchmarks/erase_many_solve.py --device cuda        # on a GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def one(args) -> dict:
    from ditloc.edit.closed_form import ClosedFormConfig, _Moments, solve_moments

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator("cpu").manual_seed(0)
    sync = (lambda: torch.accelerator.synchronize(device)) if device.type != "cpu" else (lambda: None)
    blocks = [f"block.{i}" for i in range(args.blocks)]
    members = {b: [] for b in blocks}
    for c in range(args.concepts):  # localized: each concept in `per_concept` random blocks
        chosen = blocks if args.per_concept >= args.blocks else [
            blocks[i] for i in torch.randperm(args.blocks, generator=g)[: args.per_concept].tolist()]
        for b in chosen:
            members[b].append(c)
    rows = args.prompts * args.tokens
    t = {"moments": 0.0, "fold": 0.0}
    sums: dict[str, _Moments] = {}
    for c in range(args.concepts):
        sync()
        t0 = time.perf_counter()
        m = _Moments(args.dim, device)
        m.add_pairs(torch.randn(rows, args.dim, generator=g).to(device),
                    torch.randn(rows, args.dim, generator=g).to(device))
        sync()
        t1 = time.perf_counter()
        for b in blocks:  # as record_moments: a finished concept is added to its blocks' sums, then freed
            if c in members[b]:
                if b in sums:
                    sums[b].fold(m)
                else:
                    sums[b] = _Moments.combine([m], None)
        del m
        sync()
        t["moments"] += t1 - t0
        t["fold"] += time.perf_counter() - t1
    t0 = time.perf_counter()
    keep = _Moments(args.dim, device)
    for lo in range(0, args.preserve_prompts * args.tokens, 4096):
        n = min(4096, args.preserve_prompts * args.tokens - lo)
        keep.add_preserve(torch.randn(n, args.dim, generator=g).to(device))
    for m in sums.values():
        m.D, m.nd = keep.D, keep.nd
    sync()
    t["moments"] += time.perf_counter() - t0
    moments = sums
    t0 = time.perf_counter()
    factors = solve_moments(moments, ClosedFormConfig(preserve_mode=args.mode))
    sync()
    t["solve"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b, M in factors.items():
        for _ in ("to_k", "to_v"):
            w = torch.randn(args.out_dim, args.dim, generator=g).to(device)
            (w.to(M.dtype) @ M).to(w.dtype)
    sync()
    t["apply"] = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    out = {"seconds": {k: round(v, 3) for k, v in t.items()}, "total_seconds": round(sum(t.values()), 2),
           "peak_rss_mib": round(hwm / 2**20, 1), "blocks_solved": len(factors)}
    if device.type != "cpu":
        out["peak_device_mib"] = round(getattr(torch, device.type).max_memory_allocated(device) / 2**20, 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=28)
    ap.add_argument("--dim", type=int, default=1152, help="what the key/value projections read")
    ap.add_argument("--out-dim", type=int, default=1152, help="keys/values")
    ap.add_argument("--concepts", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=24, help="training prompts per concept")
    ap.add_argument("--tokens", type=int, default=16, help="edited rows per prompt (readable tokens)")
    ap.add_argument("--preserve-prompts", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        mode, per_concept = args.one.split(":")
        args.mode, args.per_concept = mode, int(per_concept)
        print(json.dumps(one(args)))
        return
    print(f"N = {args.concepts} concepts x {args.prompts} prompts x {args.tokens} rows, {args.preserve_prompts} "
          f"preserved prompts, {args.blocks} blocks, text states {args.dim}-d -> keys/values {args.out_dim}-d, "
          f"{args.device}, {args.threads} threads, torch {torch.__version__}")
    print("| blocks per concept | preserve mode | moments s | fold s | solve s | apply s | total s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    base = [a for a in sys.argv[1:]]
    for per_concept, label in [(3, "3 (localized)"), (args.blocks, f"{args.blocks} (all)")]:
        for mode in ("weighted", "nullspace"):
            res = subprocess.run([sys.executable, __file__, *base, "--one", f"{mode}:{per_concept}"],
                                 capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            s = r["seconds"]
            print(f"| {label} | {mode} | {s['moments']} | {s['fold']} | {s['solve']} | {s['apply']} | "
                  f"{r['total_seconds']} | {r['peak_rss_mib']} |", flush=True)


if __name__ == "__main__":
    main()
