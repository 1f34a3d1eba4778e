"""Export the EMA weights of a DiT checkpoint as a diffusers PixArtAlphaPipeline.

    python scripts/toy/export_pipeline.py                       # latest ckpt -> src/ditloc/toy/model
    python scripts/toy/export_pipeline.py --ckpt toy_training/runs/dit/ema_10000.pt --out /tmp/m

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

    ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    tokenizer = common.build_tokenizer()
    te = T5EncoderModel(T5Config.from_dict(ck["text_encoder_config"]))
    te.load_state_dict(ck["ema_text_encoder"])
    tcfg = {k: v for k, v in ck["transformer_config"].items() if not k.startswith("_")}
    tr = PixArtTransformer2DModel(**tcfg)
    tr.load_state_dict(ck["ema_transformer"])
    vae = AutoencoderKL.from_pretrained(vae_dir)
    sched = DPMSolverMultistepScheduler(**common.scheduler_config())
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=te.eval(), vae=vae.eval(),
                               transformer=tr.eval(), scheduler=sched)
    return pipe, ck


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=str(common.RUNS / "dit" / "ckpt.pt"))
    ap.add_argument("--vae", default=str(common.RUNS / "vae" / "model"))
    ap.add_argument("--out", default=str(common.MODEL_DIR))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe, ck = build_pipeline(args.ckpt, args.vae)
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
        "args": ck["args"],
        "safetensors_bytes": total,
        "exported_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "note": args.note,
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=1))
    if keep is not None:
        prov.write_text(keep)
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
    common.save_grid((imgs * 255).round().astype(np.uint8), out.parent / "_export_check.png", ncol=4)


if __name__ == "__main__":
    main()
