"""The embedded toy world: a procedurally drawn world and a small DiT trained on it."""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"


def load_pipeline(torch_dtype=None):
    """The shipped toy pipeline (offline, from the package; its class is in model_index.json)."""
    from diffusers import DiffusionPipeline

    from ..errors import DitlocError

    if not (MODEL_DIR / "model_index.json").is_file():
        raise DitlocError(f"the toy model is not in {MODEL_DIR}; train and export it (scripts/toy/) first")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return DiffusionPipeline.from_pretrained(str(MODEL_DIR), local_files_only=True, **kwargs)


def is_toy_pipeline(pipe) -> bool:
    """Whether `pipe` was loaded from the shipped toy model (its oracle is the default evaluator)."""
    path = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not path:
        return False
    try:
        return Path(path).resolve() == MODEL_DIR.resolve()
    except (OSError, TypeError):
        return False
