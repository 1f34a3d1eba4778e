"""Closed-form localized unlearning: no training.

In each chosen block, the projections that read only text states ``W`` (cross-attention
``to_k``/``to_v``; the text stream's ``add_k_proj``/``add_v_proj`` in joint blocks) are
replaced by the least-squares solution

    W' = argmin  mean_i |W' c_i - W a_i|^2 + lam * mean_j |W' d_j - W d_j|^2 + mu' |W' - W|^2
       = W (A_ca + lam D + mu' I) (C + lam D + mu' I)^-1

with ``c_i`` the text states the block receives for the prompts with the concept,
``a_i`` the states at the aligned positions of the anchor prompts, ``d_j`` the states
of the prompts to preserve, ``C = mean c c^T``, ``A_ca = mean a c^T``, ``D = mean d d^T``.
The sums of the usual closed-form objective are means here (so ``lam`` weighs the two sets whatever their
sizes) and ``mu' = mu * trace(C + lam D) / dim``, so both weights are scale-free. The
key and value projections of a block read the same states, so one solve per block
serves both.

The states are what the block actually receives, recorded by forward pre-hooks on the
projections during the transformer's own forward: after caption projection and norms
(PixArt/SANA: the same for every timestep and image, so one forward suffices); in
joint blocks the text stream has been updated by the blocks before and modulated by
the timestep, so the states are recorded at several noise levels of the frozen
model's own anchor images.

Positions: a prompt and its anchor prompt are aligned token by token (``difflib`` on
the token ids the transformer's text sequence carries): replaced tokens map in order, first
to first and last to last (one word replaced by a phrase maps to the phrase's last word, its
head: "night" -> "the forest" maps to "forest"), deleted ones (a phrase the anchor drops) map to the token at the deletion point, equal
tokens map to their counterparts. ``positions="changed"`` edits only the replaced and
deleted tokens; ``"all"`` (default) also maps the unchanged context tokens, whose
states a bidirectional text encoder has mixed with the concept.

The pooled path (``pooled=True``; FLUX, SD3): the pooled text vector reaches every block
through the modulation, past every block's text tokens, and carries part of some concepts
(on the toy FLUX, half of a style: docs/joint_attention.md). Its first projection
(``time_text_embed.text_embedder.linear_1``) is solved by the same least squares, one row
per prompt: the prompt's pooled vector ``c`` to its anchor prompt's ``a``, the preserved
prompts' vectors ``d`` kept. That map is shared by all blocks, so this part of the edit is
not localized; it changes nothing but that one projection.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._io import write_json
from ..errors import DitlocError
from ..devices import peak_memory, reset_peak_memory
from ..offload import Writer
from .moments import _Moments
from ..noise import NoiseRule
from .train import EditResult

POSITIONS = ("all", "changed")
PRESERVE_MODES = ("weighted", "nullspace")


@dataclass(frozen=True)
class ClosedFormConfig:
    """How to solve. ``preserve_weight`` is lambda, ``ridge`` mu (relative, see the module doc);
    ``timesteps``: noise levels per anchor image at which joint blocks' text states are
    recorded (families whose text states do not depend on the image use one forward);
    ``batch_size``: prompts per forward; ``gap_fraction``: the share of the best reduction of the
    prediction gap that ``k="gap"`` (``--k gap``) asks of the chosen K."""

    preserve_weight: float = 1.0
    ridge: float = 1e-3
    positions: str = "all"
    timesteps: int = 8  # (anchor image, noise level) draws for joint families
    batch_size: int = 16
    gap_fraction: float = 0.9
    seed: int = 0
    method: str = "closed-form"
    #: "weighted": the least squares above; "nullspace": the edit is confined to the directions
    #: the preserved states do not span (SPEED's constraint), so their keys/values cannot change
    preserve_mode: str = "weighted"
    #: null space: directions of D with eigenvalue below this fraction of the largest count as unspanned
    nullspace_tol: float = 1e-4
    #: also save the edit as a LoRA (truncated SVD of each weight change, relative error <= export_tol)
    export_lora: bool = True
    export_tol: float = 1e-3
    #: also solve the pooled text vector's projection (joint families; see the module doc)
    pooled: bool = False

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise DitlocError(f"positions must be one of {', '.join(POSITIONS)} (got {self.positions!r})")
        if not self.preserve_weight >= 0:
            raise DitlocError(f"--preserve-weight must be >= 0 (got {self.preserve_weight})")
        if not self.ridge > 0:
            raise DitlocError(f"--ridge must be > 0 (got {self.ridge}); it keeps the solve well posed")
        if self.preserve_mode not in PRESERVE_MODES:
            raise DitlocError(f"--preserve-mode must be one of {', '.join(PRESERVE_MODES)} (got {self.preserve_mode!r})")
        if not 0 < self.nullspace_tol < 1:
            raise DitlocError(f"nullspace_tol must be in (0, 1) (got {self.nullspace_tol})")
        if not 0 < self.export_tol < 1:
            raise DitlocError(f"export_tol must be in (0, 1) (got {self.export_tol})")
        if not 0 < self.gap_fraction <= 1:
            raise DitlocError(f"--gap-fraction must be in (0, 1] (got {self.gap_fraction})")
        for name in ("timesteps", "batch_size"):
            if getattr(self, name) < 1:
                raise DitlocError(f"{name} must be >= 1 (got {getattr(self, name)})")

    def to_dict(self) -> dict:
        return asdict(self)


def align(ids: list[int], anchor_ids: list[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(changed, unchanged) position pairs (prompt position, anchor position) from a
    token-level diff of two id sequences."""
    changed, same = [], []
    matcher = difflib.SequenceMatcher(None, ids, anchor_ids, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            same += [(i1 + k, j1 + k) for k in range(i2 - i1)]
        elif tag in ("replace", "delete"):
            m, n = j2 - j1, i2 - i1
            for k in range(n):
                if not m:
                    j = min(j1, len(anchor_ids) - 1)
                elif n == 1:  # one word for a phrase: its head, the phrase's last word ("night" -> "the forest")
                    j = j2 - 1
                else:  # first to first, last to last, evenly between ("at night" -> "in the forest")
                    j = j1 + (k * (m - 1)) // (n - 1)
                changed.append((i1 + k, j))
    return changed, same


def _readable(mask: torch.Tensor | None, row: int, length: int) -> list[bool]:
    if mask is None:  # the family attends every position (FLUX, SD3)
        return [True] * length
    return [bool(v) for v in mask[row, :length].tolist()]


def _nearest_readable(j: int, readable: list[bool]) -> int | None:
    for jj in range(min(j, len(readable) - 1), -1, -1):
        if readable[jj]:
            return jj
    return None


def position_pairs(adapter, prompts, anchors, kw, masks, positions: str) -> list[list[tuple[int, int]]]:
    """Per prompt: the (prompt position, anchor position) rows to edit."""
    out = []
    for i, (p, a) in enumerate(zip(prompts, anchors)):
        ids, aids = adapter.text_token_ids(p, kw), adapter.text_token_ids(a, kw)
        changed, same = align(ids, aids)
        if not changed:
            raise DitlocError(f"prompt {i + 1} ({p!r}) and its anchor prompt ({a!r}) read as the same tokens; "
                              "the anchor must differ where the concept is")
        pc, pa = _readable(masks[0], i, len(ids)), _readable(masks[1], i, len(aids))
        rows = []
        for ci, aj in changed + (same if positions == "all" else []):
            aj = _nearest_readable(aj, pa)
            if pc[ci] and aj is not None:
                rows.append((ci, aj))
        out.append(rows)
    return out


class _Recorder:
    """Forward pre-hooks on each block's first text projection: keep its input."""

    def __init__(self, transformer, modules: dict[str, str]):
        named = dict(transformer.named_modules())
        self.inputs: dict[str, torch.Tensor] = {}
        self.handles = [named[path].register_forward_pre_hook(self._hook(block)) for block, path in modules.items()]

    def _hook(self, block):
        def hook(module, args):
            self.inputs[block] = args[0].detach()

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def record_moments(pipe, adapter, erasures, preserve, kw, config: ClosedFormConfig, *, x0: torch.Tensor,
                   progress=None) -> tuple[dict[str, _Moments], dict]:
    """The moments every block's solve needs, in one pass: per block, the concept/anchor
    position pairs of every erasure whose blocks include it, and the preserved rows of
    `preserve` (every block). -> ({block: moments}, row counts)."""
    blocks = list(dict.fromkeys(b for e in erasures for b in e.blocks))
    projections = {b: adapter.text_projections(b) for b in blocks}  # refuses ineligible blocks
    prompts = [p for e in erasures for p in e.prompts]
    anchors = [a for e in erasures for a in e.anchor_prompts]
    owner = [i for i, e in enumerate(erasures) for _ in e.prompts]  # erasure of each prompt row
    members = {b: {i for i, e in enumerate(erasures) if b in e.blocks} for b in blocks}
    text = {k: v.detach() for k, v in adapter.encode_text(prompts + anchors + list(preserve), kw).items()}
    n, r = len(prompts), len(preserve)
    mask = text.get("mask")
    masks = (mask[:n], mask[n : 2 * n]) if mask is not None else (None, None)
    pairs = position_pairs(adapter, prompts, anchors, kw, masks, config.positions)
    for i, e in enumerate(erasures):
        if not any(pairs[j] for j in range(n) if owner[j] == i):
            raise DitlocError(f"no readable text position differs between the prompts of {e.concept!r} and their "
                              "anchors")
    preserve_rows = [[j for j, ok in enumerate(_readable(mask[2 * n:] if mask is not None else None, i,
                                                          text["embeds"].shape[1])) if ok] for i in range(r)]
    noise = NoiseRule.from_scheduler(pipe.scheduler)
    g = torch.Generator("cpu").manual_seed(config.seed)
    draws = config.timesteps if adapter.text_states_depend_on_image else 1  # draw s: anchor image s mod N
    recorder = _Recorder(pipe.transformer, {b: p[0] for b, p in projections.items()})
    # Cross-attention families give every block the same text states: then each concept's
    # moments are gathered once and added to the sums of its blocks as soon as its last prompt
    # is recorded, so memory holds the blocks' sums and one or two concepts' (checked on the
    # first batch; joint families record per block).
    shared = None if not adapter.text_states_depend_on_image and len(blocks) > 1 else False
    per_concept: dict[int, _Moments] = {}
    last = {i: max(j for j in range(n) if owner[j] == i) for i in set(owner)}
    sums: dict[str, _Moments] = {}

    def fold_finished(upto: int) -> None:
        for i in [i for i in per_concept if last[i] < upto]:
            m = per_concept.pop(i)
            for b in blocks:
                if i in members[b]:
                    if b not in sums:
                        sums[b] = _Moments.combine([m], None)
                    else:
                        sums[b].fold(m)

    keep: _Moments | None = None
    moments: dict[str, _Moments] = {}
    rows_c = rows_d = 0
    try:
        for s in range(draws):
            x_t, t, _ = noise.sample(x0[s % len(x0)][None], g)  # [1, C, h, w], [1]

            def run(index: list[int], x_t=x_t, t=t):
                nonlocal shared
                sub = {k: v[index] for k, v in text.items()}
                b = len(index)
                adapter.denoise(x_t.expand(b, *x_t.shape[1:]), t.expand(b), sub)
                states = dict(recorder.inputs)
                if shared is None:
                    first = next(iter(states.values()))
                    shared = all(torch.equal(first, x) for x in states.values())
                return {"*": next(iter(states.values()))} if shared else states

            for lo in range(0, n, config.batch_size):
                idx = list(range(lo, min(n, lo + config.batch_size)))
                states = run(idx + [i + n for i in idx])
                for block, x in states.items():  # x [2b, L, dim]
                    for k, i in enumerate(idx):
                        if not pairs[i] or (block != "*" and owner[i] not in members[block]):
                            continue
                        m = per_concept.setdefault(owner[i], _Moments(x.shape[-1], x.device)) if block == "*" \
                            else moments.setdefault(block, _Moments(x.shape[-1], x.device))
                        ci = torch.tensor([c for c, _ in pairs[i]], device=x.device)
                        ai = torch.tensor([a for _, a in pairs[i]], device=x.device)
                        m.add_pairs(x[k, ci], x[len(idx) + k, ai])
                rows_c += sum(len(pairs[i]) for i in idx)
                if shared:
                    fold_finished(idx[-1] + 1)
            for lo in range(0, r, config.batch_size):
                idx = list(range(lo, min(r, lo + config.batch_size)))
                states = run([2 * n + i for i in idx])
                for block, x in states.items():
                    if block == "*":
                        keep = keep or _Moments(x.shape[-1], x.device)
                    m = keep if block == "*" else moments.setdefault(block, _Moments(x.shape[-1], x.device))
                    for k, i in enumerate(idx):
                        m.add_preserve(x[k, torch.tensor(preserve_rows[i], device=x.device)])
                rows_d += sum(len(preserve_rows[i]) for i in idx)
            if progress and draws > 1:
                progress(f"recorded text states at noise level {s + 1}/{draws}")
    finally:
        recorder.close()
    if shared:
        fold_finished(n)
        for m in sums.values():  # every block reads the same preserved states: one D, shared
            m.D, m.nd = (keep.D, keep.nd) if keep is not None else (torch.zeros_like(m.C), 0)
        moments = {b: sums[b] for b in blocks if b in sums}
    return moments, {"concept": rows_c, "preserve": rows_d, "draws": draws}


@torch.no_grad()
def pooled_moments(adapter, erasures, preserve, kw) -> _Moments:
    """The moments of the pooled projection's solve: each prompt's pooled text vector paired
    with its anchor prompt's, and the preserved prompts' vectors."""
    prompts = [p for e in erasures for p in e.prompts]
    anchors = [a for e in erasures for a in e.anchor_prompts]
    pooled = adapter.encode_text(prompts + anchors + list(preserve), kw)["pooled"].detach()  # [2n + r, D]
    n = len(prompts)
    m = _Moments(pooled.shape[-1], pooled.device)
    m.add_pairs(pooled[:n], pooled[n : 2 * n])
    if len(pooled) > 2 * n:
        m.add_preserve(pooled[2 * n :])
    return m


def solve_moments(moments: dict[str, _Moments], config: ClosedFormConfig) -> dict[str, torch.Tensor]:
    """{block: M} with W' = W M for every projection of the block: one factorization per
    block serves its keys, values and every concept (weighted least squares or the
    null-space variant, ``config.preserve_mode``)."""
    if config.preserve_mode == "nullspace":
        projectors: dict[int, torch.Tensor] = {}  # blocks that share the preserved moments share P
        out = {}
        for b, m in moments.items():
            if id(m.D) not in projectors:
                projectors[id(m.D)] = m.null_projector(config.nullspace_tol)
            out[b] = m.solve_nullspace(config.ridge, config.nullspace_tol, projectors[id(m.D)])
        return out
    return {b: m.solve(config.preserve_weight, config.ridge) for b, m in moments.items()}


@torch.no_grad()
def closed_form_unlearn(pipe, adapter, erasures, preserve, kw, config: ClosedFormConfig, *,
                        x0: torch.Tensor | None, out: Path | None, progress=None, details: dict | None = None,
                        model: str | None = None, gap_fraction: float | None = None,
                        probe_x0: torch.Tensor | None = None) -> EditResult:
    """Rewrite the text projections of every erasure's blocks in place (see the module
    doc): each block is solved once, jointly for every concept whose blocks include it,
    with the preserved prompts `preserve`. With `out`, save the changed weights
    (``blocks.safetensors``, loaded by ``load_edit``), the same edit as a low-rank LoRA
    (:func:`~ditloc.edit.lora.save_weight_delta`; ``config.export_lora``) and
    ``ditloc_edit.json``. `x0`: latents [N, C, h, w] the text states are recorded on (the
    anchor images for joint families; any latents otherwise).

    `gap_fraction` (``k="gap"``; e.g. 0.9; one erasure only): its `blocks` are a ranking, best
    first; every block is solved, and the edit keeps the smallest top K that achieves
    `gap_fraction` of the largest reduction any K achieves in the gap between the model's
    prediction for the prompts and the unedited model's for the anchors (mean squared,
    relative to the unedited gap, on noisy versions of `probe_x0`, the frozen model's anchor
    images; :func:`prediction_gaps`). Every K's gap is in ``details["k_gaps"]``."""
    t0 = time.perf_counter()
    transformer = pipe.transformer
    erasures = list(erasures)
    if gap_fraction is not None and len(erasures) != 1:
        raise DitlocError("--k gap measures one concept's edit; erase several concepts with --k N or --k auto")
    weights = Writer(transformer)  # refuses weights offloading keeps out of memory, before any work
    pooled_path = adapter.pooled_projection() if config.pooled else None  # refused before any work
    device = pipe._execution_device  # where the solve runs; offloaded weights may live elsewhere
    reset_peak_memory(device)
    moments, rows = record_moments(pipe, adapter, erasures, preserve, kw, config, x0=x0, progress=progress)
    t_solve = time.perf_counter()
    factors = solve_moments(moments, config)
    solved: dict[str, dict[str, torch.Tensor]] = {}  # block -> path -> new weight
    fit = {}
    for block, M in factors.items():
        solved[block] = {}
        for path in adapter.text_projections(block):
            w = weights.read(path)  # [out, dim], wherever offloading keeps it
            fit[path] = _fit(moments[block], M, w)
            solved[block][path] = (w.to(M.device, M.dtype) @ M).to(w.dtype)  # on the solve's device
    original, changed = {}, {}
    if pooled_path is not None:  # in place before K is chosen: each K's edit is measured with it
        pm = pooled_moments(adapter, erasures, preserve, kw)
        M = solve_moments({"pooled": pm}, config)["pooled"]
        w = weights.read(pooled_path)
        fit[pooled_path] = _fit(pm, M, w)
        rows["pooled"] = pm.nc
        original[f"{pooled_path}.weight"] = w.cpu().clone()
        new = (w.to(M.device, M.dtype) @ M).to(w.dtype)
        weights.write(pooled_path, "weight", new)
        changed[f"{pooled_path}.weight"] = new.cpu().contiguous()
    solve_seconds = time.perf_counter() - t_solve
    extra = {}
    if gap_fraction is not None:
        e = erasures[0]
        gaps = prediction_gaps(pipe, adapter, list(e.blocks), solved, list(e.prompts), list(e.anchor_prompts),
                               text_fn=lambda p: adapter.encode_text(p, kw), x0=probe_x0, seed=config.seed,
                               weights=weights)
        best = max(1.0 - gap for gap in gaps)
        k = next(i + 1 for i, gap in enumerate(gaps) if 1.0 - gap >= gap_fraction * best)
        extra = {"gap_fraction": gap_fraction, "k_gaps": {b: g for b, g in zip(e.blocks, gaps)}}
        if progress:
            progress(f"K by the prediction gap = {k}: gap to the anchor "
                     + ", ".join(f"K={i + 1} {g:.3f}" for i, g in enumerate(gaps)))
        erasures = [e.with_blocks(e.blocks[:k])]
        solved = {b: solved[b] for b in erasures[0].blocks}
        fit = {p: f for p, f in fit.items() if p == pooled_path or any(p in ps for ps in solved.values())}
    blocks = list(dict.fromkeys(b for e in erasures for b in e.blocks))  # each concept's blocks, best first
    for block in blocks:
        for path, new in solved[block].items():
            original[f"{path}.weight"] = weights.read(path).cpu().clone()
            weights.write(path, "weight", new)
            changed[f"{path}.weight"] = new.detach().cpu().contiguous()
    wall = time.perf_counter() - t0
    concepts = [{**e.to_dict(), "prompts": len(e.prompts)} for e in erasures]
    for c in concepts:
        c.pop("anchor_prompts")
    result = EditResult(
        kind="unlearn",
        model=model or type(pipe).__name__,
        blocks=tuple(blocks),
        config={**config.to_dict(),
                "projections": [p for b in blocks for p in solved[b]] + ([pooled_path] if pooled_path else [])},
        trainable_parameters=sum(v.numel() for v in changed.values()),
        total_parameters=sum(p.numel() for p in transformer.parameters()),
        steps=0,
        losses=(),
        wall_seconds=wall,
        peak_memory_bytes=peak_memory(device),
        details={**(details or {}), "concepts": [*(details or {}).get("concepts", concepts)],
                 "rows": rows, "fit": fit, "solve_seconds": solve_seconds, **extra},
        out_dir=str(out) if out is not None else None,
    )
    if out is not None:
        from safetensors.torch import save_file

        from .files import BLOCKS_FILE, RESULT_FILE
        from .lora import save_weight_delta

        save_file(changed, str(out / BLOCKS_FILE), metadata={"ditloc": "closed-form unlearning"})
        if config.export_lora:
            deltas = {k.removesuffix(".weight"): changed[k].double() - original[k].double() for k in changed}
            result.details["lora_export"] = save_weight_delta(pipe, out, deltas, tol=config.export_tol)
        write_json(out / RESULT_FILE, result.to_dict())
    if progress:
        worst = max(f["concept_residual"] for f in fit.values())
        drift = max((f.get("preserve_change", 0.0) for f in fit.values()), default=0.0)
        also = " and the pooled projection" if pooled_path else ""
        progress(f"solved {len(blocks)} block(s){also} for {len(erasures)} concept(s) in {solve_seconds:.1f}s: "
                 f"concept rows keep at most {worst:.1%} of their distance to the anchor; preserved rows move at "
                 f"most {drift:.2%}")
    return result


@torch.no_grad()
def prediction_gaps(pipe, adapter, ranking, solved, prompts, anchors, *, text_fn, x0, seed=0, draws=4,
                    max_prompts=16, weights: Writer | None = None) -> list[float]:
    """For K = 1 .. len(ranking): the mean squared distance between the model's
    prediction for the prompts with the top-K blocks edited (`solved`) and the unedited
    model's prediction for the anchor prompts, relative to the unedited distance.
    Measured on `draws` noisy versions (the scheduler's own noising, seeded) of each of
    `x0`'s latents, up to `max_prompts` prompt pairs; the weights are restored after (written
    through `weights`, see :class:`ditloc.offload.Writer`)."""
    weights = weights or Writer(pipe.transformer)
    original = {p: weights.read(p).clone() for b in ranking for p in solved[b]}
    n = min(len(prompts), max_prompts)
    text = {k: v.detach() for k, v in text_fn(list(prompts[:n]) + list(anchors[:n])).items()}
    concept_text = {k: v[:n] for k, v in text.items()}
    anchor_text = {k: v[n:] for k, v in text.items()}
    noise = NoiseRule.from_scheduler(pipe.scheduler)
    g = torch.Generator("cpu").manual_seed(seed)
    inputs = []
    for d in range(draws):
        x = x0[torch.arange(n) % len(x0)]  # [n, C, h, w]
        x_t, t, _ = noise.sample(x, g)
        inputs.append((x_t, t))
    predict = lambda text_: [adapter.denoise(x_t, t, text_).float() for x_t, t in inputs]
    target = predict(anchor_text)
    distance = lambda preds: sum((c - a).pow(2).mean() for c, a in zip(preds, target))
    base = distance(predict(concept_text))
    gaps = []  # device scalars: one transfer at the end
    try:
        for k in range(1, len(ranking) + 1):
            for path, new in solved[ranking[k - 1]].items():
                weights.write(path, "weight", new)
            gaps.append(distance(predict(concept_text)) / base.clamp_min(1e-30))
    finally:
        for path, w in original.items():
            weights.write(path, "weight", w)
    return torch.stack(gaps).tolist()


def _fit(m: _Moments, M: torch.Tensor, w: torch.Tensor) -> dict:
    """How well the solve meets its two aims for a projection `w` (before the edit):
    the concept rows' mean squared distance to their anchors' outputs, relative to
    before (``|W' c - W a|^2 / |W c - W a|^2``), and the preserved rows' mean squared
    change relative to their mean squared output (``|W' d - W d|^2 / |W d|^2``)."""
    w = w.to(M.device, M.dtype)
    C, A, AA = m.C / m.nc, m.A / m.nc, m.AA / m.nc

    def energy(S):  # mean |W x|^2 for second moment S of x
        return float(torch.trace(w @ S @ w.T))

    before = energy(C - A.T - A + AA)
    after = energy(M @ C @ M.T - M @ A.T - A @ M.T + AA)
    out = {"concept_residual": after / before if before > 0 else 0.0}
    if m.nd:
        D = m.D / m.nd
        E = M - torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
        out["preserve_change"] = energy(E @ D @ E.T) / max(energy(D), 1e-30)
    return out
