"""Attribute oracle for the toy world: a small multi-head CNN that reads the
shape, color, style, place, character and hazard of a 32x32 image.

    from ditloc.toy.oracle import load_oracle
    oracle = load_oracle()
    res = oracle.classify(images)      # uint8 [N,32,32,3] array or list of PIL images
    res.labels["color"]                # list of N strings
    res.probs["color"]                 # float array [N, n_colors] (order: oracle.classes["color"])

Weights ship in ``ditloc/toy/oracle/oracle.safetensors`` (trained by
``scripts/toy/train_oracle.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from torch import nn

from . import world

ORACLE_DIR = Path(__file__).resolve().parent / "oracle"


def default_classes() -> dict[str, list[str]]:
    """Output classes per head (order = logit index)."""
    c = world.CATEGORIES
    return {
        "shape": list(c["shape"]),
        "color": list(c["color"]),
        "style": list(c["style"]),
        "place": list(c["place"]),
        "character": ["none"] + list(c["character"]),
        "hazard": ["absent", "present"],
    }


def scene_targets(scene: world.Scene, classes: dict[str, list[str]]) -> dict[str, int]:
    lab = scene.labels()
    return {k: classes[k].index(lab[k]) for k in classes}


def _block(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class OracleNet(nn.Module):
    """Multi-head CNN. Input: float [N,3,32,32] in [-1, 1]."""

    def __init__(self, classes: dict[str, list[str]] | None = None, width: int = 32):
        super().__init__()
        self.classes = classes or default_classes()
        w = width
        self.features = nn.Sequential(
            _block(3, w), _block(w, w), nn.MaxPool2d(2),  # 16
            _block(w, 2 * w), _block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8
            _block(2 * w, 4 * w), nn.MaxPool2d(2),  # 4
        )
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.ReLU(inplace=True),
                                   nn.Dropout(0.1))
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in self.classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.features(x))
        return {k: head(h) for k, head in self.heads.items()}


ImageInput = Union[np.ndarray, Sequence]


def to_tensor(images: ImageInput) -> torch.Tensor:
    """uint8 [N,32,32,3] array / float [0,1] array / list of PIL images -> float [N,3,32,32] in [-1,1]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        arrs = []
        for im in images:
            if hasattr(im, "convert"):
                im = im.convert("RGB")
                if im.size != (32, 32):
                    from PIL import Image

                    im = im.resize((32, 32), Image.BICUBIC)
                arrs.append(np.asarray(im, dtype=np.uint8))
            else:
                arrs.append(np.asarray(im))
        images = np.stack(arrs)
    if images.ndim == 3:
        images = images[None]
    if images.dtype == np.uint8:
        x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
    else:  # float in [0, 1]
        x = torch.from_numpy(images.astype(np.float32) * 2.0 - 1.0)
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    return x.contiguous()


@dataclass
class OracleResult:
    labels: dict[str, list[str]]
    probs: dict[str, np.ndarray]

    def __len__(self):
        return len(next(iter(self.labels.values())))

    def row(self, i: int) -> dict[str, str]:
        return {k: v[i] for k, v in self.labels.items()}


class Oracle:
    def __init__(self, net: OracleNet):
        self.net = net.eval()
        self.classes = net.classes

    @torch.no_grad()
    def classify(self, images: ImageInput, batch_size: int = 256) -> OracleResult:
        x = to_tensor(images)
        probs = {k: [] for k in self.classes}
        for i in range(0, len(x), batch_size):
            out = self.net(x[i : i + batch_size])
            for k, v in out.items():
                probs[k].append(v.softmax(-1).numpy())
        probs = {k: np.concatenate(v) if v else np.zeros((0, len(self.classes[k]))) for k, v in probs.items()}
        labels = {k: [self.classes[k][j] for j in p.argmax(-1)] for k, p in probs.items()}
        return OracleResult(labels, probs)

    __call__ = classify


def save_oracle(net: OracleNet, directory: Path | str = ORACLE_DIR, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "oracle.safetensors"))
    cfg = {"classes": net.classes, "width": net.features[0][0].out_channels}
    if extra:
        cfg.update(extra)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))


def load_oracle(directory: Path | str = ORACLE_DIR) -> Oracle:
    """Load the shipped oracle (CPU)."""
    from safetensors.torch import load_file

    d = Path(directory)
    cfg = json.loads((d / "config.json").read_text())
    net = OracleNet(cfg["classes"], width=cfg.get("width", 32))
    net.load_state_dict(load_file(str(d / "oracle.safetensors")))
    return Oracle(net)
