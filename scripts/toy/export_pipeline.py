"""Export the EMA weights of a DiT checkpoint as a diffusers PixArtAlphaPipeline.

    python scripts/toy/export_pipeline.py                       # latest ckpt -> src/ditloc/toy/model
    python scripts/toy/export_pipeline.py --ckpt toy_training/runs/dit/ema_10000.safetensors --out /tmp/m

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


def build_pipeline(ckpt_path, vae_dir):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline
    from transformers import T5Config, T5EncoderModel
    from diffusers import PixArtTransformer2DModel

    ck = common.load_dit_ckpt(ckpt_path, models=("ema_transformer", "ema_text_encoder"))
    tokenizer = common.build_tokenizer()
    te = T5EncoderModel(T5Config.from_dict(ck["text_encoder_config"]))
    te.load_state_dict(ck["ema_text_encoder"])
    tcfg = {k: v for k, v in ck["transformer_config"].items() if not k.startswith("_")}
    tr = PixArtTransformer2DModel(**tcfg)
    tr.load_state_dict(ck["ema_transformer"])
    if vae_dir is None:  # the VAE the DiT was trained with (e.g. <init-from>/vae in a fresh checkout)
        vae_dir = ck["args"].get("vae") or str(common.RUNS / "vae" / "model")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    ck["vae_dir"] = vae_dir
    sched = DPMSolverMultistepScheduler(**common.scheduler_config())
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=te.eval(), vae=vae.eval(),
                               transformer=tr.eval(), scheduler=sched)
    return pipe, ck


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=str(common.RUNS / "dit" / "ckpt.safetensors"))
    ap.add_argument("--vae", default=None, help="VAE directory (default: the one recorded in the checkpoint's args)")
    ap.add_argument("--out", default=str(common.MODEL_DIR))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="")
    ap.add_argument("--keep-provenance", action="store_true", help="do not regenerate PROVENANCE.md")
    ap.add_argument("--log", default=str(common.RUNS / "dit" / "log.txt"))
    ap.add_argument("--check-png", default=str(common.RUNS / "export_check.png"),
                    help="where to save the generation check grid")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe, ck = build_pipeline(args.ckpt, args.vae)
    args.vae = ck.pop("vae_dir")
    out = Path(args.out)
    prov = out / "PROVENANCE.md"
    keep = prov.read_text() if prov.exists() else None
    if out.exists():
        for p in out.iterdir():
            if p.name != "PROVENANCE.md":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
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
        prov.write_text(provenance(ck, total, args))
    print(f"exported step {ck['step']} -> {out} ({total/1e6:.2f} MB safetensors)")

    # offline load + generation check
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import PixArtAlphaPipeline

    p2 = PixArtAlphaPipeline.from_pretrained(out)
    p2.set_progress_bar_config(disable=True)
    prompts = ["a red striped circle on the beach", "a zibbit in the snow",
               "a blue checkered star at night with a hazard sign", "a yellow outlined square in the forest"]
    t0 = time.time()
    imgs = p2(prompts, num_inference_steps=20, height=32, width=32, use_resolution_binning=False,
              generator=torch.Generator().manual_seed(0), output_type="np").images
    print(f"generated {imgs.shape} in {time.time()-t0:.1f}s")
    assert imgs.shape == (4, 32, 32, 3)
    Path(args.check_png).parent.mkdir(parents=True, exist_ok=True)
    common.save_grid((imgs * 255).round().astype(np.uint8), args.check_png, ncol=4)


if __name__ == "__main__":
    main()
