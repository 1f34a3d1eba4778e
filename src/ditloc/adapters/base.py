"""The one place that knows a model family.

An adapter maps a diffusers pipeline to what ditloc needs: stable block names,
the attention module where image tokens read text in each block, where the
conditional half of a classifier-free-guidance batch sits, how a prompt becomes
the text sequence the transformer sees (for concept positions and for clean
prompts), and the processor that measures / intervenes in that attention.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..errors import BadOption, DitlocError, UnsupportedModel
from ..tokens import ConceptSpan


class Adapter(ABC):
    family: ClassVar[str]
    #: class names of the transformer this adapter serves
    transformer_classes: ClassVar[tuple[str, ...]]
    #: the family has a pooled text embedding that modulates every block (FLUX, SD3)
    has_pooled_text: ClassVar[bool] = False

    @property
    def uses_guidance_scale(self) -> bool:
        """Whether the pipeline's `guidance_scale` changes its images (False: FLUX base models, whose
        `guidance_scale` feeds a guidance embedding they lack; their CFG is `true_cfg_scale`)."""
        return True

    @property
    def guidance_argument(self) -> str:
        """The `pipe(...)` argument that sets the classifier-free guidance scale (ditloc's
        `guidance_scale` / ``--guidance`` goes there)."""
        return "guidance_scale"

    #: family settings a user may pass as adapter options -> their valid values (None: the family's default)
    options: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: transformer forward keyword arguments that carry the batch dimension (dicts are searched)
    batched_inputs: ClassVar[tuple[str, ...]] = (
        "hidden_states", "encoder_hidden_states", "encoder_attention_mask", "attention_mask", "timestep",
        "guidance", "pooled_projections", "added_cond_kwargs",
    )
    #: default LoRA targets: module names relative to a block (those a block lacks are skipped)
    lora_suffixes: ClassVar[tuple[str, ...]] = ()
    #: per-block projections that read text states only (keys/values of the text): what a
    #: closed-form edit rewrites; module names relative to a block
    text_projection_suffixes: ClassVar[tuple[str, ...]] = ()
    #: the text states a block reads depend on the image and the timestep (joint attention
    #: updates the text stream), not only on the prompt
    text_states_depend_on_image: ClassVar[bool] = False

    def __init__(self, pipe, **options):
        self.check_options(options)
        self.pipe = pipe
        self.transformer = pipe.transformer
        for name in self.options:
            setattr(self, name, options.get(name))

    @classmethod
    def check_options(cls, options) -> None:
        """Refuse an option the family does not have, or a value it does not take (naming the
        valid ones); needs no model, so a caller can check before one loads."""
        for name, value in dict(options).items():
            if name not in cls.options:
                valid = "; ".join(f"{k} ({', '.join(v)})" for k, v in cls.options.items()) or "none"
                raise BadOption(f"{cls.family} has no option {name!r} (its options: {valid})")
            if value is not None and value not in cls.options[name]:
                raise BadOption(f"{cls.family} option {name} must be one of {', '.join(cls.options[name])}; "
                                  f"got {value!r}")

    # ---- structure -------------------------------------------------------------------
    @abstractmethod
    def block_names(self) -> list[str]:
        """Stable block names, in model order (e.g. ``block.0`` ... ``block.27``)."""

    @abstractmethod
    def text_attention(self, block: str) -> torch.nn.Module:
        """The attention module in `block` through which image tokens read text."""

    @abstractmethod
    def block_module(self, block: str) -> torch.nn.Module:
        """The transformer block called `block`."""

    def block_path(self, block: str) -> str:
        """Full module path of `block` inside the transformer (``transformer_blocks.3``)."""
        module = self.block_module(block)
        for name, m in self.transformer.named_modules():
            if m is module:
                return name
        raise DitlocError(f"{block} is not a submodule of the transformer")

    def resolve_blocks(self, blocks) -> list[str]:
        """Validate user block names ("all" allowed); returns them in model order."""
        names = self.block_names()
        if blocks is None:
            return []
        if isinstance(blocks, str):
            blocks = names if blocks == "all" else [b for b in blocks.split(",") if b.strip()]
        blocks = [b.strip() if isinstance(b, str) else b for b in blocks]
        unknown = [b for b in blocks if b not in names]
        if unknown:
            raise DitlocError(
                f"unknown block {unknown[0]!r}; valid names are {names[0]} ... {names[-1]} ({', '.join(names)})"
            )
        chosen = set(blocks)
        return [b for b in names if b in chosen]

    # ---- pipeline call ---------------------------------------------------------------
    def call_default(self, name: str) -> Any:
        """The pipeline's own default for a `__call__` argument."""
        param = inspect.signature(self.pipe.__call__).parameters.get(name)
        if param is None or param.default is inspect.Parameter.empty:
            return None
        return param.default

    def default_call_kwargs(self, given: dict | None = None) -> dict:
        """Call arguments a user would need to run this checkpoint at all (e.g. no
        resolution binning for non-standard sample sizes). `given`: the arguments the
        user passes; those win, and no default is worked out (or warned about) for them."""
        return {}

    def check_call(self, call_kwargs: dict) -> None:
        """Refuse call arguments the family's pipeline cannot run (before any work)."""

    @abstractmethod
    def cond_rows(self, batch: int, n_images: int) -> slice:
        """Rows of the transformer batch that hold the conditional (prompted) inputs."""

    # ---- text ------------------------------------------------------------------------
    @abstractmethod
    def concept_span(self, prompt: str, concept: str, call_kwargs: dict) -> ConceptSpan:
        """Positions of `concept` in the text sequence the transformer receives."""

    @abstractmethod
    def encode_text(self, prompts: list[str], call_kwargs: dict) -> dict:
        """Conditional text conditioning exactly as the pipeline computes it, by name."""

    #: (text encoder, its tokenizer) attribute names of the pipeline, every one `encode_text` runs
    text_encoder_names: ClassVar[tuple[tuple[str, str], ...]] = (("text_encoder", "tokenizer"),)

    def text_encoders(self) -> list[tuple[str, torch.nn.Module, Any, list[torch.nn.Embedding]]]:
        """(name, text encoder, tokenizer, token embedding layers) of every text encoder the pipeline
        loaded: the layers are the modules that turn its token ids into input vectors (a tied copy of
        `get_input_embeddings()`, e.g. T5's ``encoder.embed_tokens``, is the one its forward calls)."""
        out = []
        for enc, tok in self.text_encoder_names:
            module, tokenizer = getattr(self.pipe, enc, None), getattr(self.pipe, tok, None)
            if module is None or tokenizer is None:
                continue
            table = module.get_input_embeddings().weight  # [V, d]
            layers = [m for m in module.modules() if isinstance(m, torch.nn.Embedding) and m.weight is table]
            out.append((enc, module, tokenizer, layers))
        return out

    def prompt_embeds_kwargs(self, text: dict) -> dict:
        """`pipe(...)` arguments that hand it `text` (:meth:`encode_text` output, batch-matched) in
        place of a prompt."""
        raise UnsupportedModel(f"generation from text states is not implemented for {self.family}")

    def text_token_ids(self, prompt: str, call_kwargs: dict) -> list[int]:
        """The token id at every position of the text sequence the transformer
        receives for `prompt` (padding included; -1 where no token sits), to align
        a prompt with an edited version of it."""
        raise UnsupportedModel(f"token alignment is not implemented for {self.family}")

    def pooled_projection(self) -> str:
        """Full module name of the linear map that first reads the pooled text vector (shared by every
        block through the modulation); families without one are refused."""
        raise UnsupportedModel(f"{self.family} has no pooled text vector; --pooled-edit applies to FLUX and SD3")

    def text_projections(self, block: str) -> list[str]:
        """Full module names of the projections in `block` that read only text states
        (e.g. cross-attention ``to_k``/``to_v``); a block without them is refused."""
        inner = dict(self.block_module(block).named_modules())
        found = [s for s in self.text_projection_suffixes if isinstance(inner.get(s), torch.nn.Linear)]
        if not found:
            raise DitlocError(f"{block} has no text-only key/value projection "
                              f"({', '.join(self.text_projection_suffixes) or 'none in ' + self.family}); "
                              "choose blocks that read the prompt through their own projections")
        path = self.block_path(block)
        return [f"{path}.{s}" for s in found]

    # ---- training ---------------------------------------------------------------------
    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, text: dict) -> torch.Tensor:
        """One transformer call as the pipeline makes it, for training: `latents`
        [B, C, h, w] (unpacked), `timestep` [B] on the scheduler's 0..1000 scale,
        `text` from :meth:`encode_text` (batch-matched). Returns the prediction
        [B, C, h, w] (a learned-variance half is dropped)."""
        raise DitlocError(
            f"training (personalize/unlearn) is not implemented for {self.family} yet; "
            "supported: pixart, sana, flux, sd3"
        )

    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels the checkpoint generates natively."""
        sample = self.transformer.config.sample_size
        sample = sample if isinstance(sample, (tuple, list)) else (sample, sample)
        scale = self.pipe.vae_scale_factor
        return int(sample[0] * scale), int(sample[1] * scale)

    def unpack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's ``output_type="latent"`` result as [B, C, h, w] (FLUX packs them)."""
        return latents

    #: the scheduler's timestep (0..1000) per unit of the transformer's `timestep` input
    timestep_scale = 1.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the pipeline's `output_type="latent"` gives them -> images [B, 3, H, W]
        in [0, 1], as the pipeline decodes them (differentiable)."""
        vae = self.pipe.vae
        z = self.unpack_latents(latents)
        z = z / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # ---- extra forwards (causal localization) ------------------------------------------
    def cond_inputs(self, args: tuple, kwargs: dict, rows: slice, repeat: int = 1) -> tuple[tuple, dict]:
        """A transformer forward's inputs restricted to the conditional `rows` and tiled
        `repeat` times (group-major: copy g holds rows g*n ... (g+1)*n - 1)."""
        first = args[0] if args else kwargs["hidden_states"]
        batch = first.shape[0]

        def pick(value):
            if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
                value = value[rows]
                return value.repeat(repeat, *([1] * (value.ndim - 1))) if repeat > 1 else value
            if isinstance(value, dict):
                return {k: pick(v) for k, v in value.items()}
            return value

        new_args = tuple(pick(a) for a in args)
        new_kwargs = {k: (pick(v) if k in self.batched_inputs else v) for k, v in kwargs.items()}
        return new_args, new_kwargs

    def text_inputs(self, text: dict) -> dict:
        """Transformer keyword arguments that carry `text` (:meth:`encode_text` output)."""
        raise NotImplementedError

    def with_text(self, kwargs: dict, text: dict, repeat: int = 1) -> dict:
        """`kwargs` with the text conditioning replaced by `text`, tiled `repeat` times."""
        kwargs = dict(kwargs)
        for name, value in self.text_inputs(text).items():
            like = kwargs.get(name)
            if like is not None:
                value = value.to(device=like.device, dtype=like.dtype)
            kwargs[name] = value.repeat(repeat, *([1] * (value.ndim - 1))) if repeat > 1 else value
        return kwargs

    @staticmethod
    def prediction(output, hidden_states: torch.Tensor) -> torch.Tensor:
        """The model's prediction from a transformer forward's output (a learned-variance
        half is dropped, as the pipelines do)."""
        out = output[0] if isinstance(output, (tuple, list)) else output.sample
        if out.ndim == 4 and hidden_states.ndim == 4 and out.shape[1] == 2 * hidden_states.shape[1]:
            out = out[:, : hidden_states.shape[1]]
        return out

    # ---- instrumentation -------------------------------------------------------------
    @abstractmethod
    def make_processor(self, block: str, index: int, attn: torch.nn.Module, session) -> Any:
        """An attention processor for `attn` that measures / intervenes as the
        `ditloc.engine.Session` says (it lives beside this adapter)."""

    @abstractmethod
    def make_swap(self, blocks: frozenset[str], clean: dict, pooled_clean: bool):
        """The family's swap (`ditloc.engine.CrossSwap` / `JointSwap`): `blocks` read
        `clean` (:meth:`encode_text` of the clean prompts)."""

    @abstractmethod
    def on_forward(self, session, args: tuple, kwargs: dict):
        """Called before every transformer forward: sets the session's immutable
        `ForwardContext` (step, conditional rows, text length / padding limit) and,
        when the session has a swap, prepares the substitute text conditioning.
        May return new (args, kwargs) for the forward."""
