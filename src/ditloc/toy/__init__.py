"""The embedded toy world: a procedurally drawn world and small DiTs trained on it.

Two toy models, by name: ``toy`` (a PixArt-alpha pipeline, ``model/``) and ``toy-flux`` (a FLUX
pipeline with joint attention, ``model_flux/``; ``$DITLOC_TOY_FLUX_DIR`` points it at another
export, e.g. a checkpoint of a training run, see scripts/toy/FLUX_TRAINING.md). Each is sampled
with the arguments it was trained for (`ToyModel.call_defaults`), which every ditloc run of it
passes unless the caller sets them; its oracle is the default evaluator and the toy probe set the
default categories.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType

from ..errors import DitlocError
from ..registry import KnownModel, model_of, register

MODEL_DIR = Path(__file__).parent / "model"
FLUX_MODEL_DIR = Path(__file__).parent / "model_flux"
#: an environment variable that overrides FLUX_MODEL_DIR (a toy-flux export not shipped yet)
FLUX_DIR_ENV = "DITLOC_TOY_FLUX_DIR"
#: a toy model: how it is sampled, judged and made (`ditloc.registry.KnownModel`)
ToyModel = KnownModel


def _oracle():
    from ..evaluate.toy import ToyOracle

    return ToyOracle()


def _flux_dir() -> Path:
    return Path(os.environ.get(FLUX_DIR_ENV) or FLUX_MODEL_DIR).expanduser()


TOY_MODELS = {
    "toy": ToyModel(
        "toy",
        # its pipeline's own defaults already sample it as trained: 32 px from the transformer's config,
        # padding masked (any max_sequence_length >= the prompt gives the same images), no resolution
        # binning (the adapter); the toy captions are never cleaned
        call_defaults=MappingProxyType({"clean_caption": False}),
        guidance_argument="guidance_scale",
        how_to_make="train and export it with scripts/toy/ (train_dit.py, export_pipeline.py)",
        evaluator=_oracle, probe_set="toy", directory=lambda: MODEL_DIR,
    ),
    "toy-flux": ToyModel(
        "toy-flux",
        # FluxPipeline's defaults are FLUX.1's (1024 px, 512 unmasked T5 tokens, no true CFG); the toy
        # was trained on 32 px images with prompts padded to exactly 32 tokens, and is sampled with true CFG
        # at 20 steps (its PROVENANCE and the PixArt toy's; FluxPipeline's 28 are FLUX.1's)
        call_defaults=MappingProxyType({"height": 32, "width": 32, "max_sequence_length": 32,
                                        "true_cfg_scale": 4.0, "negative_prompt": "", "num_inference_steps": 20}),
        guidance_argument="true_cfg_scale",
        how_to_make=f"train and export it as scripts/toy/FLUX_TRAINING.md describes (or set {FLUX_DIR_ENV} "
                    "to an export)",
        evaluator=_oracle, probe_set="toy", directory=_flux_dir,
    ),
}
for _model in TOY_MODELS.values():
    register(_model)


def toy_model(name: str) -> ToyModel:
    """The toy model called `name` ("toy" or "toy-flux")."""
    if name not in TOY_MODELS:
        raise DitlocError(f"unknown toy model {name!r}; the toy models are {', '.join(TOY_MODELS)}")
    return TOY_MODELS[name]


def model_dir(name: str = "toy") -> Path:
    """The directory of the toy model `name` (toy-flux: ``$DITLOC_TOY_FLUX_DIR`` when set)."""
    return toy_model(name).directory()


def load_pipeline(name: str = "toy", torch_dtype=None):
    """The toy pipeline `name` ("toy": PixArt-alpha, "toy-flux": FLUX), offline from its
    directory (its class is in model_index.json)."""
    from diffusers import DiffusionPipeline

    from ..registry import mark

    spec, directory = toy_model(name), model_dir(name)
    if not (directory / "model_index.json").is_file():
        raise DitlocError(f"the {name} model is not in {directory}; {spec.how_to_make}")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    pipe = DiffusionPipeline.from_pretrained(str(directory), local_files_only=True, **kwargs)
    mark(pipe, name)  # an export that predates the key in its config
    height = spec.call_defaults.get("height")
    if height and hasattr(pipe, "default_sample_size"):
        # FluxPipeline's native size is a constant (1024 px), not the checkpoint's: set the model's own, so
        # a plain `pipe(prompt)` and ditloc's training (personalize, unlearn) use it
        pipe.default_sample_size = int(height) // pipe.vae_scale_factor
    return pipe


def toy_model_of(pipe) -> ToyModel | None:
    """The toy model `pipe` is (by the ``_ditloc_model`` key of its transformer's config, which a
    copy or a re-save keeps), or None."""
    model = model_of(pipe)
    return model if model is not None and model.name in TOY_MODELS else None


def is_toy_pipeline(pipe) -> bool:
    """Whether `pipe` is a toy model (its oracle is the default evaluator)."""
    return toy_model_of(pipe) is not None
