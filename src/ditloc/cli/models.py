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


def load_pipeline(model: str, *, device: str | None = None, dtype: str | None = None, variant: str | None = None,
                  revision: str | None = None):
    """A diffusers pipeline from a toy model's name, a local directory or a hub id (offline works from the
    cache). `variant` (e.g. "fp16": the weight files ``*.fp16.safetensors``) and `revision` (a hub branch,
    tag or commit) are diffusers' own `from_pretrained` arguments (`check_source` refuses them for a toy)."""
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
            given = {"torch_dtype": torch_dtype, "variant": variant, "revision": revision}
            kwargs = {k: v for k, v in given.items() if v is not None}
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


def check_source(model: str, variant: str | None, revision: str | None) -> None:
    """--variant / --revision against MODEL, before it loads: a toy model has one set of files, and a
    local directory no revisions."""
    from ..errors import DitlocError

    given = [flag for flag, value in (("--variant", variant), ("--revision", revision)) if value is not None]
    if given and is_toy(model):
        raise DitlocError(f"{given[0]} selects the files of a diffusers checkpoint; the toy model {model!r} has "
                          "one set of files: leave it out")
    if revision is not None and _is_local(model):
        raise DitlocError(f"--revision selects a hub revision; {model!r} is a local directory (check out the "
                          "revision there, or pass the hub id)")


def source_kwargs(args) -> dict:
    """--variant and --revision of a command's args, as `load_pipeline` keywords (those given)."""
    return {k: getattr(args, k) for k in ("variant", "revision") if getattr(args, k, None) is not None}


def transformer_class(model: str, revision: str | None = None) -> str | None:
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
                index = DiffusionPipeline.load_config(model, local_files_only=True, revision=revision)
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
