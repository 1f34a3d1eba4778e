"""Localized editing: personalization and unlearning that train
only the localized blocks, with LoRA (peft) or the blocks' own weights.

    from ditloc.edit import personalize, unlearn, TrainConfig, load_edit
    res = unlearn(pipe, "snoopy", "a dog", blocks="auto", k=4, out="runs/unlearn")
    pipe.load_lora_weights("runs/unlearn")      # pipelines with a diffusers LoRA loader
    load_edit(pipe, "runs/unlearn")             # any supported pipeline
"""

from .closed_form import ClosedFormConfig, closed_form_unlearn
from .concepts import Erasure, plan_erasures, read_concepts_file
from .data import encode_images, image_size, load_image_folder
from .jobs import choose_blocks, load_edit, personalize
from .lora import (
    LoraSpec,
    add_lora,
    factorize,
    load_lora,
    lora_state_dict,
    lora_targets,
    read_lora,
    save_lora,
    save_weight_delta,
)
from .robust import RobustConfig
from .train import EditResult, LocalizedTrainer, NoiseRule, TrainConfig, no_grad_prefix
from .unlearning import anchor_prompt, erase_k, unlearn

__all__ = [
    "ClosedFormConfig", "EditResult", "Erasure", "LocalizedTrainer", "LoraSpec", "NoiseRule", "RobustConfig", "TrainConfig",
    "add_lora", "anchor_prompt", "closed_form_unlearn", "choose_blocks", "encode_images", "erase_k", "factorize", "image_size", "load_edit",
    "load_image_folder", "load_lora", "lora_state_dict", "lora_targets", "no_grad_prefix",
    "personalize", "plan_erasures", "read_concepts_file", "read_lora", "save_lora", "save_weight_delta", "unlearn",
]
