"""MODEL on the command line: a toy model (`toy`, `toy-flux`), a local pipeline directory or a hub id.
`load_pipeline` is the one place the commands load a model (tests replace it here to prove a check fires before
any load)."""

from __future__ import annotations

import os
from pathlib import Path


def is_toy(model: str) -> bool:
    """MODEL names a toy model (its oracle, probe set and sampling settings are built in)."""
    from ..toy import TOY_MODELS

    return model in TOY_MODELS


def load_pipeline(model: str, *, device: str | None = None, dtype: str | None = None):
    """A diffusers pipeline from a toy model's name, a local directory or a hub id (offline works from the
    cache)."""
    import torch

    from ..errors import DitlocError

    torch_dtype = getattr(torch, dtype) if dtype else None
    if is_toy(model):
        from ..toy import load_pipeline as load_toy

        pipe = load_toy(model, torch_dtype=torch_dtype)
    else:
        from diffusers import DiffusionPipeline

        path = Path(model).expanduser()
        looks_local = _is_local(model)
        if looks_local and not path.is_dir():
            raise DitlocError(f"model directory {model!r} does not exist; give a diffusers pipeline directory, a hub id, "
                              "'toy' or 'toy-flux'")
        try:
            kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
            pipe = DiffusionPipeline.from_pretrained(str(path) if looks_local else model, **kwargs)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = " (offline: download it first or point to a local directory)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise DitlocError(f"cannot load pipeline {model!r}: {first}{hint}") from None
    pipe.set_progress_bar_config(disable=True)  # ditloc prints its own progress
    if device:
        try:
            pipe = pipe.to(device)
        except (RuntimeError, AssertionError) as e:
            raise DitlocError(f"cannot move the pipeline to device {device!r}: {str(e).splitlines()[0]}") from None
    return pipe


def transformer_class(model: str) -> str | None:
    """The transformer class MODEL declares in its model_index.json, read without loading the model
    (a hub id: from the local cache only, never the network); None where it cannot be read."""
    import json

    model = _toy_dir(model)
    try:
        if _is_local(model):
            index = json.loads((Path(model).expanduser() / "model_index.json").read_text(encoding="utf-8"))
        else:
            import warnings

            from diffusers import DiffusionPipeline

            with warnings.catch_warnings():  # huggingface_hub's deprecation notes would break the one error line
                warnings.simplefilter("ignore")
                index = DiffusionPipeline.load_config(model, local_files_only=True)
    except (OSError, ValueError):  # no such directory or file, not cached, not JSON: known after loading
        return None
    entry = index.get("transformer") if isinstance(index, dict) else None  # ["diffusers", "<class name>"]
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None


def count_blocks(model: str) -> int | None:
    """Blocks of MODEL's transformer from its config, without loading weights (None where unreadable)."""
    import json

    try:
        config = json.loads((Path(_toy_dir(model)).expanduser() / "transformer" / "config.json")
                            .read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    n = config.get("num_layers")
    return int(n) + int(config.get("num_single_layers") or 0) if isinstance(n, int) else None


def _toy_dir(model: str) -> str:
    """A toy model's name as its directory; any other MODEL as given."""
    if not is_toy(model):
        return model
    from ..toy import model_dir

    return str(model_dir(model))


def _is_local(model: str) -> bool:
    """MODEL names a directory (not a hub id `owner/name`)."""
    return Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or model.count("/") != 1
