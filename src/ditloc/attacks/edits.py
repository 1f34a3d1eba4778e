"""The erasure under attack: read and check an edit folder (no model needed), and apply it to a
pipeline for the length of a `with` block, restoring the pipeline exactly afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..edit.files import BLOCKS_FILE, LORA_FILE, RESULT_FILE
from ..errors import DitlocError


@dataclass(frozen=True)
class EditInfo:
    """An edit folder: its path, its record (`ditloc_edit.json`), the concepts it erased and the
    sha256 of its weight files (a replay checks the folder still holds the same edit)."""

    path: str
    record: dict = field(repr=False)
    erased: tuple[str, ...]
    files: dict

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.record.get("kind"), "method": self.record.get("config", {}).get("method"),
                "blocks": self.record.get("blocks"), "erased": list(self.erased), "files": dict(self.files)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def erased_concepts(record: dict) -> list[str]:
    """The concepts an unlearning record erased (one, or each of several)."""
    details = record.get("details") or {}
    names = [c.get("concept") for c in details.get("concepts") or [] if isinstance(c, dict)]
    if details.get("concept"):
        names.append(details["concept"])
    return list(dict.fromkeys(str(n) for n in names if n))


def read_edit(directory) -> EditInfo:
    """The edit `ditloc unlearn --out` wrote in `directory`; refused in one line when it is not one."""
    d = Path(directory)
    if not d.is_dir():
        raise DitlocError(f"--edit {d} is not a directory; pass the --out folder of `ditloc unlearn`")
    weights = [name for name in (BLOCKS_FILE, LORA_FILE) if (d / name).is_file()]
    if not weights:
        raise DitlocError(f"--edit {d} holds no edit ({BLOCKS_FILE} or {LORA_FILE}); pass the --out folder of a "
                          "finished `ditloc unlearn`")
    if not (d / RESULT_FILE).is_file():
        raise DitlocError(f"--edit {d} has no {RESULT_FILE}, so what it erased is unknown; pass the --out folder "
                          "of `ditloc unlearn`")
    try:
        record = json.loads((d / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DitlocError(f"cannot read {d / RESULT_FILE}: {e}") from None
    if record.get("kind") != "unlearn":
        raise DitlocError(f"--edit {d} holds a {record.get('kind') or 'unknown'} edit, not an erasure; attack the "
                          "output of `ditloc unlearn`")
    # the file load_edit reads (it prefers the exact blocks), hashed
    used = weights[0]
    return EditInfo(str(d.resolve()), record, tuple(erased_concepts(record)), {used: _sha256(d / used)})


def check_erased(info: EditInfo, concept: str) -> None:
    """`concept` must be one the edit erased (case and spacing aside)."""
    key = " ".join(concept.lower().split())
    if key not in {" ".join(c.lower().split()) for c in info.erased}:
        erased = ", ".join(repr(c) for c in info.erased) or "no concept"
        raise DitlocError(f"the edit in {info.path} erased {erased}, not {concept!r}; attack a concept it erased")


def check_unchanged(info: EditInfo) -> None:
    """The edit folder still holds the weights an attack was run against (before a replay)."""
    for name, digest in info.files.items():
        path = Path(info.path) / name
        if not path.is_file() or _sha256(path) != digest:
            raise DitlocError(f"{path} changed since the attack ran; replay needs the same edit")


@contextlib.contextmanager
def applied(pipe, info: EditInfo):
    """`pipe` with the edit loaded (``ditloc.edit.load_edit``) inside the block; on exit the
    transformer's changed weights are put back (full blocks) or the LoRA layers removed, so the
    pipeline leaves exactly as it came in."""
    from ..edit import load_edit
    from ..edit.lora import ADAPTER_NAME

    transformer = pipe.transformer
    path = Path(info.path)
    if BLOCKS_FILE in info.files:
        from safetensors import safe_open

        with safe_open(str(path / BLOCKS_FILE), framework="pt") as f:
            names = list(f.keys())
        state = transformer.state_dict()
        saved = {k: state[k].detach().clone() for k in names if k in state}
        try:
            load_edit(pipe, path)
            yield
        finally:
            with torch.no_grad():
                params = dict(transformer.named_parameters())
                buffers = dict(transformer.named_buffers())
                for k, v in saved.items():
                    (params.get(k) if k in params else buffers[k]).copy_(v)
        return
    had = dict(getattr(transformer, "peft_config", None) or {})
    try:
        load_edit(pipe, path)
        yield
    finally:
        _remove_lora(pipe, ADAPTER_NAME, had)


def _remove_lora(pipe, adapter_name: str, had: dict) -> None:
    """Take the LoRA `adapter_name` out again: with no LoRA before it, every peft layer goes back to
    its base layer; otherwise only this adapter is deleted from them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    transformer = pipe.transformer
    if had:
        for module in transformer.modules():
            if isinstance(module, BaseTunerLayer) and adapter_name in module.lora_A:
                module.delete_adapter(adapter_name)
        transformer.peft_config.pop(adapter_name, None)
        return
    if hasattr(pipe, "unload_lora_weights"):
        pipe.unload_lora_weights()
        return
    for name, module in list(transformer.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent) if parent else transformer, child, module.get_base_layer())
    if hasattr(transformer, "peft_config"):
        del transformer.peft_config
