"""Wall time and peak memory of `ditloc.localize` against plain generation.

Same prompts, steps, CFG and seeds; both skip the VAE decode (output_type="latent")
so only the denoising loop is compared. Runs alternate (plain, localize, plain,
...) in one process; medians are reported with their ratio.

    python benchmarks/localize_overhead.py                  # CPU, PixArt-shaped, 12 blocks, 256 tokens
    python benchmarks/localize_overhead.py --size xl --device cuda   # PixArt-XL: 28 blocks, 1152 wide, 4096 tokens
    python benchmarks/localize_overhead.py --family flux    # CPU, FLUX-shaped: 4 double + 8 single blocks, 256 tokens
    python benchmarks/localize_overhead.py --family flux --size xl --device cuda   # FLUX.1-dev shape
    python benchmarks/localize_overhead.py --method contribution,patch,attribution   # the three methods

Goals: contribution <= 1.10x plain time and <= 1.05x memory; patch <= (blocks + 1)x
time (one clean forward and one forward per block per step, on the conditional
rows only); attribution <= 3x time (a clean forward, a differentiable forward and
one backward pass per step).

Peak memory: on CUDA the allocator's peak; on CPU the process's peak resident set
(VmHWM, reset between runs through /proc/self/clear_refs), reported above the
resident size just before each run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel  # noqa: E402
from diffusers.utils import logging as dlog  # noqa: E402
from transformers import T5Config, T5EncoderModel  # noqa: E402

import ditloc  # noqa: E402
from ditloc.adapters import get_adapter  # noqa: E402
from ditloc.testing import word_tokenizer  # noqa: E402

SIZES = {
    # name: (blocks, heads, head_dim, latent side, patch) -> tokens = (side/patch)^2
    "small": (12, 6, 64, 32, 2),  # 384 wide, 256 image tokens
    "xl": (28, 16, 72, 128, 2),  # PixArt-XL-2-1024: 1152 wide, 4096 image tokens
}


FLUX_SIZES = {
    # name: (double blocks, single blocks, heads, head_dim, packed latent side) -> tokens = side^2
    "small": (4, 8, 6, 64, 16),  # 384 wide, 256 image tokens
    "xl": (19, 38, 24, 128, 64),  # FLUX.1-dev: 3072 wide, 4096 image tokens (1024 px)
}


def build_flux(size: str, device, dtype):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    double, single, heads, head_dim, side = FLUX_SIZES[size]
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.random.manual_seed(0)  # isolated: module init draws from the global RNG
        tok = word_tokenizer()
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                            num_hidden_layers=1, projection_dim=32, eos_token_id=1, pad_token_id=0, bos_token_id=3))
        te = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=64, d_ff=128, d_kv=16, num_layers=1, num_heads=4))
        vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=16, shift_factor=0.0)
        tr = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=head_dim,
            num_attention_heads=heads, joint_attention_dim=64, pooled_projection_dim=32,
            axes_dims_rope=[head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3], guidance_embeds=True,
        )
        for p in tr.parameters():
            if torch.count_nonzero(p) == 0:
                p.data = torch.randn(p.shape, generator=g) * 0.02
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=word_tokenizer(bos=True, model_max_length=77),
                        text_encoder_2=te, tokenizer_2=tok, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype), side * side, side * 2  # vae_scale_factor 1: image px = 2 * side


def build(size: str, device, dtype):
    blocks, heads, head_dim, side, patch = SIZES[size]
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.random.manual_seed(0)  # isolated: module init draws from the global RNG
        tok = word_tokenizer()
        te = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=64, d_ff=128, d_kv=16, num_layers=1, num_heads=4))
        vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
        tr = PixArtTransformer2DModel(
            sample_size=side, num_layers=blocks, patch_size=patch, attention_head_dim=head_dim,
            num_attention_heads=heads, caption_channels=64, in_channels=4, out_channels=8,
            cross_attention_dim=heads * head_dim, norm_type="ada_norm_single", use_additional_conditions=False,
        )
        for p in tr.parameters():  # DiTs zero-init some layers; random weights everywhere
            if torch.count_nonzero(p) == 0:
                p.data = torch.randn(p.shape, generator=g) * 0.02
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype), (side // patch) ** 2


class Peak:
    def __init__(self, device):
        self.cuda = torch.device(device).type != "cpu" and torch.cuda.is_available()

    def _rss(self, field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._rss("VmRSS")

    def read(self):
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - self.base
        peak = self._rss("VmHWM")
        return peak, peak - self.base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=("pixart", "flux"), default="pixart")
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--method", default="contribution", help="comma list of localization methods to time")
    ap.add_argument("--block-batch", type=int, default=None, help="patch: blocks per extra forward")
    args = ap.parse_args()
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    dlog.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.family == "flux":
        pipe, tokens, px = build_flux(args.size, args.device, dtype)
        call = dict(num_inference_steps=args.steps, guidance_scale=3.5, height=px, width=px,
                    output_type="latent", max_sequence_length=128)
        c = pipe.transformer.config
        shape = (f"FLUX {args.size}: {c.num_layers} double + {c.num_single_layers} single blocks, "
                 f"width {c.num_attention_heads * c.attention_head_dim}, {tokens} image + 128 text tokens, "
                 "guidance-distilled (no CFG batch)")
    else:
        pipe, tokens = build(args.size, args.device, dtype)
        call = dict(num_inference_steps=args.steps, guidance_scale=4.5, use_resolution_binning=False,
                    output_type="latent", max_sequence_length=120)
        shape = (f"PixArt {args.size}: {len(pipe.transformer.transformer_blocks)} blocks, width "
                 f"{pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim}, "
                 f"{tokens} image tokens, CFG")
    prompts = [f"a photo of van gogh {w}" for w in ("at night", "in the city", "with a dog", "by the river")]
    prompts = (prompts * args.prompts)[: args.prompts]
    peak = Peak(args.device)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"{shape}, {n_params / 1e6:.1f}M params; {args.prompts} prompts x {args.steps} steps, "
          f"{args.device} {args.dtype}, torch threads {torch.get_num_threads()}")

    def plain():
        gens = [torch.Generator().manual_seed(0) for _ in prompts]
        pipe(prompts, generator=gens, **call)

    def measured(method):
        def run():
            ditloc.localize(pipe, prompts, "van gogh", method=method, seed=0, batch_size=len(prompts),
                            block_batch=args.block_batch, **{k: v for k, v in call.items() if k != "output_type"})
        return run

    runs = [("plain", plain)] + [(m, measured(m)) for m in methods]
    for _, fn in runs:  # warm-up (allocator, kernels)
        fn()
    results = {name: [] for name, _ in runs}
    for _ in range(args.repeats):
        for name, fn in runs:
            peak.reset()
            t = time.perf_counter()
            fn()
            if peak.cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            results[name].append((dt, *peak.read()))
    med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in results.items()}
    mib = 2**20
    print(f"{'':10} {'time s':>9} {'peak MiB':>10} {'working MiB':>12}")
    for k, (t, p, w) in med.items():
        print(f"{k:10} {t:9.3f} {p / mib:10.1f} {w / mib:12.1f}")
    n_blocks = len(get_adapter(pipe).block_names())
    goals = {"contribution": "<= 1.10x", "patch": f"<= {n_blocks + 1}x (blocks + 1)", "attribution": "<= 3x"}
    tp, pp, _ = med["plain"]
    for m in methods:
        tl, pl, _ = med[m]
        print(f"ratio {m}/plain: time {tl / tp:.3f}x (goal {goals[m]}), peak memory {pl / pp:.3f}x "
              f"(extra {(pl - pp) / mib:+.1f} MiB)")


if __name__ == "__main__":
    main()
