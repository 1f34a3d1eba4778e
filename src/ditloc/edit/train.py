"""The localized training engine: only the chosen blocks learn.

Cost, by construction:
- frozen parameters have ``requires_grad=False``: no gradient buffers, no
  optimizer state;
- the blocks before the first trainable block run under ``torch.no_grad``
  (``no_grad_prefix``): no activations kept, no backward through them;
- optional gradient checkpointing of the blocks that do need a backward.

The loop is family-agnostic: the adapter supplies the transformer call
(`Adapter.denoise`) and the text conditioning (`Adapter.encode_text`); the
scheduler's config supplies the noising rule (DDPM epsilon / v, or flow matching).

Scale (accelerate): under ``accelerate launch`` / ``torchrun`` every process
draws the same global batch of ``batch_size x processes`` rows from the same
seeded generator and computes its own slice (:meth:`LocalizedTrainer.shard`);
after the backward, accelerate averages the trainable gradients (and the loss)
over the processes, so every process applies the gradient of the global batch's
mean loss: N processes with ``batch_size`` B train exactly (up to float
summation order) what one process with ``batch_size`` N x B trains. With
``mixed_precision="bf16"`` the trainable weights and optimizer state are float32
and the loss runs under bf16 autocast (`precision`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import _state
from ..errors import DitlocError, Interrupted
from .. import processes
from . import precision
from ..devices import peak_memory as accelerator_peak
from ..noise import NoiseRule
from .lora import LoraSpec, add_lora, lora_state_dict, lora_targets

METHODS = ("lora", "full")
CKPT = "checkpoint"


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``lr=None`` -> 1e-4 for LoRA, 1e-5 for full weights.
    ``batch_size``: rows per process (the global batch is ``batch_size`` x processes).
    ``mixed_precision``: ``"no"`` or ``"bf16"`` (see :mod:`ditloc.edit.precision`)."""

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
    mixed_precision: str = "no"
    #: LoRA target modules relative to a block (e.g. ``("attn2.to_k", "attn2.to_v")``: the
    #: cross-attention's text keys/values only); None: the adapter's default (every attention
    #: projection and the MLP)
    lora_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.lora_modules is not None:
            if isinstance(self.lora_modules, str):
                object.__setattr__(self, "lora_modules", tuple(m.strip() for m in self.lora_modules.split(",")
                                                               if m.strip()))
            else:
                object.__setattr__(self, "lora_modules", tuple(str(m).strip() for m in self.lora_modules))
            if not self.lora_modules or not all(self.lora_modules):
                raise DitlocError("--lora-modules is empty; pass module names relative to a block, e.g. "
                                  "attn2.to_k,attn2.to_v")
            if self.method != "lora":
                raise DitlocError(f"--lora-modules applies to --edit-method lora (got --edit-method {self.method})")
        if self.method not in METHODS:
            raise DitlocError(f"unknown edit method {self.method!r}; choose one of {', '.join(METHODS)}")
        precision.check_mode(self.mixed_precision)
        flags = {"steps": "--train-steps", "batch_size": "--batch-size", "rank": "--lora-rank",
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
        self.base_dtype = transformer.dtype  # the frozen weights'
        mixed = config.mixed_precision != "no"
        if mixed:  # before the model is touched
            precision.check_device(config.mixed_precision, transformer.device)
            precision.check_base_dtype(config.mixed_precision, self.base_dtype)
        self.processes = processes.current(transformer.device)
        self.accelerator = processes.accelerator()
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
            module = getattr(pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        self.spec = None
        self._upcast: list[tuple[torch.nn.Parameter, torch.dtype]] = []  # full + mixed: back in close()
        if config.method == "lora":
            targets = lora_targets(adapter, self.blocks, targets or config.lora_modules)
            self.spec = LoraSpec(tuple(self.blocks), tuple(targets), config.rank, config.alpha)
            add_lora(transformer, self.spec, seed=config.seed, upcast=mixed)
        else:
            transformer.requires_grad_(False)
            for block in self.blocks:
                adapter.block_module(block).requires_grad_(True)
                for p in adapter.block_module(block).parameters() if mixed else ():
                    if p.dtype != torch.float32:  # float32 master weights
                        self._upcast.append((p, p.dtype))
                        p.data = p.data.float()
        self.names = [n for n, p in transformer.named_parameters() if p.requires_grad]
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        # the frozen model's values of the trainable tensors (teacher in unlearning):
        # LoRA -> B = 0 (an exact no-op); full -> a copy of the K blocks only
        self.frozen = {n: (torch.zeros_like(p) if self.spec else p.detach().clone())
                       for n, p in transformer.named_parameters()
                       if p.requires_grad and (self.spec is None or "lora_B" in n)}
        # accelerate wraps the optimizer (device placement off: the pipeline stays where it is)
        self.optimizer = self.accelerator.prepare(
            torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0))
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.noise = NoiseRule.from_scheduler(pipe.scheduler)
        self.step = 0
        self.seconds = 0.0  # training time up to `step`, over every run (run_training keeps it)
        self.earlier_peak: int | None = None  # the peak memory of the runs before a resume (None: none, or a CPU)
        self.losses: list[float] = []  # on the host, up to the last flush_losses()
        self._pending: list[torch.Tensor] = []  # per-step losses still on the device
        #: more state a loss keeps from step to step (name -> tensor; e.g. an inner attacker's), saved
        #: with the checkpoint and restored on resume: a pair of callables (get, set) or None
        self.extra_state = None
        if config.gradient_checkpointing:
            if not getattr(transformer, "_supports_gradient_checkpointing", False):
                raise DitlocError(f"{type(transformer).__name__} does not support gradient checkpointing")
            transformer.enable_gradient_checkpointing()
        transformer.train()

    @property
    def global_batch(self) -> int:
        """Rows drawn per step, by every process: ``batch_size`` x processes."""
        return self.config.batch_size * self.processes.world

    def shard(self, *tensors) -> tuple:
        """This process's rows of tensors of the global batch [global_batch, ...]:
        rows ``rank * batch_size`` to ``(rank + 1) * batch_size`` (all of them in one process)."""
        if self.processes.world == 1:
            return tensors
        b, r = self.config.batch_size, self.processes.rank
        return tuple(t[r * b : (r + 1) * b] for t in tensors)

    def record(self) -> dict:
        """How this run trained, beyond its config: processes, global batch, the base weights' dtype."""
        return {"processes": self.processes.world, "global_batch_size": self.global_batch,
                "base_dtype": str(self.base_dtype).removeprefix("torch.")}

    def close(self) -> None:
        """Hand the pipeline back in its own dtype: trained full blocks leave their
        float32 master weights (LoRA stays float32; peft computes it in its dtype)."""
        with torch.no_grad():
            for p, dtype in self._upcast:
                p.data = p.data.to(dtype)
        self._upcast = []

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

    def train_step(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One optimizer step on this process's share of the batch; returns the
        global batch's mean loss as a 0-d tensor on the device (no host transfer:
        :meth:`flush_losses` moves the pending losses in one go)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.context(), precision.autocast(self.config.mixed_precision, self.device):
            loss = loss_fn()
        self.accelerator.backward(loss)
        value = self._average(loss)
        self.optimizer.step()
        self.step += 1
        self._pending.append(value)
        return value

    def flush_losses(self) -> list[float]:
        """Move the losses of the steps since the last flush to the host (one transfer) -> all losses."""
        if self._pending:
            self.losses.extend(torch.stack(self._pending).tolist())
            self._pending = []
        return self.losses

    def _average(self, loss: torch.Tensor) -> torch.Tensor:
        """Mean of the trainable gradients and of the loss over the processes
        (accelerate's all-reduce, in buckets of one dtype). -> the mean loss."""
        if self.processes.world == 1:
            return loss.detach().float()
        grads = [p.grad for p in self.params if p.grad is not None]  # [same order on every process]
        for bucket in processes.buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])  # [sum of numel]
            flat = self.accelerator.reduce(flat, reduction="mean")
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
        return self.accelerator.reduce(loss.detach().float().reshape(1), reduction="mean").reshape(())

    def broadcast_parameters(self) -> None:
        """Every process starts from the main process's trainable weights (as DDP does)."""
        if self.processes.world > 1:
            from accelerate.utils import broadcast

            with torch.no_grad():
                broadcast([p.data for p in self.params], from_process=0)

    # ---- checkpoints (resumable) ------------------------------------------------------
    def save_checkpoint(self, out: Path, identity: dict) -> None:
        """Written by the main process only (every process holds the same state)."""
        self.flush_losses()
        if not self.processes.is_main:
            return
        tensors = {f"param.{n}": p.detach() for n, p in zip(self.names, self.params)}
        opt_tensors, opt_meta = _state.flatten_optimizer(self.optimizer.state_dict())
        tensors.update(opt_tensors)
        tensors["rng.generator"] = self.generator.get_state()
        if self.extra_state is not None:
            tensors.update({f"extra.{k}": v.detach() for k, v in self.extra_state[0]().items()})
        meta = {"step": self.step, "losses": self.losses, "identity": identity, "optimizer": opt_meta,
                "processes": self.processes.world, "seconds": self.seconds, "peak_memory_bytes": self.peak_memory()}
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
        n = int(meta.get("processes", 1))
        if n != self.processes.world:
            raise DitlocError(
                f"{stem}.safetensors was written by a run of {n} process(es), this one has {self.processes.world}; "
                f"resume with the same number (accelerate launch --num_processes {n}) or delete {stem}.*"
            )
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(tensors[f"param.{n}"])
        self.optimizer.load_state_dict(_state.unflatten_optimizer(tensors, meta["optimizer"], self.optimizer))
        self.generator.set_state(tensors["rng.generator"])
        if self.extra_state is not None:
            self.extra_state[1]({k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")})
        self.step, self.losses = int(meta["step"]), list(meta["losses"])
        self.seconds, self.earlier_peak = float(meta.get("seconds", 0.0)), meta.get("peak_memory_bytes")
        return True

    def peak_memory(self) -> int | None:
        """Peak accelerator bytes of the training, the runs before a resume included (None on a CPU)."""
        now = accelerator_peak(self.pipe.transformer.device)
        known = [p for p in (self.earlier_peak, now) if p is not None]
        return max(known) if known else None


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


def run_training(trainer: LocalizedTrainer, loss_fn, out: Path | None, identity: dict, progress=None) -> float:
    """The loop: resume from ``out/checkpoint`` if present, train to ``config.steps``,
    checkpoint every ``checkpoint_every`` steps and on interruption (the main process
    writes, and alone reports `progress`). Returns the wall seconds of the training, a resumed
    run's together with those of the runs before it (kept in the checkpoint)."""
    cfg, procs = trainer.config, trainer.processes
    progress = progress if procs.is_main else None
    if out is not None and trainer.load_checkpoint(out, identity) and progress:
        progress(f"resumed at step {trainer.step}/{cfg.steps}")
    trainer.broadcast_parameters()
    start, earlier = time.perf_counter(), trainer.seconds

    def clock() -> None:
        trainer.seconds = earlier + time.perf_counter() - start

    try:
        every = max(1, cfg.steps // 20)  # losses reach the host (and are checked) this often, not every step
        while trainer.step < cfg.steps:
            try:
                trainer.train_step(loss_fn)
            except torch.OutOfMemoryError:
                raise DitlocError(
                    "out of memory; lower --batch-size, add --gradient-checkpointing or train fewer blocks (--k)"
                ) from None
            checkpoint = out is not None and (trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps)
            if checkpoint or trainer.step % every == 0 or trainer.step == cfg.steps:  # never checkpoint a NaN
                first = len(trainer.losses)
                losses = trainer.flush_losses()
                bad = next((i for i in range(first, len(losses)) if not math.isfinite(losses[i])), None)
                if bad is not None:
                    raise DitlocError(f"loss became {losses[bad]} at step {bad + 1}; lower --lr")
                if progress and (trainer.step % every == 0 or trainer.step == cfg.steps):
                    progress(f"step {trainer.step}/{cfg.steps} loss {losses[-1]:.4f}")
            if checkpoint:
                clock()
                trainer.save_checkpoint(out, identity)  # the main process; the others wait for it
                procs.wait()
    except KeyboardInterrupt:
        if out is not None:
            clock()
            trainer.save_checkpoint(out, identity)
            raise Interrupted(f"interrupted at step {trainer.step}; rerun the same command to resume") from None
        raise
    trainer.flush_losses()
    clock()
    return trainer.seconds
