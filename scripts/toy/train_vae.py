"""Train the toy AutoencoderKL (32x32x3 <-> 8x8xC) on freshly rendered scenes.

    python scripts/toy/train_vae.py --steps 3000 --out toy_training/runs/vae

The FLUX toy's VAE (32x32x3 <-> 16x16x4, vae_scale_factor 2, with a shift factor):

    python scripts/toy/train_vae.py --levels 2 --latent-channels 4 --shift-factor \
        --steps 1800 --batch 32 --lr 1e-3 --threads 1 --out toy_training/runs/flux/vae
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import common
from ditloc.toy import world


def batch(rng, n):
    scenes = [world.sample_scene(rng) for _ in range(n)]
    return common.images_to_tensor(world.render_batch(scenes))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--kl", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(common.RUNS / "vae"))
    ap.add_argument("--latent-channels", type=int, default=8)
    ap.add_argument("--levels", type=int, choices=(2, 3), default=3,
                    help="encoder levels: 3 -> 8x8 latents (PixArt toy), 2 -> 16x16 latents (FLUX toy)")
    ap.add_argument("--shift-factor", action="store_true",
                    help="also set the config's shift_factor to the latents' mean (FLUX: z = (mean - shift) * scale)")
    ap.add_argument("--decoder-only", action="store_true",
                    help="freeze encoder (latents unchanged) and fine-tune the decoder on posterior means")
    ap.add_argument("--init", default=None, help="continue from a saved VAE directory")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / "log.txt", "a")

    if args.init:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.init)
        orig_sf = vae.config.scaling_factor
    else:
        vae = common.make_vae(args.latent_channels, levels=args.levels)
    n_params = sum(p.numel() for p in vae.parameters())
    common.log(fh, f"vae params {n_params/1e6:.2f}M")
    if args.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
        vae.encoder.eval()
    train_params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(train_params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * (0.5 * (1 + np.cos(np.pi * min(s, args.steps) / args.steps)) * 0.9 + 0.1)
    )
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x = batch(rng, args.batch)
        if args.decoder_only:
            with torch.no_grad():
                post = vae.encode(x).latent_dist
                # robustness to imperfect generated latents: small noise on the mean
                z = post.mean + 0.1 * post.mean.std() * torch.rand(()) * torch.randn_like(post.mean)
        else:
            post = vae.encode(x).latent_dist
            z = post.sample()
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = ((rec - x) ** 2).mean()
        kl = post.kl().mean()
        loss = l1 + 0.5 * mse + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train_params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == 1:
            common.log(
                fh,
                f"step {step} l1 {l1.item():.4f} mse {mse.item():.5f} kl {kl.item():.1f} "
                f"{step/(time.time()-t0):.2f} it/s",
            )

    # scaling factor from posterior means on fresh data
    vae.eval()
    with torch.no_grad():
        eval_rng = np.random.default_rng(12345)
        zs = []
        for _ in range(16):
            zs.append(vae.encode(batch(eval_rng, 128)).latent_dist.mean)
        zs = torch.cat(zs)
        std = zs.std().item()
        mean = zs.mean().item()
        if args.decoder_only:
            assert abs(orig_sf - 1.0 / std) < 1e-4 * orig_sf, (orig_sf, 1.0 / std)
            std = 1.0 / orig_sf  # keep the exact value the DiT latents were built with
        vae.register_to_config(scaling_factor=1.0 / std)
        if args.shift_factor:
            vae.register_to_config(shift_factor=mean)
        x = batch(np.random.default_rng(777), 32)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        err = (rec - x).abs().mean().item()
        grid = np.concatenate([common.tensor_to_images(x), common.tensor_to_images(rec)])
        common.save_grid(grid, out / "recon.png")
    common.log(fh, f"latent mean {mean:.4f} std {std:.4f} scaling_factor {1/std:.4f} eval l1 {err:.4f}")
    vae.save_pretrained(out / "model", safe_serialization=True)
    json.dump({"steps": args.steps, "seed": args.seed, "eval_l1": err, "latent_std": std, "latent_mean": mean,
               "shift_factor": mean if args.shift_factor else None, "levels": args.levels,
               "wall_s": time.time() - t0}, open(out / "summary.json", "w"), indent=1)


if __name__ == "__main__":
    main()
