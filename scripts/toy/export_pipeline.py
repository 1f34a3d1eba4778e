"""Export the EMA weights of a DiT checkpoint as a diffusers pipeline
(PixArtAlphaPipeline, or FluxPipeline for ``train_dit.py --family flux``
checkpoints; the family is read from the checkpoint, see ``families.py``).

    python scripts/toy/export_pipeline.py                       # latest ckpt -> src/ditloc/toy/model
    python scripts/toy/export_pipeline.py --ckpt toy_training/runs/dit/ema_10000.safetensors --out /tmp/m
    python scripts/toy/export_pipeline.py --ckpt toy_training/runs/flux/dit/ckpt.safetensors \
        --log toy_training/runs/flux/dit/log.txt     # -> toy_training/runs/flux/export

Reads the safetensors + JSON checkpoints written by train_dit.py (``--ckpt``
may name ``X.safetensors``, ``X.json`` or the stem ``X``).  Pickled checkpoints
are not read.

Verifies that the directory loads offline and generates 32x32 images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import common
import families


def build_pipeline(ckpt_path, vae_dir):
    from diffusers import AutoencoderKL

    ck = common.load_dit_ckpt(ckpt_path, models=("ema_transformer", "ema_text_encoder", "ema_text_encoder_2"))
    family = families.get(families.family_of_ckpt(ck))
    if vae_dir is None:  # the VAE the DiT was trained with (e.g. <init-from>/vae in a fresh checkout)
        vae_dir = ck["args"].get("vae") or str(family.default_vae)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    ck["vae_dir"] = vae_dir
    return family.build_pipeline(ck, vae), ck


def _train_log_stats(log_path, step):
    """(last logged loss <= step, summed training wall seconds over run segments)."""
    import re

    loss, wall, seg_max = None, 0.0, 0.0
    try:
        lines = Path(log_path).read_text().splitlines()
    except OSError:
        return None, None
    for ln in lines:
        if ln.startswith("resumed from step") or ln.startswith("transformer "):
            wall += seg_max
            seg_max = 0.0
        m = re.match(r"step (\d+) loss ([0-9.]+) .* elapsed (\d+)s", ln)
        if m and int(m.group(1)) <= step:
            loss = float(m.group(2))
            seg_max = float(m.group(3))
    return loss, wall + seg_max


def provenance(ck, total_bytes, args) -> str:
    import platform
    import subprocess

    a = ck["args"]
    loss, wall = _train_log_stats(args.log, ck["step"])
    try:
        cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    except Exception:
        cpu = platform.processor()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=common.REPO).stdout.strip()
    except Exception:
        commit = "?"
    init = ck.get("init_from")
    warm = (f"| warm start | from `{init['dir']}` (exported at step {init['step']}), fresh optimizer |\n"
            if init else "")
    vae_sum = Path(args.vae).parent / "summary.json"
    vae_info = json.loads(vae_sum.read_text()) if vae_sum.exists() else {}
    return f"""# Provenance of the toy PixArt-alpha pipeline

Trained from scratch by the ditloc project on procedurally rendered images of the
toy world (`ditloc.toy.world`); no external data or weights.

| item | value |
|---|---|
| transformer | PixArtTransformer2DModel, {ck['transformer_config']['num_layers']} blocks, width {ck['transformer_config']['num_attention_heads'] * ck['transformer_config']['attention_head_dim']}, patch {ck['transformer_config']['patch_size']}, latent 8x8x{ck['transformer_config']['in_channels']} |
| text encoder | T5EncoderModel (2 layers, d_model 128), word-level tokenizer over the toy vocabulary |
| VAE | AutoencoderKL 32x32x3 <-> 8x8x{ck['transformer_config']['in_channels']}, trained on renders ({vae_info.get('steps', '?')} steps, eval L1 {vae_info.get('eval_l1', float('nan')):.4f}) |
| DiT training steps | {ck['step']} (batch {a['batch']}, lr {a['lr']}, EMA {a['ema']}, {a['p_empty']:.0%} empty captions) |
{warm}| seed | {a['seed']} (scene pool {a['pool']} scenes) |
| last logged training loss | {loss} |
| DiT training wall time | {wall / 3600 if wall else float('nan'):.2f} h |
| hardware | {cpu}, {a['threads']} CPU threads, no GPU |
| weights exported | EMA transformer + EMA text encoder |
| safetensors total | {total_bytes / 1e6:.2f} MB |
| code commit at export | {commit} |
| exported | {time.strftime('%Y-%m-%d %H:%M:%S')} |

Reproduce (`--steps` is the total step count):

```
# VAE
python scripts/toy/train_vae.py --steps 1800 --batch 32 --lr 1e-3 --threads 1 --out toy_training/runs/vae
# 1) fresh DiT training
python scripts/toy/train_dit.py --steps {a['steps']} --threads {a['threads']}
# 2) resume an interrupted run on the same machine (bit-exact; reads toy_training/runs/dit/ckpt.{{safetensors,json}})
python scripts/toy/train_dit.py --steps {a['steps']} --threads {a['threads']} --resume
# 3) continue in a fresh checkout (toy_training/runs/ is git-ignored): warm start from this
#    directory (weights = exported EMA, VAE = ./vae, step counter from training_info.json,
#    fresh optimizer with warmup); add --resume if that run is interrupted
python scripts/toy/train_dit.py --steps <total> --threads {a['threads']} --init-from src/ditloc/toy/model
# export (EMA weights) -> src/ditloc/toy/model
python scripts/toy/export_pipeline.py --ckpt toy_training/runs/dit/ckpt.safetensors
```

Inference: `PixArtAlphaPipeline.from_pretrained(dir)(prompt, height=32, width=32,
num_inference_steps=20, use_resolution_binning=False, clean_caption=False)`.
Padding tokens are masked, so any `max_sequence_length` >= the prompt length
gives identical results (32 is enough and faster than the default 120).
{('Note: ' + args.note) if args.note else ''}
"""


def provenance_flux(ck, total_bytes, args) -> str:
    import platform

    a = ck["args"]
    tc = ck["transformer_config"]
    loss, wall = _train_log_stats(args.log, ck["step"])
    try:
        cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    except Exception:
        cpu = platform.processor()
    vae_sum = Path(args.vae).parent / "summary.json"
    vae_info = json.loads(vae_sum.read_text()) if vae_sum.exists() else {}
    return f"""# Provenance of the toy FLUX pipeline (draft written by export_pipeline.py)

Trained from scratch by the ditloc project on procedurally rendered images of the toy world; no external data
or weights.  How it was trained: `scripts/toy/FLUX_TRAINING.md`.

| item | value |
|---|---|
| transformer | FluxTransformer2DModel, {tc['num_layers']} double-stream + {tc['num_single_layers']} single-stream blocks, {tc['num_attention_heads']} heads x {tc['attention_head_dim']}, RoPE axes {tuple(tc['axes_dims_rope'])}, guidance_embeds {tc['guidance_embeds']} |
| text encoders | T5EncoderModel (text_encoder_2, toy tokenizer) + CLIPTextModel (text_encoder, pooled output) |
| VAE | AutoencoderKL 32x32x3 <-> 16x16x{tc['in_channels'] // 4} ({vae_info.get('steps', '?')} steps, eval L1 {vae_info.get('eval_l1', float('nan')):.4f}) |
| training | rectified flow (velocity target), shifted logit-normal timesteps (mean {a.get('logit_mean')}, std {a.get('logit_std')}), {ck['step']} steps, batch {a['batch']}, lr {a['lr']}, EMA {a['ema']}, {a['p_empty']:.0%} empty captions, object weight {a['object_weight']}, id loss {a['id_loss']} |
| seed | {a['seed']} (scene pool {a['pool']} scenes) |
| last logged training loss | {loss} |
| DiT training wall time | {wall / 3600 if wall else float('nan'):.2f} h |
| hardware | {cpu}, {a['threads']} CPU threads, no GPU |
| safetensors total | {total_bytes / 1e6:.2f} MB |
| exported | {time.strftime('%Y-%m-%d %H:%M:%S')} |

Inference: `FluxPipeline.from_pretrained(dir)(prompt, height=32, width=32, num_inference_steps=20,
true_cfg_scale={families.FLUX_CFG}, negative_prompt="", max_sequence_length={common.MAX_LEN})`.
FluxPipeline runs T5 without an attention mask, so the model was trained with prompts padded to exactly
{common.MAX_LEN} tokens: pass `max_sequence_length={common.MAX_LEN}`.
{('Note: ' + args.note) if args.note else ''}
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=str(common.RUNS / "dit" / "ckpt.safetensors"))
    ap.add_argument("--vae", default=None, help="VAE directory (default: the one recorded in the checkpoint's args)")
    ap.add_argument("--out", default=None,
                    help="default src/ditloc/toy/model (pixart), toy_training/runs/flux/export (flux)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="")
    ap.add_argument("--keep-provenance", action="store_true", help="do not regenerate PROVENANCE.md")
    ap.add_argument("--log", default=None, help="training log (default: <family's run dir>/log.txt)")
    ap.add_argument("--check-png", default=str(common.RUNS / "export_check.png"),
                    help="where to save the generation check grid")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe, ck = build_pipeline(args.ckpt, args.vae)
    args.vae = ck.pop("vae_dir")
    family = families.get(families.family_of_ckpt(ck))
    if args.out is None:
        args.out = str(common.MODEL_DIR if family.name == "pixart" else common.RUNS / "flux" / "export")
    if args.log is None:
        args.log = str(family.default_out / "log.txt")
    out = Path(args.out)
    prov = out / "PROVENANCE.md"
    keep = prov.read_text() if prov.exists() else None
    if out.exists():
        for p in out.iterdir():
            if p.name != "PROVENANCE.md":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    # the key by which ditloc knows the model, kept by copies and re-saves (ditloc.registry)
    pipe.transformer.register_to_config(_ditloc_model="toy" if family.name == "pixart" else "toy-flux")
    pipe.save_pretrained(out, safe_serialization=True)
    total = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    info = {
        "step": ck["step"],
        "init_from": ck.get("init_from"),
        "args": ck["args"],
        "safetensors_bytes": total,
        "exported_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "note": args.note,
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=1))
    if keep is not None and args.keep_provenance:
        prov.write_text(keep)
    else:
        prov.write_text((provenance if family.name == "pixart" else provenance_flux)(ck, total, args))
    print(f"exported step {ck['step']} -> {out} ({total/1e6:.2f} MB safetensors)")

    # offline load + generation check
    os.environ["HF_HUB_OFFLINE"] = "1"
    p2 = type(pipe).from_pretrained(out, local_files_only=True)
    assert type(p2) is type(pipe), (type(p2), type(pipe))
    p2.set_progress_bar_config(disable=True)
    prompts = ["a red striped circle on the beach", "a zibbit in the snow",
               "a blue checkered star at night with a hazard sign", "a yellow outlined square in the forest"]
    t0 = time.time()
    imgs = family.sample(p2, prompts, torch.Generator().manual_seed(0))
    print(f"generated {imgs.shape} in {time.time()-t0:.1f}s")
    assert imgs.shape == (4, 32, 32, 3)
    Path(args.check_png).parent.mkdir(parents=True, exist_ok=True)
    common.save_grid((imgs * 255).round().astype(np.uint8), args.check_png, ncol=4)


if __name__ == "__main__":
    main()
