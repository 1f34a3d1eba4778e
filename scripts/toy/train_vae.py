"""Train the toy AutoencoderKL (32x32x3 <-> 8x8x4) on freshly rendered scenes.

    python scripts/toy/train_vae.py --steps 3000 --out toy_training/runs/vae
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
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / "log.txt", "a")

    vae = common.make_vae()
    n_params = sum(p.numel() for p in vae.parameters())
    common.log(fh, f"vae params {n_params/1e6:.2f}M")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * (0.5 * (1 + np.cos(np.pi * min(s, args.steps) / args.steps)) * 0.9 + 0.1)
    )
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x = batch(rng, args.batch)
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = ((rec - x) ** 2).mean()
        kl = post.kl().mean()
        loss = l1 + 0.5 * mse + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
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
        vae.register_to_config(scaling_factor=1.0 / std)
        x = batch(np.random.default_rng(777), 32)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        err = (rec - x).abs().mean().item()
        grid = np.concatenate([common.tensor_to_images(x), common.tensor_to_images(rec)])
        common.save_grid(grid, out / "recon.png")
    common.log(fh, f"latent mean {mean:.4f} std {std:.4f} scaling_factor {1/std:.4f} eval l1 {err:.4f}")
    vae.save_pretrained(out / "model", safe_serialization=True)
    json.dump({"steps": args.steps, "seed": args.seed, "eval_l1": err, "latent_std": std,
               "wall_s": time.time() - t0}, open(out / "summary.json", "w"), indent=1)


if __name__ == "__main__":
    main()
