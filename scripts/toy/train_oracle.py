"""Train the toy-world attribute oracle (multi-head CNN) on fresh renders with
augmentations that mimic generated images (noise, blur, color jitter, shifts,
VAE round trips).

    nohup nice -n 10 python scripts/toy/train_oracle.py --steps 3000 \
        > toy_training/runs/oracle/log.txt 2>&1 &

Writes ``src/ditloc/toy/oracle/{oracle.safetensors,config.json}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
from ditloc.toy import oracle as O
from ditloc.toy import world


def make_batch(rng, n, classes):
    scenes = [world.sample_scene(rng, p_character=0.25, p_hazard=0.4) for _ in range(n)]
    x = common.images_to_tensor(world.render_batch(scenes))
    tg = {k: torch.tensor([O.scene_targets(s, classes)[k] for s in scenes]) for k in classes}
    return x, tg


def blur(x, sigma):
    k = torch.arange(-1, 2, dtype=torch.float32)
    w = torch.exp(-(k**2)[None, :] / (2 * sigma[:, None] ** 2))  # [N,3]
    w = w / w.sum(1, keepdim=True)
    n = x.shape[0]
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    # separable blur with per-sample kernel
    h = sum(w[:, i].view(n, 1, 1, 1) * xp[:, :, :, i : i + 32] for i in range(3))
    v = sum(w[:, i].view(n, 1, 1, 1) * h[:, :, i : i + 32, :] for i in range(3))
    return v


def augment(x, g: torch.Generator, vae=None, p_vae=0.3):
    n = x.shape[0]
    if vae is not None:
        m = torch.rand(n, generator=g) < p_vae
        if m.any():
            with torch.no_grad():
                z = vae.encode(x[m]).latent_dist.mean
                z = z + 0.15 * torch.randn(z.shape, generator=g) * torch.rand(len(z), 1, 1, 1, generator=g) * z.std()
                x = x.clone()
                x[m] = vae.decode(z).sample.clamp(-1, 1)
    # shifts (replicate padding, +-2 px)
    sx, sy = torch.randint(-2, 3, (2,), generator=g).tolist()
    if sx or sy:
        xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
        x = xp[:, :, 2 + sy : 34 + sy, 2 + sx : 34 + sx]
    # blur for ~30%
    mb = torch.rand(n, generator=g) < 0.3
    if mb.any():
        sig = 0.3 + 0.5 * torch.rand(int(mb.sum()), generator=g)
        x = x.clone()
        x[mb] = blur(x[mb], sig)
    # color jitter: brightness / contrast / per-channel gain
    b = 1 + 0.1 * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    c = 0.05 * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
    off = 0.06 * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    x = x * b * (1 + c) + off
    # gaussian noise
    s = 0.1 * torch.rand(n, 1, 1, 1, generator=g)
    x = x + s * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


@torch.no_grad()
def evaluate(net, classes, seed, n=2000, vae=None):
    net.eval()
    rng = np.random.default_rng(seed)
    correct = {k: 0 for k in classes}
    for i in range(0, n, 250):
        x, tg = make_batch(rng, 250, classes)
        if vae is not None:
            x = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out = net(x)
        for k in classes:
            correct[k] += (out[k].argmax(-1) == tg[k]).sum().item()
    net.train()
    return {k: correct[k] / n for k in classes}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--vae", default=str(common.RUNS / "vae" / "model"))
    ap.add_argument("--out", default=str(O.ORACLE_DIR))
    ap.add_argument("--logdir", default=str(common.RUNS / "oracle"))
    args = ap.parse_args()

    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 10])
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    fh = open(logdir / "train_log.txt", "a")

    vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False) if Path(args.vae).exists() else None
    classes = O.default_classes()
    net = O.OracleNet(classes, width=args.width)
    common.log(fh, f"oracle params {sum(p.numel() for p in net.parameters())/1e6:.2f}M vae={vae is not None}")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x, tg = make_batch(rng, args.batch, classes)
        x = augment(x, g, vae)
        out = net(x)
        loss = sum(F.cross_entropy(out[k], tg[k], label_smoothing=0.05) for k in classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == 1:
            acc = {k: (out[k].argmax(-1) == tg[k]).float().mean().item() for k in classes}
            common.log(fh, f"step {step} loss {loss.item():.4f} " +
                       " ".join(f"{k}={v:.3f}" for k, v in acc.items()) +
                       f" {step/(time.time()-t0):.2f} it/s")
    net.eval()
    acc_clean = evaluate(net, classes, seed=999)
    acc_vae = evaluate(net, classes, seed=998, vae=vae) if vae is not None else None
    common.log(fh, f"fresh-render accuracy: {acc_clean}")
    common.log(fh, f"VAE round-trip accuracy: {acc_vae}")
    info = {"steps": args.steps, "seed": args.seed, "acc_fresh": acc_clean, "acc_vae_roundtrip": acc_vae,
            "wall_s": time.time() - t0}
    O.save_oracle(net, args.out, extra={"training": info})
    json.dump(info, open(logdir / "summary.json", "w"), indent=1)


if __name__ == "__main__":
    main()
