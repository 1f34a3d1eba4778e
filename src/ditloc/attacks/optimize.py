"""The optimized attacks' loop: Adam over a few tensors (the pipeline frozen), checkpointed and
resumable. The state (tensors, Adam's moments, the host generator, step, losses) is one
crash-consistent file (`ditloc._state`); a rerun continues from it with the same numbers."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from .. import _state
from ..errors import DitlocError, Interrupted


@contextlib.contextmanager
def frozen(pipe):
    """No parameter of the pipeline's modules takes a gradient inside the block (the attack's
    gradients still flow through them); every flag is restored on exit."""
    flags = []
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for p in module.parameters():
                flags.append((p, p.requires_grad))
                p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def optimize(params: dict[str, torch.Tensor], lrs: dict[str, float], loss_fn, *, steps: int, seed: int,
             stem: Path | None = None, identity: dict | None = None, checkpoint_every: int = 25,
             progress=None) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """Minimise ``loss_fn(leaves, generator)`` over float32 copies of `params` with Adam
    (learning rate `lrs[name]` per tensor) for `steps` steps; `generator` is a host
    ``torch.Generator`` seeded with `seed` that draws every random number of a step. With
    `stem`, the state is saved there every `checkpoint_every` steps, at the end and on Ctrl-C
    (then :class:`~ditloc.errors.Interrupted`), and a rerun resumes from it (a state of
    another `identity` is refused). -> (final tensors, per-step losses, wall seconds)."""
    names = list(params)
    leaves = {n: params[n].detach().to(torch.float32).clone().requires_grad_(True) for n in names}
    optimizer = torch.optim.Adam([{"params": [leaves[n]], "lr": float(lrs[n])} for n in names])
    generator = torch.Generator("cpu").manual_seed(int(seed))
    step, losses = 0, []
    if stem is not None and _state.state_exists(stem):
        step, losses = _load(stem, identity, leaves, optimizer, generator)
        if progress:
            progress(f"resumed at step {step}/{steps}")
    start = time.perf_counter()
    every = max(1, steps // 20)
    try:
        while step < steps:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(leaves, generator)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise DitlocError(f"the attack's loss became {losses[-1]} at step {step}; lower --lr")
            if progress and (step % every == 0 or step == steps):
                progress(f"step {step}/{steps} loss {losses[-1]:.4f}")
            if stem is not None and (step % checkpoint_every == 0 or step == steps):
                _save(stem, identity, leaves, optimizer, generator, step, losses)
    except KeyboardInterrupt:
        if stem is None:
            raise
        _save(stem, identity, leaves, optimizer, generator, step, losses)
        raise Interrupted(f"interrupted at step {step}; rerun the same command to resume") from None
    return {n: v.detach() for n, v in leaves.items()}, losses, time.perf_counter() - start


def _save(stem, identity, leaves, optimizer, generator, step, losses) -> None:
    tensors = {f"param.{n}": v.detach() for n, v in leaves.items()}
    opt_tensors, opt_meta = _state.flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng.generator"] = generator.get_state()
    _state.save_state(stem, tensors, {"step": step, "losses": losses, "identity": identity, "optimizer": opt_meta})


def _load(stem, identity, leaves, optimizer, generator) -> tuple[int, list[float]]:
    try:
        tensors, meta = _state.load_state(stem)
    except (ValueError, OSError) as e:
        raise DitlocError(f"{stem}.safetensors is unreadable ({e}); delete it to start over") from None
    if meta.get("identity") != identity:
        raise DitlocError(f"{stem}.safetensors is the checkpoint of another attack; use another --out or delete it")
    with torch.no_grad():
        for n, v in leaves.items():
            v.copy_(tensors[f"param.{n}"])
    optimizer.load_state_dict(_state.unflatten_optimizer(tensors, meta["optimizer"], optimizer))
    generator.set_state(tensors["rng.generator"])
    return int(meta["step"]), [float(x) for x in meta["losses"]]
