"""Cost of localized training vs all-block LoRA vs full fine-tuning, measured side
by side in one run (each variant in a fresh subprocess, so peak memory is its own).

    python benchmarks/finetune_cost.py                     # PixArt-XL-shaped + toy, CPU
    python benchmarks/finetune_cost.py --model toy --steps 5
    python benchmarks/finetune_cost.py --device cuda --tokens 4096 --batch 2   # real size on a GPU

Variants: LoRA in K of the blocks (K = 2, 4, 6 of 28 for XL) at three placements:
"early" (blocks 0..K-1, the worst case: every block after them needs a backward),
"mid" (from the middle) and "late" (the last K); LoRA in all blocks; full
fine-tuning of all blocks. Every variant runs ditloc's own engine
(`LocalizedTrainer`: frozen parameters hold no gradients or optimizer state, the
blocks before the first trainable one run without autograd).

Memory: on an accelerator ``torch.accelerator.max_memory_allocated``; on CPU the rise of the process's peak
RSS over its RSS once the model is built (weights are shared by all variants;
the rise is what training adds: activations, gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

XL = dict(num_layers=28, heads=16, head_dim=72, caption_channels=4096, in_channels=4, sample_size=128)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(model: str, tokens: int):
    """A pipeline whose transformer is the benchmark model (weights random for XL)."""
    if model == "toy":
        from ditloc.toy import load_pipeline

        pipe = load_pipeline()
        return pipe, pipe.transformer.config.sample_size
    from diffusers import PixArtTransformer2DModel

    from ditloc.testing import tiny_pixart_pipeline

    side = int(round((tokens ** 0.5) * 2))  # latent side for `tokens` patches of 2x2
    transformer = PixArtTransformer2DModel(
        num_attention_heads=XL["heads"], attention_head_dim=XL["head_dim"], in_channels=XL["in_channels"],
        out_channels=2 * XL["in_channels"], num_layers=XL["num_layers"], cross_attention_dim=XL["heads"] * XL["head_dim"],
        caption_channels=XL["caption_channels"], sample_size=side, patch_size=2, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, use_additional_conditions=False,
    ).eval()
    pipe = tiny_pixart_pipeline()
    pipe.register_modules(transformer=transformer)
    return pipe, side


def child(args) -> None:
    import torch

    from ditloc.adapters import get_adapter
    from ditloc.edit import LocalizedTrainer, TrainConfig
    from ditloc.edit.train import on_accelerator, peak_memory, reset_peak_memory, synchronize

    torch.set_num_threads(args.threads)
    pipe, side = build(args.model, args.tokens)
    pipe.to(args.device)
    adapter = get_adapter(pipe)
    names = adapter.block_names()
    n = len(names)
    kind, _, rest = args.variant.partition(":")
    if kind == "full":
        blocks, method = names, "full"
    elif kind == "all":
        blocks, method = names, "lora"
    else:  # early:K / mid:K / late:K
        k = int(rest)
        start = {"early": 0, "mid": (n - k) // 2, "late": n - k}[kind]
        blocks, method = names[start : start + k], "lora"
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    c = pipe.transformer.config.in_channels
    width = pipe.transformer.config.caption_channels
    x0 = torch.randn(args.batch, c, side, side, generator=g).to(dev)
    text = {"embeds": torch.randn(args.batch, args.text_len, width, generator=g).to(dev),
            "mask": torch.ones(args.batch, args.text_len, dtype=torch.long, device=dev)}
    synchronize(dev)
    reset_peak_memory(dev)
    base_rss = _rss_bytes()
    trainer = LocalizedTrainer(pipe, adapter, blocks, TrainConfig(method=method, steps=10**9, rank=args.rank,
                                                                  gradient_checkpointing=args.checkpointing))

    def loss_fn():
        x_t, t, target = trainer.noise.sample(x0, trainer.generator)
        return torch.nn.functional.mse_loss(adapter.denoise(x_t, t, text).float(), target.float())

    trainer.train_step(loss_fn)  # warm-up (allocates optimizer state)
    times = []
    for _ in range(args.steps):
        synchronize(dev)
        t0 = time.perf_counter()
        trainer.train_step(loss_fn)
        synchronize(dev)
        times.append(time.perf_counter() - t0)
    if on_accelerator(dev):
        peak = peak_memory(dev)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    print(json.dumps({
        "variant": args.variant, "blocks": [blocks[0], blocks[-1]] if blocks else [], "n_blocks": len(blocks),
        "trainable": sum(p.numel() for p in trainer.params),
        "total": sum(p.numel() for p in pipe.transformer.parameters()),
        "step_s": sorted(times)[len(times) // 2], "peak_bytes": peak,
    }))


def variants(model: str) -> list[str]:
    ks = (2, 4, 6) if model == "xl" else (1, 2, 3)
    out = [f"mid:{k}" for k in ks]
    out += [f"early:{ks[1]}", f"late:{ks[1]}", "all", "full"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("xl", "toy", "both"), default="both")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=64, help="image tokens (XL; 4096 = 1024px PixArt)")
    ap.add_argument("--text-len", type=int, default=120)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every variant")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    models = ("xl", "toy") if args.model == "both" else (args.model,)
    for model in models:
        rows = []
        for v in variants(model):
            cmd = [sys.executable, __file__, "--model", model, "--variant", v] + [
                a for k in ("device", "tokens", "text_len", "batch", "rank", "steps", "threads")
                for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))] + (
                ["--checkpointing"] if args.checkpointing else [])
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"variant {v} failed:\n{res.stderr[-2000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  measured {model} {v}", file=sys.stderr, flush=True)
        ref = next(r for r in rows if r["variant"] == "all")
        full = next(r for r in rows if r["variant"] == "full")
        print(f"\n{model}: {ref['total'] / 1e6:.0f}M params, device {args.device}, batch {args.batch}, "
              f"{args.tokens if model == 'xl' else 'toy'} image tokens, rank {args.rank}"
              f"{', gradient checkpointing' if args.checkpointing else ''}")
        print(f"{'variant':<10}{'blocks':<28}{'trainable':>12}{'step s':>9}{'mem MiB':>9}"
              f"{'time/allLoRA':>14}{'mem/allLoRA':>13}{'time/full':>11}{'mem/full':>10}")
        for r in rows:
            span = f"{r['n_blocks']} ({r['blocks'][0]}..{r['blocks'][1]})"
            print(f"{r['variant']:<10}{span:<28}{r['trainable']:>12,}{r['step_s']:>9.3f}{r['peak_bytes'] / 2**20:>9.0f}"
                  f"{r['step_s'] / ref['step_s']:>14.2f}{r['peak_bytes'] / ref['peak_bytes']:>13.2f}"
                  f"{r['step_s'] / full['step_s']:>11.2f}{r['peak_bytes'] / full['peak_bytes']:>10.2f}")


if __name__ == "__main__":
    main()
