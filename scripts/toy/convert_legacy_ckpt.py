"""ONE-OFF converter: legacy pickled DiT checkpoint / pool cache (``*.pt``)
-> the safetensors + JSON format used by train_dit.py / export_pipeline.py.

#########################################################################
#  WARNING: this script UNPICKLES its input (torch.load(weights_only=False)),
#  which can execute arbitrary code.  It exists only to read OUR OWN legacy
#  files written by the old scripts/toy/train_dit.py on this machine
#  (toy_training/runs/dit/ckpt.pt, ema_<step>.pt, pool_*.pt).  weights_only=True
#  cannot read them because they contain numpy arrays (np.random.get_state()
#  and the Scene objects of the pool cache).
#  NEVER run it on a downloaded or otherwise foreign file.  It is meant to be
#  run once, by hand, by the project owner; nothing imports it.
#########################################################################

Usage (after the old training job has stopped or between two of its saves):

    python scripts/toy/convert_legacy_ckpt.py toy_training/runs/dit/ckpt.pt
        # -> toy_training/runs/dit/ckpt.safetensors + ckpt.json (resumable with --resume)
    python scripts/toy/convert_legacy_ckpt.py toy_training/runs/dit/pool_100000_seed0_c8_sf0.91592.pt
        # -> pool_...safetensors + .json (the latent cache; avoids re-encoding)
    python scripts/toy/convert_legacy_ckpt.py OLD.pt --out-stem /tmp/x   # -> /tmp/x.{safetensors,json}

The legacy .pt files are left in place (delete them by hand once converted).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import common


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("legacy", nargs="+", help="legacy .pt files written by the old train_dit.py")
    ap.add_argument("--out-stem", default=None, help="output stem (only with a single input); default: input minus .pt")
    args = ap.parse_args()
    if args.out_stem and len(args.legacy) != 1:
        ap.error("--out-stem needs exactly one input")
    for src in map(Path, args.legacy):
        stem = Path(args.out_stem) if args.out_stem else src.with_suffix("")
        # Trusted input only -- see the warning above.
        obj = torch.load(src, weights_only=False, map_location="cpu")
        if "scenes" in obj:  # pool cache {"scenes": [Scene], "latents": Tensor}
            common.save_state(stem, {"latents": obj["latents"].contiguous()},
                              {"scenes": [s.to_dict() for s in obj["scenes"]]})
            print(f"{src} -> {stem}.{{safetensors,json}} ({len(obj['scenes'])} scenes)")
        else:  # training checkpoint or EMA-only copy
            common.save_dit_ckpt(obj, stem)
            # read back and compare, so a bad conversion is caught now
            back = common.load_dit_ckpt(stem, models=[m for m in common._MODELS if m in obj])
            for m in common._MODELS:
                if m in obj:
                    assert all(torch.equal(obj[m][k], back[m][k]) for k in obj[m]), m
            assert back["step"] == obj["step"] and back.get("data_rng", None) == obj.get("data_rng", None)
            print(f"{src} (step {obj['step']}) -> {stem}.{{safetensors,json}}")


if __name__ == "__main__":
    main()
