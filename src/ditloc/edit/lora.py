"""LoRA adapters placed only in chosen blocks (peft), saved in diffusers' format.

Targets are explicit full module names (``transformer_blocks.3.attn2.to_q``),
never index patterns: peft matches a list of names exactly, whatever its
version. Every check runs before the model is touched, and a fresh adapter is
an exact no-op (peft's default init: B = 0).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import DitlocError
from .files import LORA_FILE as WEIGHT_NAME

ADAPTER_NAME = "ditloc"


@dataclass(frozen=True)
class LoraSpec:
    """Where and how big: ``targets`` are full module names in the transformer."""

    blocks: tuple[str, ...]
    targets: tuple[str, ...]
    rank: int = 4
    alpha: float | None = None  # None -> rank (scale 1)

    def config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            target_modules=list(self.targets),
            init_lora_weights=True,  # A random, B = 0: an exact no-op until trained
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "blocks": list(self.blocks), "targets": list(self.targets)}


def lora_targets(adapter, blocks, suffixes=None) -> list[str]:
    """Full module names of the LoRA targets inside `blocks` (block names, e.g.
    ``block.3``). `suffixes`: module names relative to a block; default the
    adapter's (attention projections and feed-forward)."""
    blocks = adapter.resolve_blocks(blocks)
    if not blocks:
        raise DitlocError("no blocks chosen for LoRA; pass block names, 'all' or --blocks auto")
    suffixes = tuple(suffixes or adapter.lora_suffixes)
    if not suffixes:
        raise DitlocError(f"no default LoRA targets for {adapter.family}; pass target module suffixes")
    out, matched = [], set()
    for block in blocks:
        path = adapter.block_path(block)
        inner = dict(adapter.block_module(block).named_modules())
        for suffix in suffixes:
            module = inner.get(suffix)
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                out.append(f"{path}.{suffix}")
                matched.add(suffix)
    missing = [s for s in suffixes if s not in matched]
    if not out or (suffixes != tuple(adapter.lora_suffixes) and missing):
        raise DitlocError(
            f"LoRA target(s) {missing} match no Linear/Conv2d module in {blocks[0]}"
            f" (e.g. {', '.join(sorted(n for n, m in adapter.block_module(blocks[0]).named_modules() if isinstance(m, torch.nn.Linear))[:6])})"
        )
    return out


def add_lora(transformer: torch.nn.Module, spec: LoraSpec, adapter_name: str = ADAPTER_NAME,
             seed: int = 0, upcast: bool = False) -> list[str]:
    """Inject LoRA into exactly `spec.targets`; freezes everything else.
    Returns the names of the trainable parameters. ``A`` is drawn as peft draws
    it (Kaiming-uniform) but from a generator seeded with `seed`, not from the
    global RNG, so the same seed gives the same adapter; ``B = 0``, so the adapted model computes
    exactly what the frozen model does (freezing alone can move the last bit of a matmul on some
    BLAS builds: PyTorch picks mm or bmm by whether the weight requires grad).
    `upcast`: the adapter in float32 over a bf16/fp16 base (mixed precision; peft's
    ``cast_adapter_dtype``), before ``A`` is drawn."""
    from peft import inject_adapter_in_model

    if spec.rank < 1:
        raise DitlocError(f"--lora-rank must be >= 1 (got {spec.rank})")
    modules = dict(transformer.named_modules())
    absent = [t for t in spec.targets if t not in modules]
    if absent:
        raise DitlocError(f"LoRA target {absent[0]!r} is not a module of the transformer")
    if any(hasattr(modules[t], "lora_A") for t in spec.targets):
        raise DitlocError("the transformer already carries LoRA layers; load a fresh pipeline")
    transformer.requires_grad_(False)
    inject_adapter_in_model(spec.config(), transformer, adapter_name=adapter_name)
    if upcast:
        from peft.tuners.tuners_utils import cast_adapter_dtype

        cast_adapter_dtype(transformer, adapter_name, autocast_adapter_dtype=True)
    names = [n for n, p in transformer.named_parameters() if "lora_" in n]
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_A" in n:
                w = torch.empty(p.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
                p.copy_(w)
    return names


def lora_state_dict(transformer: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict:
    """peft-format LoRA tensors without the adapter name (``...to_q.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in
            get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()}


def save_lora(pipe, directory, state_dict: dict, spec: LoraSpec) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` as diffusers writes it (keys
    ``transformer.<module>.lora_A.weight``, LoRA config in the header), through
    the pipeline's own ``save_lora_weights`` where the family has one."""
    from peft import LoraConfig

    directory = Path(directory)
    metadata = spec.config().to_dict()
    metadata = json.loads(json.dumps(metadata, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    LoraConfig(**{k: v for k, v in metadata.items() if k in LoraConfig.__dataclass_fields__})  # round-trips
    _write_lora(pipe, directory, state_dict, metadata)
    return directory / WEIGHT_NAME


def _write_lora(pipe, directory: Path, state_dict: dict, metadata: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(type(pipe), "save_lora_weights"):
        type(pipe).save_lora_weights(
            directory, transformer_lora_layers=state_dict, weight_name=WEIGHT_NAME,
            transformer_lora_adapter_metadata=metadata,
        )
    else:  # the pipeline has no LoRA loader in diffusers: same file format
        from diffusers.loaders.lora_base import LoraBaseMixin

        packed = {f"transformer.{k}": v for k, v in state_dict.items()}
        LoraBaseMixin.write_lora_layers(
            packed, str(directory), True, WEIGHT_NAME, None, True,
            {f"transformer.{k}": v for k, v in metadata.items()},
        )


def read_lora(directory) -> tuple[dict, dict]:
    """(tensors without the ``transformer.`` prefix, LoRA config dict) from a saved adapter."""
    from safetensors import safe_open

    path = Path(directory)
    path = path / WEIGHT_NAME if path.is_dir() else path
    if not path.exists():
        raise DitlocError(f"{path} not found; pass the directory `ditloc personalize/unlearn --out` wrote")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys() if k.startswith("transformer.")}
    raw = json.loads(header.get("lora_adapter_metadata", "{}"))
    config = {k.removeprefix("transformer."): v for k, v in raw.items() if k.startswith("transformer.")}
    return tensors, config


def load_lora(pipe, directory, adapter_name: str = ADAPTER_NAME) -> None:
    """Load a saved adapter into `pipe`: ``pipe.load_lora_weights`` where diffusers
    has a loader for the pipeline; otherwise the same file is injected with peft directly.
    A pipeline that already holds an adapter of this name is refused (loading twice
    would stack two edits)."""
    if adapter_name in (getattr(pipe.transformer, "peft_config", None) or {}):
        raise DitlocError(f"this pipeline already has an edit loaded as {adapter_name!r}; load the edit into a "
                          "freshly loaded pipeline (or pass another adapter_name to combine edits on purpose)")
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(directory), weight_name=WEIGHT_NAME, adapter_name=adapter_name)
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    tensors, config = read_lora(directory)
    if not config:
        raise DitlocError(f"{directory}: the LoRA file carries no adapter config")
    fields = LoraConfig.__dataclass_fields__
    cfg = LoraConfig(**{k: v for k, v in config.items() if k in fields})
    inject_adapter_in_model(cfg, pipe.transformer, adapter_name=adapter_name)
    result = set_peft_model_state_dict(pipe.transformer, tensors, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise DitlocError(f"{directory}: LoRA tensors {unexpected[:3]} match no module of this transformer")


def factorize(delta: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B [out, r], A [r, in], relative error) of the truncated SVD of `delta` at the
    smallest rank r whose Frobenius error relative to |delta| is at most `tol`."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    energy = s.pow(2)
    total = float(energy.sum())
    if total == 0:
        return u[:, :0], vh[:0], 0.0
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[r] = sum_{i >= r} s_i^2
    ok = torch.nonzero(torch.cat([tail[1:], tail.new_zeros(1)]) <= (tol ** 2) * total)
    r = int(ok[0]) + 1
    error = (float(tail[r]) / total) ** 0.5 if r < len(s) else 0.0
    return u[:, :r] * s[:r], vh[:r], error


def save_weight_delta(pipe, directory, deltas: dict[str, torch.Tensor], tol: float = 1e-3) -> dict:
    """Save weight changes ``{module path: W' - W}`` as a LoRA that plain diffusers loads
    (``pipe.load_lora_weights``): each factorized by :func:`factorize` at its own rank
    (peft ``rank_pattern``; alpha = rank, so the scale is 1). Returns the record
    ``{path: {"rank", "error"}}`` (and writes nothing when every change is zero)."""
    from peft import LoraConfig

    state, ranks, record = {}, {}, {}
    for path, delta in deltas.items():
        module = dict(pipe.transformer.named_modules())[path]
        b, a, error = factorize(delta, tol)
        if b.shape[1] == 0:
            continue
        dtype = module.weight.dtype
        state[f"{path}.lora_A.weight"] = a.to(dtype).contiguous()
        state[f"{path}.lora_B.weight"] = b.to(dtype).contiguous()
        ranks[path] = b.shape[1]
        record[path] = {"rank": b.shape[1], "error": error}
    if not state:
        return record
    r = max(ranks.values())
    config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=dict(ranks),
                        alpha_pattern=dict(ranks), init_lora_weights=True)
    metadata = json.loads(json.dumps(config.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    _write_lora(pipe, Path(directory), state, metadata)
    return record
