"""Train a toy DiT + its text encoder(s) on cached VAE latents.

``--family pixart`` (default): the shipped toy PixArt-alpha (PixArt DiT + T5).
``--family flux``: a toy FLUX.1 (FluxTransformer2DModel + T5 + CLIP, rectified
flow); see ``families.py`` (everything family-specific) and ``FLUX_TRAINING.md``.

``--steps`` is always the TOTAL step count (including steps done earlier).

1. Fresh training (builds the scene pool and latent cache on first use):

    nohup nice -n 5 python scripts/toy/train_dit.py --steps 30000 \
        > toy_training/runs/dit/log.txt 2>&1 &

2. Resume after interruption on the same machine (same arguments + --resume;
   deterministic, bit-exact continuation from ``<out>/ckpt.{safetensors,json}``):

    nohup nice -n 5 python scripts/toy/train_dit.py --steps 30000 --resume \
        >> toy_training/runs/dit/log.txt 2>&1 &

3. Continue in a fresh checkout (``toy_training/runs/`` is git-ignored, so no
   checkpoint exists): warm-start from the exported pipeline.  Transformer and
   text encoder (live weights and EMA) start from the exported EMA weights, the
   VAE defaults to ``<DIR>/vae``, the step counter continues from
   ``<DIR>/training_info.json``, the optimizer is fresh (with ``--warmup``):

    mkdir -p toy_training/runs/dit
    nohup nice -n 5 python scripts/toy/train_dit.py --steps 30000 \
        --init-from src/ditloc/toy/model >> toy_training/runs/dit/log.txt 2>&1 &

   If that run is interrupted, repeat the same command with --resume added
   (an existing checkpoint takes precedence over --init-from).

Checkpoints (atomic) go to ``<out>/ckpt.safetensors`` (model, EMA, optimizer
moments, torch RNG states) + ``<out>/ckpt.json`` (step, args, numpy/python RNG
states, optimizer param_groups, configs) every ``--ckpt-every`` steps, plus a
permanent EMA-only copy ``<out>/ema_<step>.{safetensors,json}`` every
``--keep-every`` steps.  Nothing is pickled.  (The pickled ``ckpt.pt`` format of
the first runs was converted once by a one-off script, removed in commit history.)
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

import common
import families
from ditloc.toy import world


def build_pool(args, out: Path, vae):
    """Seeded scene pool + VAE latents ((posterior mean - shift_factor, if set) * scaling_factor).

    Cached as ``pool_<...>.safetensors`` (latents) + ``.json`` (scenes as dicts)."""
    shift = vae.config.get("shift_factor")
    tag = (f"c{vae.config.latent_channels}_sf{vae.config.scaling_factor:.5f}"
           + (f"_sh{shift:.5f}" if shift is not None else "") + ("_randpos" if args.random_positions else ""))
    cache = out / f"pool_{args.pool}_seed{args.seed}_{tag}"
    if common.state_exists(cache):
        t, meta = common.load_state(cache)
        return [world.Scene(**d) for d in meta["scenes"]], t["latents"]
    rng = np.random.default_rng([args.seed, 1])
    scenes = [world.sample_scene(rng, random_position=args.random_positions) for _ in range(args.pool)]
    lat = []
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, args.pool, 512):
            x = common.images_to_tensor(world.render_batch(scenes[i : i + 512]))
            mean = vae.encode(x).latent_dist.mean
            lat.append((mean if shift is None else mean - shift) * vae.config.scaling_factor)
            if (i // 512) % 20 == 0:
                print(f"encoded {i + len(x)}/{args.pool} ({time.time() - t0:.0f}s)", flush=True)
    latents = torch.cat(lat).contiguous()
    common.save_state(cache, {"latents": latents}, {"scenes": [sc.to_dict() for sc in scenes]})
    print(f"latents {tuple(latents.shape)} mean {latents.mean():.3f} std {latents.std():.3f}", flush=True)
    # return exactly what a later run reads back from the cache
    return [world.Scene(**sc.to_dict()) for sc in scenes], latents


def object_masks(scenes, idx, latent_size: int) -> torch.Tensor:
    """[B, 1, h, w] 1.0 on the latent pixels that the object's bounding box touches."""
    cell = world.IMAGE_SIZE / latent_size
    m = torch.zeros(len(idx), 1, latent_size, latent_size)
    for b, i in enumerate(idx):
        sc = scenes[i]
        lo_x, hi_x = int(sc.x0 // cell), int(np.ceil((sc.x0 + sc.size) / cell))
        lo_y, hi_y = int(sc.y0 // cell), int(np.ceil((sc.y0 + sc.size) / cell))
        m[b, 0, lo_y:hi_y, lo_x:hi_x] = 1.0
    return m


def init_from_pipeline(family, pipe_dir: Path, models, tokenizers, partial: bool = False) -> int:
    """Load the exported (EMA) weights of a pipeline directory of ``family`` into
    the freshly built models (strict: the architecture must match).  Returns
    the step recorded in ``training_info.json`` (0 if absent).

    ``partial=True`` (architecture change, e.g. a new patch size) copies only
    the tensors whose name and shape match, prints the ones left at their fresh
    initialisation, and returns step 0 (a new run)."""
    family.init_from_pipeline(pipe_dir, models, tokenizers, partial=partial)
    info = pipe_dir / "training_info.json"
    if partial:
        return 0
    return int(json.loads(info.read_text()).get("step", 0)) if info.exists() else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=sorted(families.FAMILIES), default="pixart",
                    help="pixart: the shipped toy PixArt-alpha; flux: a toy FLUX.1 (families.py)")
    ap.add_argument("--steps", type=int, default=30000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--p-empty", type=float, default=0.1)
    ap.add_argument("--drop-prob", type=float, default=0.15)
    ap.add_argument("--pool", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=None,
                    help="transformer blocks (flux: double-stream blocks); default pixart 12, flux 4")
    ap.add_argument("--single-layers", type=int, default=8, help="flux: single-stream blocks")
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--loss-weight", choices=("eps", "v", "flow"), default=None,
                    help="pixart: eps (default; plain epsilon MSE) or v (weight (1 + 1/SNR) clipped at --max-weight, "
                         "i.e. the v-prediction loss, which stops high-noise steps (global layout, shape) being "
                         "ignored); flux: flow (the only one; velocity MSE)")
    ap.add_argument("--logit-mean", type=float, default=0.0,
                    help="flux: mean of the logit-normal timestep density (before FLUX's shift for 64 tokens); "
                         "> 0 puts more weight on high-noise steps")
    ap.add_argument("--logit-std", type=float, default=1.0, help="flux: std of the logit-normal timestep density")
    ap.add_argument("--max-weight", type=float, default=20.0)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--object-weight", type=float, default=0.0,
                    help="extra loss weight on the latent pixels the object's bounding box touches (0 = off): "
                         "the random background detail otherwise drowns the object's outline in the loss")
    ap.add_argument("--id-loss", type=float, default=0.0,
                    help="weight of an auxiliary loss that keeps word identity in the text encoder: a linear head "
                         "(not exported) must recover each token from its encoding (0 = off)")
    ap.add_argument("--random-positions", action="store_true",
                    help="objects at random positions, sizes 14-22 (the world of runs 1-5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vae", default=None,
                    help="VAE directory (default: <init-from>/vae with --init-from, else toy_training/runs/vae/model; "
                         "flux: toy_training/runs/flux/vae/model)")
    ap.add_argument("--out", default=None, help="default toy_training/runs/dit (flux: toy_training/runs/flux/dit)")
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--keep-every", type=int, default=5000)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-from", default=None, metavar="DIR",
                    help="warm-start transformer + text encoder (and EMA) from an exported PixArtAlphaPipeline "
                         "directory, e.g. src/ditloc/toy/model; fresh optimizer; step from DIR/training_info.json")
    ap.add_argument("--init-partial", action="store_true",
                    help="with --init-from: copy only tensors of matching shape (new architecture); step starts at 0")
    ap.add_argument("--bench", type=int, default=0, help="only time steps up to total step N (no checkpoint) and exit")
    args = ap.parse_args()
    family = families.get(args.family)
    if args.layers is None:
        args.layers = family.default_layers
    if args.loss_weight is None:
        args.loss_weight = family.default_loss_weight
    if args.loss_weight not in family.loss_weights:
        ap.error(f"--loss-weight {args.loss_weight} is not for --family {args.family} (one of {family.loss_weights})")
    if args.out is None:
        args.out = str(family.default_out)
    if args.vae is None:
        args.vae = str(Path(args.init_from) / "vae") if args.init_from else str(family.default_vae)

    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    scenes, latents = build_pool(args, out, vae)
    channels = vae.config.latent_channels
    del vae

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # unused by training, seeded so checkpoints are fully reproducible
    random.seed(args.seed)
    # models: the family's trainable modules in parameter order ("transformer" first)
    tokenizers, models = family.build(args, channels)
    id_encoder = models[family.id_encoder]
    id_vocab = len(tokenizers["tokenizer_2" if "tokenizer_2" in tokenizers else "tokenizer"])
    id_head = None
    if args.id_loss > 0:
        g = torch.Generator().manual_seed(args.seed + 11)
        id_head = torch.nn.Linear(id_encoder.config.d_model, id_vocab)
        with torch.no_grad():  # seeded, independent of the global RNG stream
            id_head.weight.normal_(0.0, id_encoder.config.d_model ** -0.5, generator=g)
            id_head.bias.zero_()
    params = [p for m in models.values() for p in m.parameters()]
    if id_head is not None:
        params += list(id_head.parameters())
    n_par = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    print(f"transformer {n_par['transformer']/1e6:.2f}M params, "
          + ", ".join(f"{k.replace('_', ' ')} {n/1e6:.2f}M" for k, n in n_par.items() if k != "transformer"),
          flush=True)
    ckpt_stem = out / "ckpt"
    resuming = args.resume and common.state_exists(ckpt_stem)
    init_step = 0
    if args.init_from and not resuming:
        init_step = init_from_pipeline(family, Path(args.init_from), models, tokenizers, partial=args.init_partial)
        print(f"initialised from {args.init_from} (exported at step {init_step})", flush=True)
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in models.items()}
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))

    # a warm start draws fresh data / noise streams (not a replay of steps 0..)
    data_rng = np.random.default_rng([args.seed, 2] + ([init_step] if init_step else []))
    gen = torch.Generator().manual_seed(args.seed + 3 + 1_000_003 * init_step)
    step = init_step
    opt_start = init_step  # step at which the current optimizer (and its warmup) began
    init_from = {"dir": str(args.init_from), "step": init_step, "partial": args.init_partial} if args.init_from else None
    if resuming:
        ck = common.load_dit_ckpt(ckpt_stem, opt=opt)
        for k, m in models.items():
            m.load_state_dict(ck[k])
        if id_head is not None:
            if "id_head" not in ck:
                raise SystemExit(f"{ckpt_stem}: checkpoint has no id_head; it was made without --id-loss")
            id_head.load_state_dict(ck["id_head"])
        for k, m in ema.items():
            m.load_state_dict(ck["ema_" + k])
        opt.load_state_dict(ck["opt"])
        data_rng.bit_generator.state = ck["data_rng"]
        gen.set_state(ck["gen"])
        common.set_rng_state(ck["rng"])
        step = ck["step"]
        opt_start = ck.get("opt_start_step", 0)
        init_from = ck.get("init_from")
        print(f"resumed from step {step}", flush=True)
    elif args.resume:
        print("no checkpoint found; starting " + ("from --init-from" if args.init_from else "fresh"), flush=True)

    def lr_at(s):
        return args.lr * min(1.0, (s - opt_start + 1) / args.warmup)

    def save(step):
        ck = {
            "step": step,
            "opt_start_step": opt_start,
            "init_from": init_from,
            "args": vars(args),
            **{k: m.state_dict() for k, m in models.items()},
            **{"ema_" + k: m.state_dict() for k, m in ema.items()},
            **({"id_head": id_head.state_dict()} if id_head is not None else {}),
            "opt": opt.state_dict(),
            "data_rng": data_rng.bit_generator.state,
            "gen": gen.get_state(),
            "rng": common.rng_state(),
            **{k + "_config": families._config_dict(m) for k, m in models.items()},
            "wall_time": time.time(),
        }
        common.save_dit_ckpt(ck, ckpt_stem)
        if step % args.keep_every == 0:
            common.save_dit_ckpt(
                {k: ck[k] for k in ("step", "opt_start_step", "init_from", "args")
                 + tuple("ema_" + m for m in models) + tuple(m + "_config" for m in models)},
                out / f"ema_{step}",
            )

    for m in models.values():
        m.train()
    ema_params = [p for m in ema.values() for p in m.parameters()]
    live_params = [p for m in models.values() for p in m.parameters()]
    t0 = time.time()
    s0 = step
    loss_acc, n_acc = 0.0, 0
    id_loss_sum = 0.0
    n_pool = len(scenes)
    while step < (args.bench or args.steps):
        idx = data_rng.integers(n_pool, size=args.batch)
        prompts = [world.make_prompt(scenes[i], data_rng, "train", args.drop_prob) for i in idx]
        empty = data_rng.random(args.batch) < args.p_empty
        prompts = ["" if e else p for p, e in zip(prompts, empty)]
        tok = family.text_inputs(prompts)
        x0 = latents[torch.from_numpy(idx)]
        xt, st = family.noise(x0, gen)

        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        # pred, the loss weight per sample, and the id-loss encodings (prompt tokens) with their ids
        pred, w, id_emb, id_ids = family.forward(models, tok, xt, st)
        if args.object_weight:
            w = w * (1 + args.object_weight * object_masks(scenes, idx, x0.shape[-1]))
        loss = (w * (pred - st["target"]) ** 2).mean() / w.mean()
        if id_head is not None:
            id_loss = torch.nn.functional.cross_entropy(id_head(id_emb), id_ids)
            loss_total = loss + args.id_loss * id_loss
        else:
            loss_total = loss
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, live_params, 1 - d)

        loss_acc += loss.item()
        if id_head is not None:
            id_loss_sum += id_loss.item()
        n_acc += 1
        if step % args.log_every == 0 or step == s0 + 1:
            el = time.time() - t0
            print(
                f"step {step} loss {loss_acc / n_acc:.4f} lr {lr_at(step - 1):.2e} "
                f"{(step - s0) / el:.2f} steps/s elapsed {el:.0f}s"
                + (f" id_loss {id_loss_sum / n_acc:.3f}" if id_head is not None else ""),
                flush=True,
            )
            loss_acc, n_acc = 0.0, 0
            id_loss_sum = 0.0
        if not args.bench and (step % args.ckpt_every == 0 or step == args.steps):
            save(step)
    if args.bench:
        el = time.time() - t0
        print(f"BENCH {step - s0} steps {(step - s0) / el:.2f} steps/s", flush=True)
    else:
        json.dump({"step": step, "done": step >= args.steps}, open(out / "status.json", "w"))
        print("done", flush=True)


if __name__ == "__main__":
    main()
