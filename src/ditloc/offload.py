"""Weights that diffusers offloads: where their values live, how an edit reaches them.

ditloc runs on a pipeline as the user set it up, also with
``pipe.enable_model_cpu_offload()`` or diffusers' group offloading
(``pipe.enable_group_offload(...)``, ``apply_group_offloading(transformer, ...)``).
Those hooks move weights onto the execution device for a module's forward and back
after it. ditloc never moves a module itself: it computes on ``pipe._execution_device``
and lets the hooks do the moving. Two things need care, and go through this module:

- a weight read outside its module's forward (the contribution's output projection,
  read inside the attention before that projection runs; a closed-form solve) is read
  where the offloader keeps it between forwards (:func:`stored`);
- an edit is written where the offloader restores the weight from (:func:`write`):
  the parameter and, with streamed group offloading, its page-locked host copy.

Weights offloaded to disk or left on the meta device (sequential CPU offload) are not
in memory between forwards: :func:`check_writable` and :func:`check_readable` refuse
the jobs that would need them, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DitlocError

#: the name diffusers registers its group-offloading hook under (``diffusers.hooks.group_offloading``)
GROUP_HOOK = "group_offloading"


@dataclass(frozen=True)
class Offloading:
    """How a module's weights are offloaded.

    `kind`: None, "model" (accelerate's whole-model hook, ``enable_model_cpu_offload``),
    "group" (diffusers' group offloading) or "sequential" (accelerate's per-layer hooks with
    weights on the meta device); `level`: "block_level" or "leaf_level" (group only);
    `disk`: groups kept in files between forwards; `streams`: groups with a host copy
    (transfers on a side stream)."""

    kind: str | None = None
    level: str | None = None
    disk: bool = False
    streams: bool = False


def _group_hook(module: torch.nn.Module):
    registry = getattr(module, "_diffusers_hook", None)
    return registry.get_hook(GROUP_HOOK) if registry is not None else None


def offloading(module: torch.nn.Module) -> Offloading:
    """What offloading hooks `module` (a pipeline component) carries."""
    for m in module.modules():
        hook = _group_hook(m)
        if hook is not None:
            config, group = hook.config, hook.group
            level = getattr(config.offload_type, "value", config.offload_type)
            return Offloading("group", str(level), config.offload_to_disk_path is not None,
                              group.stream is not None)
    if any(p.device.type == "meta" for p in module.parameters()):
        return Offloading("sequential")
    if getattr(module, "_hf_hook", None) is not None:
        return Offloading("model")
    return Offloading()


def check_writable(module: torch.nn.Module, job: str = "closed-form unlearning") -> None:
    """Refuse an in-place edit of `module`'s weights where offloading keeps them out of memory."""
    off = offloading(module)
    if off.kind == "sequential":
        raise DitlocError(f"{job} writes the transformer's weights, but sequential CPU offload keeps them on the meta "
                          "device; use pipe.enable_model_cpu_offload() or pipe.enable_group_offload(...) instead")
    if off.disk:
        raise DitlocError(f"{job} writes the transformer's weights, but group offloading to disk restores them from "
                          "files written once; offload to memory instead (leave out offload_to_disk_path)")


def check_readable(module: torch.nn.Module, job: str = "the contribution") -> None:
    """Refuse reading weights outside their forward where the offloader keeps them only on disk
    (leaf-level group offloading to disk: a layer's weights are loaded only for its own forward)."""
    off = offloading(module)
    if off.kind == "sequential":
        raise DitlocError(f"{job} reads each block's output projection, which sequential CPU offload keeps on the "
                          "meta device; use pipe.enable_model_cpu_offload() or pipe.enable_group_offload(...)")
    if off.disk and off.level == "leaf_level":
        raise DitlocError(f"{job} reads each block's output projection, which leaf-level group offloading to disk "
                          "keeps only in files; use offload_type='block_level' or offload to memory")


def stored(module: torch.nn.Module, name: str = "weight") -> torch.Tensor | None:
    """``module.<name>`` as it is kept between the module's own forwards: with group
    offloading that owns `module` itself (leaf level) and keeps a host copy (streams), that
    copy; otherwise the parameter itself (loaded, when read inside an enclosing module's
    forward; in host memory, when offloaded there). The caller moves it to the device it
    computes on."""
    param = getattr(module, name)
    hook = _group_hook(module) if param is not None else None
    host = hook.group.cpu_param_dict.get(param) if hook is not None else None
    return host if host is not None else param


def _groups(root: torch.nn.Module) -> dict[int, object]:
    """id(parameter) -> the offloading group that holds it (group offloading only)."""
    out = {}
    for m in root.modules():
        hook = _group_hook(m)
        if hook is None:
            continue
        group = hook.group
        params = [p for gm in group.modules for p in gm.parameters()] + list(group.parameters)
        for p in params:
            out[id(p)] = group
    return out


class Writer:
    """Writes new values into a module tree's parameters where the offloader restores them
    from. ``Writer(transformer).write("blocks.0.attn2.to_k", "weight", new)``."""

    def __init__(self, root: torch.nn.Module):
        check_writable(root)
        self.named = dict(root.named_modules())
        self.groups = _groups(root)

    def read(self, path: str, name: str = "weight") -> torch.Tensor:
        """The parameter's current values (between forwards: where the offloader keeps them)."""
        return getattr(self.named[path], name).detach()

    @torch.no_grad()
    def write(self, path: str, name: str, value: torch.Tensor) -> None:
        param = getattr(self.named[path], name)
        param.data.copy_(value)  # copy_ crosses devices and casts to the parameter's dtype
        group = self.groups.get(id(param))
        host = group.cpu_param_dict.get(param) if group is not None else None
        if host is not None and host.data_ptr() != param.data_ptr():  # loaded now: its host copy comes back
            host.copy_(value)
