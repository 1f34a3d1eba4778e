"""Atomic tensor + JSON state files: tensors in ``<stem>.safetensors``, everything
else in a ``<stem>.json`` sidecar.  Nothing is pickled or unpickled.  Used for
resumable training checkpoints (toy-model scripts, ``ditloc.edit``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ._io import write_atomic

FORMAT = "ditloc-state-v1"


def save_state(stem, tensors: dict, meta: dict, fmt: str = FORMAT):
    """Write ``<stem>.safetensors`` (tensors) and ``<stem>.json`` (meta).

    Both files are written to temporaries first and moved into place with
    ``os.replace``.  A random token stored in both ties the pair together, so
    :func:`load_state` detects a torn pair (crash between the two renames).
    """
    import uuid

    from safetensors.torch import save_file

    stem = Path(stem)
    token = uuid.uuid4().hex
    # clone: safetensors refuses shared storage (e.g. T5's tied embeddings)
    flat = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    meta = dict(meta, format=fmt, token=token)
    text = json.dumps(meta, indent=1, allow_nan=False)  # fails before touching files
    write_atomic(stem.with_name(stem.name + ".safetensors"), lambda t: save_file(flat, str(t), metadata={"format": fmt, "token": token}))
    write_atomic(stem.with_name(stem.name + ".json"), text)


def state_exists(stem) -> bool:
    stem = Path(stem)
    return stem.with_name(stem.name + ".safetensors").exists() and stem.with_name(stem.name + ".json").exists()


def load_state(stem, prefixes=None, fmt: str = FORMAT):
    """Inverse of :func:`save_state` -> ``(tensors, meta)``.  ``prefixes``: only
    load tensors whose names start with one of these."""
    from safetensors import safe_open

    stem = Path(stem)
    meta = json.loads(stem.with_name(stem.name + ".json").read_text())
    tensors = {}
    with safe_open(str(stem.with_name(stem.name + ".safetensors")), framework="pt", device="cpu") as f:
        hdr = f.metadata() or {}
        if hdr.get("format") != fmt or meta.get("format") != fmt:
            raise ValueError(f"{stem}: not a {fmt} checkpoint")
        if hdr.get("token") != meta.get("token"):
            raise ValueError(f"{stem}: .safetensors and .json are from different saves (torn write)")
        for k in f.keys():
            if prefixes is None or k.startswith(tuple(prefixes)):
                tensors[k] = f.get_tensor(k)
    return tensors, meta


def stem_of(path) -> Path:
    """``x.safetensors`` / ``x.json`` / ``x`` -> ``x``."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def _sub(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def flatten_optimizer(sd: dict):
    """Optimizer ``state_dict`` -> (``opt.<param_index>.<name>`` tensors, JSON meta)."""
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{name}"] = v
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict, meta: dict, opt) -> dict:
    state: dict = {}
    for k, v in _sub(tensors, "opt.").items():
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for k, v in meta["scalars"].items():
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = []
    for g, cur in zip(meta["param_groups"], opt.param_groups):
        # JSON turned tuples (e.g. betas) into lists; restore the live types
        groups.append({k: tuple(v) if isinstance(cur.get(k), tuple) else v for k, v in g.items()})
    if len(groups) != len(opt.param_groups):
        raise ValueError("optimizer param_groups mismatch")
    return {"state": state, "param_groups": groups}


