"""Cost of localized training vs all-block LoRA vs full fine-tuning, measured side
by side in one run (each variant in a fresh subprocess, so peak memory is its own).

    python benchmarks/finetune_cost.py                     # PixArt-XL-shaped + toy, CPU
    python benchmarks/finetune_cost.py --model toy --steps 5
    python benchmarks/finetune_cost.py --device cuda --tokens 4096 --batch 2   # real size on a GPU
    python benchmarks/finetune_cost.py --model xl --variants mid:4,all,full     # fewer variants

Precision (``--precisions fp32,bf16``, the default: both, side by side): ``fp32`` trains in
float32; ``bf16`` is ``TrainConfig(mixed_precision="bf16")`` over a bfloat16 base (as
``--mixed-precision bf16`` loads it): trainable weights and AdamW moments float32, forward under
bf16 autocast. The table gives both and the bf16/fp32 ratios of step time and memory.

Variants: LoRA in K of the blocks (K = 2, 4, 6 of 28 for XL) at three placements:
"early" (blocks 0..K-1, the worst case: every block after them needs a backward),
"mid" (from the middle) and "late" (the last K); LoRA in all blocks; full
fine-tuning of all blocks. Every variant runs ditloc's own engine
(`LocalizedTrainer`: frozen parameters hold no gradients or optimizer state, the
blocks before the first trainable one run without autograd).

Memory: on an accelerator ``torch.accelerator.max_memory_allocated`` (weights included); on CPU the
rise of the process's peak RSS over its RSS once the model is built (the rise is what training adds:
activations, gradients, optimizer state), plus the transformer's weights ("total"), so that the two
precisions compare (bf16 halves the frozen weights).
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


def _reset_peak_rss() -> bool:
    """Start the peak-RSS count afresh (Linux: VmHWM), so the model's build does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(model: str, tokens: int, dtype=None):
    """A pipeline whose transformer is the benchmark model (weights random for XL), in `dtype`."""
    if model == "toy":
        from ditloc.toy import load_pipeline

        pipe = load_pipeline(torch_dtype=dtype)
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
    if dtype is not None:
        transformer.to(dtype)
    pipe = tiny_pixart_pipeline()
    pipe.register_modules(transformer=transformer)
    return pipe, side


def child(args) -> None:
    import torch

    from ditloc.adapters import get_adapter
    from ditloc.edit import LocalizedTrainer, TrainConfig
    from ditloc.devices import on_accelerator, peak_memory, reset_peak_memory, synchronize

    torch.set_num_threads(args.threads)
    mixed = args.precision == "bf16"
    pipe, side = build(args.model, args.tokens, torch.bfloat16 if mixed else None)
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
    # latents float32 (as the jobs keep them under mixed precision); text in the base dtype (its encoder's)
    text = {"embeds": torch.randn(args.batch, args.text_len, width, generator=g).to(dev, pipe.transformer.dtype),
            "mask": torch.ones(args.batch, args.text_len, dtype=torch.long, device=dev)}
    weights = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    synchronize(dev)
    reset_peak_memory(dev)
    reset = _reset_peak_rss()
    base_rss = _rss_bytes()
    trainer = LocalizedTrainer(pipe, adapter, blocks, TrainConfig(
        method=method, steps=10**9, rank=args.rank, gradient_checkpointing=args.checkpointing,
        mixed_precision="bf16" if mixed else "no"))

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
        peak = total = peak_memory(dev)
    else:
        peak = _peak_rss_bytes(reset) - base_rss
        total = peak + weights
    print(json.dumps({
        "variant": args.variant, "precision": args.precision, "weights_bytes": weights, "total_bytes": total,
        "blocks": [blocks[0], blocks[-1]] if blocks else [], "n_blocks": len(blocks),
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
    ap.add_argument("--variants", default=None, metavar="V,V", help="e.g. mid:4,all,full (default: all of them)")
    ap.add_argument("--precisions", default="fp32,bf16", metavar="P,P",
                    help="fp32 and/or bf16 (bf16-mixed), side by side (default both)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        sys.exit("--precisions takes fp32 and/or bf16")
    if "bf16" in precisions:
        from ditloc.edit.precision import bf16_supported

        why = bf16_supported(args.device)
        if why is not None:
            sys.exit(f"bf16 on {args.device}: {why}")
    models = ("xl", "toy") if args.model == "both" else (args.model,)
    for model in models:
        rows = []
        chosen = args.variants.split(",") if args.variants else variants(model)
        for v in chosen:
            for prec in precisions:
                cmd = [sys.executable, __file__, "--model", model, "--variant", v, "--precision", prec] + [
                    a for k in ("device", "tokens", "text_len", "batch", "rank", "steps", "threads")
                    for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))] + (
                    ["--checkpointing"] if args.checkpointing else [])
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    sys.exit(f"variant {v} ({prec}) failed:\n{res.stderr[-2000:]}")
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(f"  measured {model} {v} {prec}", file=sys.stderr, flush=True)
        _table(model, args, rows, precisions)


def _ratio(a: float, b: float | None, width: int) -> str:
    return f"{a / b:>{width}.2f}" if b else f"{'-':>{width}}"


def _table(model, args, rows, precisions) -> None:
    import torch

    cpu = torch.device(args.device).type == "cpu"
    native = ""
    if cpu and "bf16" in precisions:
        # bf16 instructions (AVX512-BF16 or AMX); oneDNN's own flag is also true on plain AVX512, where
        # it converts to float32 inside its kernels (measured there: slower than float32)
        hw = (getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
              or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        native = ", bf16 in hardware (AVX512-BF16/AMX)" if hw else ", bf16 converted in software (no AVX512-BF16/AMX)"
    print(f"\n{model}: {rows[0]['total'] / 1e6:.0f}M params, device {args.device}, batch {args.batch}, "
          f"{args.tokens if model == 'xl' else 'toy'} image tokens, rank {args.rank}"
          f"{', gradient checkpointing' if args.checkpointing else ''}{native}")
    mem = "train MiB" if cpu else "peak MiB"  # the mem/... ratios are of this column
    for prec in precisions:
        mine = [r for r in rows if r["precision"] == prec]
        ref = next((r for r in mine if r["variant"] == "all"), None)  # all-block LoRA
        full = next((r for r in mine if r["variant"] == "full"), None)
        print(f"[{'bf16-mixed' if prec == 'bf16' else prec}]")
        print(f"{'variant':<10}{'blocks':<28}{'trainable':>12}{'step s':>9}{mem:>10}{'total MiB':>10}"
              f"{'time/allLoRA':>14}{'mem/allLoRA':>13}{'time/full':>11}{'mem/full':>10}")
        for r in mine:
            span = f"{r['n_blocks']} ({r['blocks'][0]}..{r['blocks'][1]})"
            print(f"{r['variant']:<10}{span:<28}{r['trainable']:>12,}{r['step_s']:>9.3f}"
                  f"{r['peak_bytes'] / 2**20:>10.0f}{r['total_bytes'] / 2**20:>10.0f}"
                  f"{_ratio(r['step_s'], ref and ref['step_s'], 14)}"
                  f"{_ratio(r['peak_bytes'], ref and ref['peak_bytes'], 13)}"
                  f"{_ratio(r['step_s'], full and full['step_s'], 11)}"
                  f"{_ratio(r['peak_bytes'], full and full['peak_bytes'], 10)}")
    if {"fp32", "bf16"} <= set(precisions):
        print("[bf16-mixed / fp32]")
        print(f"{'variant':<10}{'time':>8}{mem:>11}{'total mem':>11}{'weights':>9}")
        for v in dict.fromkeys(r["variant"] for r in rows):
            a = next(r for r in rows if r["variant"] == v and r["precision"] == "fp32")
            b = next(r for r in rows if r["variant"] == v and r["precision"] == "bf16")
            print(f"{v:<10}{_ratio(b['step_s'], a['step_s'], 8)}{_ratio(b['peak_bytes'], a['peak_bytes'], 11)}"
                  f"{_ratio(b['total_bytes'], a['total_bytes'], 11)}"
                  f"{_ratio(b['weights_bytes'], a['weights_bytes'], 9)}")


if __name__ == "__main__":
    main()
