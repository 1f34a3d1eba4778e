"""Crash-consistent state files: one ``<stem>.safetensors`` holding the tensors
and, in its header, the JSON metadata. It is replaced atomically, so after a kill
at any instant the previous state or the new one is there, complete. A
``<stem>.json`` copy of the metadata is written after it for people and tools to
read; it is never needed to resume. Nothing is pickled or unpickled. Used for
resumable training checkpoints (toy-model scripts, ``ditloc.edit``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ._io import write_atomic

FORMAT = "ditloc-state-v1"


def _paths(stem) -> tuple[Path, Path]:
    stem = Path(stem)
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_state(stem, tensors: dict, meta: dict, fmt: str = FORMAT):
    """Write ``<stem>.safetensors`` (tensors + metadata, atomically), then the
    informational ``<stem>.json``."""
    from safetensors.torch import save_file

    tensor_path, json_path = _paths(stem)
    # clone: safetensors refuses shared storage (e.g. T5's tied embeddings)
    flat = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    meta = dict(meta, format=fmt)
    text = json.dumps(meta, indent=1, allow_nan=False)  # fails before touching files
    write_atomic(tensor_path, lambda t: save_file(flat, str(t), metadata={"format": fmt, "meta": text}))
    write_atomic(json_path, text)


def state_exists(stem) -> bool:
    tensor_path, json_path = _paths(stem)
    if not tensor_path.exists():
        return False
    return _header(tensor_path).get("meta") is not None or json_path.exists()  # older saves: a pair


def _header(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.metadata() or {}


def load_state(stem, prefixes=None, fmt: str = FORMAT):
    """Inverse of :func:`save_state` -> ``(tensors, meta)``.  ``prefixes``: only
    load tensors whose names start with one of these. Also reads the older
    two-file saves (tensors + ``.json`` tied by a token)."""
    from safetensors import safe_open

    tensor_path, json_path = _paths(stem)
    tensors = {}
    with safe_open(str(tensor_path), framework="pt", device="cpu") as f:
        hdr = f.metadata() or {}
        if hdr.get("format") != fmt:
            raise ValueError(f"{stem}: not a {fmt} checkpoint")
        if "meta" in hdr:
            meta = json.loads(hdr["meta"])
        else:  # an older two-file save
            meta = json.loads(json_path.read_text())
            if meta.get("format") != fmt:
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


