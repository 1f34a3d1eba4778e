"""The localized training engine (method.md §5): only the chosen blocks learn.

Cost, by construction:
- frozen parameters have ``requires_grad=False``: no gradient buffers, no
  optimizer state;
- the blocks before the first trainable block run under ``torch.no_grad``
  (``no_grad_prefix``): no activations kept, no backward through them;
- optional gradient checkpointing of the blocks that do need a backward.

The loop is family-agnostic: the adapter supplies the transformer call
(`Adapter.denoise`) and the text conditioning (`Adapter.encode_text`); the
scheduler's config supplies the noising rule (DDPM epsilon / v, or flow matching).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import _state
from ..errors import DitlocError, Interrupted
from .lora import LoraSpec, add_lora, lora_state_dict, lora_targets

METHODS = ("lora", "full")
CKPT = "checkpoint"


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``lr=None`` -> 1e-4 for LoRA, 1e-5 for full weights."""

    method: str = "lora"
    rank: int = 4
    alpha: float | None = None
    steps: int = 200
    lr: float | None = None
    batch_size: int = 4
    seed: int = 0
    gradient_checkpointing: bool = False
    no_grad_prefix: bool = True
    checkpoint_every: int = 50

    def __post_init__(self):
        if self.method not in METHODS:
            raise DitlocError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        flags = {"steps": "--train-steps", "batch_size": "--batch-size", "rank": "--rank",
                 "checkpoint_every": "--checkpoint-every"}
        for name, flag in flags.items():
            if getattr(self, name) < 1:
                raise DitlocError(f"{flag} ({name}) must be >= 1 (got {getattr(self, name)})")
        if self.lr is not None and not self.lr > 0:
            raise DitlocError(f"--lr must be > 0 (got {self.lr})")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.method == "lora" else 1e-5)

    def to_dict(self) -> dict:
        return {**asdict(self), "learning_rate": self.learning_rate}


# ---------------------------------------------------------------------------------------
# noising rule from the scheduler's config
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseRule:
    """x_t and the regression target for a training step, as the pipeline's
    scheduler defines them: DDPM (epsilon or v prediction) or flow matching."""

    kind: str  # "epsilon" | "v_prediction" | "flow"
    alphas_cumprod: torch.Tensor | None = field(default=None, repr=False)  # [T]
    num_train_timesteps: int = 1000

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseRule":
        cfg = scheduler.config
        n = int(cfg.get("num_train_timesteps", 1000))
        if cfg.get("prediction_type") == "flow_prediction" or "FlowMatch" in type(scheduler).__name__ \
                or cfg.get("use_flow_sigmas"):
            return cls("flow", None, n)
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        ddpm = DDPMScheduler(**{k: cfg[k] for k in keys if cfg.get(k) is not None})
        kind = cfg.get("prediction_type", "epsilon")
        if kind not in ("epsilon", "v_prediction"):
            raise DitlocError(f"scheduler prediction_type {kind!r} is not supported for training")
        return cls(kind, ddpm.alphas_cumprod, n)

    def sample(self, x0: torch.Tensor, generator: torch.Generator):
        """-> (x_t [B, C, h, w], timestep [B], target [B, C, h, w])."""
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)  # [B, C, h, w]
        u = torch.rand(b, generator=generator, dtype=torch.float32)  # [B]
        if self.kind == "flow":
            sigma = u.to(x0).view(-1, 1, 1, 1)
            x_t = (1 - sigma) * x0 + sigma * noise
            return x_t, (u * self.num_train_timesteps).to(x0.device), noise - x0
        t = (u * self.num_train_timesteps).long().clamp_max(self.num_train_timesteps - 1)  # [B]
        a = self.alphas_cumprod[t].to(x0).view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if self.kind == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        return x_t, t.to(x0.device), target


# ---------------------------------------------------------------------------------------
# the no-autograd prefix
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_grad_prefix(adapter, trainable_blocks):
    """Run every block before the first trainable one under ``torch.no_grad``
    (restored on exit). Blocks are taken in model order (as the adapter lists them)."""
    names = adapter.block_names()
    chosen = set(trainable_blocks)
    first = next((i for i, n in enumerate(names) if n in chosen), len(names))
    wrapped = []
    try:
        for name in names[:first]:
            module = adapter.block_module(name)
            inner = module.forward

            @functools.wraps(inner)
            def forward(*args, __inner=inner, **kwargs):
                with torch.no_grad():
                    return __inner(*args, **kwargs)

            module.forward = forward  # instance attribute shadows the class method
            wrapped.append(module)
        yield names[:first]
    finally:
        for module in wrapped:
            del module.forward


# ---------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EditResult:
    """What was trained and how it went; ``to_dict`` is the JSON next to the weights."""

    kind: str  # "personalize" | "unlearn"
    model: str
    blocks: tuple[str, ...]
    config: dict
    trainable_parameters: int
    total_parameters: int
    steps: int
    losses: tuple[float, ...]
    wall_seconds: float
    peak_memory_bytes: int | None
    details: dict
    out_dir: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"], d["losses"] = list(self.blocks), list(self.losses)
        return d


class LocalizedTrainer:
    """Owns the trainable parameters of the chosen blocks of ``pipe.transformer``.

    ``method="lora"`` injects peft LoRA into the blocks' linear layers (the
    pipeline is modified in place: that is the edit); ``method="full"`` trains
    the blocks' own weights. Everything else is frozen."""

    def __init__(self, pipe, adapter, blocks, config: TrainConfig, targets=None):
        self.pipe, self.adapter, self.config = pipe, adapter, config
        self.blocks = adapter.resolve_blocks(blocks)
        if not self.blocks:
            raise DitlocError("no blocks to train; pass --blocks auto|all|block.N,...")
        transformer = pipe.transformer
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
            module = getattr(pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        self.spec = None
        if config.method == "lora":
            self.spec = LoraSpec(tuple(self.blocks), tuple(lora_targets(adapter, self.blocks, targets)),
                                 config.rank, config.alpha)
            add_lora(transformer, self.spec, seed=config.seed)
        else:
            transformer.requires_grad_(False)
            for block in self.blocks:
                adapter.block_module(block).requires_grad_(True)
        self.names = [n for n, p in transformer.named_parameters() if p.requires_grad]
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        # the frozen model's values of the trainable tensors (teacher in unlearning):
        # LoRA -> B = 0 (an exact no-op); full -> a copy of the K blocks only
        self.frozen = {n: (torch.zeros_like(p) if self.spec else p.detach().clone())
                       for n, p in transformer.named_parameters()
                       if p.requires_grad and (self.spec is None or "lora_B" in n)}
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.noise = NoiseRule.from_scheduler(pipe.scheduler)
        self.step = 0
        self.losses: list[float] = []
        if config.gradient_checkpointing:
            if not getattr(transformer, "_supports_gradient_checkpointing", False):
                raise DitlocError(f"{type(transformer).__name__} does not support gradient checkpointing")
            transformer.enable_gradient_checkpointing()
        transformer.train()

    @property
    def device(self):
        return self.pipe.transformer.device

    @property
    def dtype(self):
        return self.pipe.transformer.dtype

    def trainable_state(self) -> dict:
        transformer = self.pipe.transformer
        if self.spec is not None:
            return lora_state_dict(transformer)
        prefixes = tuple(self.adapter.block_path(b) + "." for b in self.blocks)
        return {k: v.detach().clone().contiguous() for k, v in transformer.state_dict().items()
                if k.startswith(prefixes)}

    def context(self):
        """Per-step execution context: the no-autograd prefix."""
        if self.config.no_grad_prefix:
            return no_grad_prefix(self.adapter, self.blocks)
        return contextlib.nullcontext()

    @torch.no_grad()
    def teacher(self, latents, timestep, text) -> torch.Tensor:
        """The frozen model's prediction (trainable tensors at their initial values)."""
        with _substituted(self.pipe.transformer, self.frozen):
            return self.adapter.denoise(latents, timestep, text)

    def train_step(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with self.context():
            loss = loss_fn()
        loss.backward()
        self.optimizer.step()
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    # ---- checkpoints (resumable) ------------------------------------------------------
    def save_checkpoint(self, out: Path, identity: dict) -> None:
        tensors = {f"param.{n}": p.detach() for n, p in zip(self.names, self.params)}
        opt_tensors, opt_meta = _state.flatten_optimizer(self.optimizer.state_dict())
        tensors.update(opt_tensors)
        tensors["rng.generator"] = self.generator.get_state()
        meta = {"step": self.step, "losses": self.losses, "identity": identity, "optimizer": opt_meta}
        _state.save_state(out / CKPT, tensors, meta)

    def load_checkpoint(self, out: Path, identity: dict) -> bool:
        stem = out / CKPT
        if not _state.state_exists(stem):
            return False
        try:
            tensors, meta = _state.load_state(stem)
        except (ValueError, OSError) as e:
            raise DitlocError(f"{stem}.safetensors is unreadable ({e}); delete it to start over") from None
        if meta.get("identity") != identity:
            raise DitlocError(
                f"{out} holds a checkpoint of a different job; use another --out or delete {stem}.*"
            )
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(tensors[f"param.{n}"])
        self.optimizer.load_state_dict(_state.unflatten_optimizer(tensors, meta["optimizer"], self.optimizer))
        self.generator.set_state(tensors["rng.generator"])
        self.step, self.losses = int(meta["step"]), list(meta["losses"])
        return True


@contextlib.contextmanager
def _substituted(module: torch.nn.Module, values: dict):
    """Temporarily give named parameters other values (in place, restored exactly)."""
    params = dict(module.named_parameters())
    saved = {n: params[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def on_accelerator(device) -> bool:
    """Whether `device` is the machine's accelerator (CUDA, XPU, MPS, ...), not the CPU."""
    device = torch.device(device)
    if device.type == "cpu" or not torch.accelerator.is_available():
        return False
    return device.type == torch.accelerator.current_accelerator().type


def peak_memory(device) -> int | None:
    """Peak bytes allocated on an accelerator since the last reset; None on CPU."""
    if not on_accelerator(device):
        return None
    return int(torch.accelerator.max_memory_allocated(torch.device(device).index))


def reset_peak_memory(device) -> None:
    if on_accelerator(device):
        torch.accelerator.reset_peak_memory_stats(torch.device(device).index)


def synchronize(device) -> None:
    if on_accelerator(device):
        torch.accelerator.synchronize(torch.device(device).index)


def run_training(trainer: LocalizedTrainer, loss_fn, out: Path | None, identity: dict, progress=None) -> float:
    """The loop: resume from ``out/checkpoint`` if present, train to ``config.steps``,
    checkpoint every ``checkpoint_every`` steps and on interruption. Returns wall seconds."""
    cfg = trainer.config
    if out is not None and trainer.load_checkpoint(out, identity) and progress:
        progress(f"resumed at step {trainer.step}/{cfg.steps}")
    start = time.perf_counter()
    try:
        while trainer.step < cfg.steps:
            try:
                loss = trainer.train_step(loss_fn)
            except torch.OutOfMemoryError:
                raise DitlocError(
                    "out of memory; lower --batch-size, add --gradient-checkpointing or train fewer blocks (--k)"
                ) from None
            if not math.isfinite(loss):
                raise DitlocError(f"loss became {loss} at step {trainer.step}; lower --lr")
            if progress and (trainer.step % max(1, cfg.steps // 20) == 0 or trainer.step == cfg.steps):
                progress(f"step {trainer.step}/{cfg.steps} loss {loss:.4f}")
            if out is not None and (trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps):
                trainer.save_checkpoint(out, identity)
    except KeyboardInterrupt:
        if out is not None:
            trainer.save_checkpoint(out, identity)
            raise Interrupted(f"interrupted at step {trainer.step}; rerun the same command to resume") from None
        raise
    return time.perf_counter() - start
