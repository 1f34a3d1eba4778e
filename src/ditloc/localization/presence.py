"""The presence of a concept under sets of withheld blocks.

For each block set S, every (prompt, seed) is generated with the concept withheld
from the blocks of S (they read the clean prompt, all others the prompt) and the
concept's presence in each image is scored *soft*: an evaluator's probability or
score, or the model's own judgement (`objective="self"`, `ditloc.localization.judge`).
Several sets run as rows of one pipeline call: image g·n + j of a call withholds set
g (`Swap.row_masks`), so a call of G sets costs one generation of G·n images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine import CausalProbe, Session, StepSwaps, instrument
from .. import registry
from ..errors import DitlocError
from ..options import RunOptions, as_prompt_list, as_seed_list, chunks, model_record
from ..scope import check_steps, head_counts, head_masks, resolve_heads, resolve_steps
from .judge import SelfJudge, normalise

OBJECTIVES = ("evaluator", "self")
#: images of one presence call (block sets x samples), unless `block_batch` says otherwise
PRESENCE_IMAGES = 64


def default_evaluator(pipe):
    """The evaluator a pipeline has without being given one: the oracle of a toy model (any
    model `ditloc.registry` knows with an evaluator), None for any other (pass one, or use the
    self objective)."""
    return registry.default_evaluator(pipe)


@dataclass(frozen=True)
class SetPresence:
    """Presence of one concept per block set and image.

    `per_image` [sets, samples] (samples: prompt x seed, prompt-major): soft presence of
    each image (an evaluator's score, or for the self objective the model's judgement
    scaled so the unedited images' mean reads 1 and the clean prompt's 0). `sets[0]` is
    the empty set: the unedited baseline.
    """

    concept: str
    sets: tuple[tuple[str, ...], ...]
    per_image: np.ndarray  # [sets, samples]
    objective: str
    settings: dict = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        """[sets] mean presence."""
        return self.per_image.mean(axis=1)

    @property
    def baseline(self) -> float:
        return float(self.mean[0])

    def of(self, blocks) -> float:
        """Mean presence with `blocks` withheld."""
        key = frozenset(blocks)
        for s, m in zip(self.sets, self.mean):
            if frozenset(s) == key:
                return float(m)
        raise DitlocError(f"block set {sorted(key)} was not measured")

    def to_dict(self) -> dict:
        return {"concept": self.concept, "objective": self.objective, "sets": [list(s) for s in self.sets],
                "mean": self.mean.tolist(), "per_image": self.per_image.tolist(), "settings": self.settings}


class PresenceRunner:
    """Presence of one concept for any block set, on fixed prompts, seeds and settings:
    what `presence` and the set-level search share. Everything is checked on
    construction, before any image is generated.

    `raw(sets)` returns per-image raw values [sets, samples] (evaluator scores, or the
    judge's q), computed for the sets not yet known and cached by set.
    """

    def __init__(self, pipe, prompts, concept: str, *, objective: str = "evaluator", evaluator=None,
                 eval_text: str | None = None, clean_prompts=None, seed=0, block_batch: int | None = None,
                 batch_size: int | None = None, pooled: str | None = None, options: RunOptions | None = None,
                 judge_seed: int = 0, heads=None, steps=None, **run):
        from ..text import clean_prompt_list

        if objective not in OBJECTIVES:
            raise DitlocError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        for name, value in (("block_batch", block_batch), ("batch_size", batch_size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise DitlocError(f"{name} must be a positive integer, got {value!r}")
        if pooled not in (None, "clean", "full"):
            raise DitlocError(f"pooled must be 'clean' or 'full', got {pooled!r}")
        self.pipe = pipe
        self.concept = concept
        self.objective = objective
        self.prompts, self.seeds = as_prompt_list(prompts), as_seed_list(seed)
        self.resolved = RunOptions.of(options, **run).resolve(pipe)
        self.adapter, self.kw = self.resolved.adapter, self.resolved.call_kwargs
        for p in self.prompts:  # the concept must be readable by the model (validates before any work)
            self.adapter.concept_span(p, concept, self.kw)
        self.clean = clean_prompt_list(self.prompts, concept, clean_prompts)
        self.names = self.adapter.block_names()
        #: block -> the heads a set withholds it in (blocks not in it: every head); the steps it is withheld at
        self.heads = resolve_heads(self.adapter, self.names, heads)
        self.steps = resolve_steps(steps)
        check_steps(self.steps, int(self.resolved.effective("num_inference_steps")))
        if objective == "self" and (self.heads or self.steps is not None):
            raise DitlocError("heads= and steps= need objective='evaluator': the self objective's clean-prompt "
                              "reference withholds every block in every head at every step")
        self.samples = [(i, s) for i in range(len(self.prompts)) for s in self.seeds]
        self.pooled = pooled
        self.block_batch = block_batch
        self.batch_size = batch_size
        self.evaluator = None
        self.eval_text = None
        self.judge = None
        from ..processes import current

        self.processes = current(pipe._execution_device)  # one, or those accelerate launch started
        if objective == "evaluator":
            self.evaluator = evaluator if evaluator is not None else default_evaluator(pipe)
            if self.evaluator is None:
                raise DitlocError("no evaluator for this model: pass evaluator= (e.g. ditloc.evaluate.get_evaluator"
                                  "('clip')) or use objective='self' (the model judges itself)")
            self.eval_text = self.evaluator.check_text(eval_text if eval_text is not None else concept)
            height = self.kw.get("height") or self.adapter.image_size()[0]
            width = self.kw.get("width") or self.adapter.image_size()[1]
            self.evaluator.check_image_size(int(width), int(height))
        else:
            self.judge = SelfJudge(self.adapter, seed=judge_seed)
        self._raw: dict[frozenset, np.ndarray] = {}
        self._gradient: dict[frozenset, np.ndarray] = {}
        #: conditional attribution's objective: the evaluator's presence in the predicted clean image
        #: where the evaluator is differentiable, else (None) the prediction's move toward the clean prompt's
        self.gradient_objective = None
        if self.evaluator is not None and self.evaluator.differentiable:
            from .gradient import PredictedPresence

            self.gradient_objective = PredictedPresence(self.adapter, self.evaluator, self.eval_text)
        self.gradient_steps = None  # the steps attribution is measured at (None: every step)
        self.gradient_gate = 0.0  # the gates of the blocks outside a set where its attribution is taken
        self.generations = 0  # images generated, in units of one generation of all samples (resumed ones included)
        self.gradient_generations = 0  # of which generated with conditional attribution
        self.seconds = 0.0

    # ---- sets ---------------------------------------------------------------------------
    def check_sets(self, sets) -> list[frozenset]:
        return [frozenset(self.adapter.resolve_blocks(s if isinstance(s, str) else list(s))) if s else frozenset()
                for s in sets]

    def evaluated_sets(self) -> list[frozenset]:
        """Every block set scored so far (the clean-prompt reference of the self objective excluded)."""
        extra = self.references()[1:]
        return [s for s in self._raw if s not in extra]

    def known(self, blocks) -> bool:
        return frozenset(blocks) in self._raw

    def remember(self, blocks, values, gradient=None) -> None:
        """A set's raw per-image values (and its conditional attribution), from a store (resume).
        Counted among the generations as the run that generated it counted it, so a resumed
        search records the cost of an uninterrupted one."""
        self._raw[frozenset(blocks)] = np.asarray(values, dtype=np.float64)
        self.generations += 1
        if gradient is not None:
            self._gradient[frozenset(blocks)] = np.asarray(gradient, dtype=np.float64)
            self.gradient_generations += 1

    def raw(self, sets, on_set=None, gradient=False) -> np.ndarray:
        """[len(sets), samples] raw values; `on_set(blocks, values, gradient)` after each new set.
        `gradient`: also measure the conditional attribution (:meth:`gradient`) of every set
        (True) or of the sets it holds (a collection of sets).

        Under ``accelerate launch`` the pipeline calls are dealt round-robin to the processes
        and every process receives every result: each call is the one a single process
        makes, so the values are the single-process values."""
        sets = [frozenset(s) for s in sets]
        ranked = set(sets) if gradient is True else {frozenset(s) for s in (gradient or ())}
        if ranked and (self.heads or self.steps is not None):
            raise DitlocError("conditional attribution gates whole blocks at every step; measure it without "
                              "heads= and steps=")
        todo_ranked = list(dict.fromkeys(s for s in sets if s in ranked and s not in self._gradient))
        todo = list(dict.fromkeys(s for s in sets if s not in ranked and s not in self._raw))
        per_call = self.block_batch or max(1, PRESENCE_IMAGES // len(self.samples))
        calls = [(group, True) for group in chunks(todo_ranked, per_call)] + \
                [(group, False) for group in chunks(todo, per_call)]
        procs = self.processes
        start = time.perf_counter()
        mine = [(i, [(sorted(b), v.tolist(), None if g is None else g.tolist())
                     for b, v, g in self._measure(group, grad)])
                for i, (group, grad) in enumerate(calls) if i % procs.world == procs.rank]
        results = dict(procs.gather(mine))  # call index -> [(blocks, values, attribution)]
        self.seconds += time.perf_counter() - start
        for i, (group, grad) in enumerate(calls):
            self.generations += len(group)
            self.gradient_generations += len(group) if grad else 0
            for blocks, values, attribution in results[i]:
                blocks, values = frozenset(blocks), np.asarray(values, dtype=np.float64)
                attribution = None if attribution is None else np.asarray(attribution, dtype=np.float64)
                self._raw[blocks] = values
                if attribution is not None:
                    self._gradient[blocks] = attribution
                if on_set is not None:
                    on_set(blocks, values, attribution)
        return np.stack([self._raw[s] for s in sets])

    def gradient(self, blocks) -> dict[str, float]:
        """Conditional attribution at a measured set: for every block, the
        first-order effect of withholding the concept from it too, given `blocks` withheld:
        d m / d g_b at the set's gates, m the move of the model's prediction toward the clean
        prompt's (`ditloc.engine.causal`), summed over the steps, averaged over the images."""
        return dict(zip(self.names, self._gradient[frozenset(blocks)].mean(axis=1).tolist()))

    def gradient_per_image(self, blocks) -> np.ndarray | None:
        """[blocks, samples] the attribution of :meth:`gradient` per image (None: not measured)."""
        return self._gradient.get(frozenset(blocks))

    def presence(self, sets, on_set=None, gradient: bool = False) -> np.ndarray:
        """[len(sets), samples] presence: evaluator scores, or the judge's q normalised by the
        unedited (empty set) and clean-prompt (every block, pooled text clean) images.
        `gradient`: as for :meth:`raw`."""
        sets = [frozenset(x) for x in sets]
        values = self.raw(sets + self.references(), on_set, sets if gradient is True else gradient)
        if self.objective == "evaluator":
            return values[: len(sets)]
        q_full, q_clean = values[len(sets)].mean(), values[len(sets) + 1].mean()
        return normalise(values[: len(sets)], q_full, q_clean)

    def references(self) -> list[frozenset]:
        """Sets every presence needs: the baseline, and for the self objective the clean prompt."""
        return [frozenset()] + ([frozenset(self.names)] if self.objective == "self" else [])

    # ---- generation -------------------------------------------------------------------
    def _measure(self, group: list[frozenset], gradient: bool = False):
        """Generate every sample with each set of `group` withheld (set-major rows of one call
        per chunk of samples) and score it: yields (set, values [samples], conditional
        attribution [blocks] or None)."""
        adapter, kw = self.adapter, self.kw
        out: dict[frozenset, list[np.ndarray]] = {s: [] for s in group}
        grads: dict[frozenset, list[torch.Tensor]] = {s: [] for s in group}
        session = Session()
        with instrument(adapter, session):
            for chunk in chunks(self.samples, self.batch_size):
                g, n = len(group), len(chunk)
                prompts = [self.prompts[i] for _ in group for i, _ in chunk]
                clean = [self.clean[i] for _ in group for i, _ in chunk]
                # each set's blocks that withhold in some head (a block given no heads withholds nothing)
                acting = [frozenset(b for b in s if self.heads.get(b, True)) for s in group]
                union = frozenset().union(*acting)
                pooled_rows = [bool(s) if self.pooled is None else self.pooled == "clean" for s in acting for _ in chunk]
                swap = None
                device = self.pipe._execution_device
                if union or (adapter.has_pooled_text and any(pooled_rows)):
                    cond = adapter.encode_text(clean, kw)
                    swap = adapter.make_swap(union, cond, any(pooled_rows))
                    swap.row_masks = {b: torch.tensor([b in s for s in acting for _ in chunk], device=device)
                                      for b in union}
                    swap.heads = head_masks({b: self.heads.get(b) for b in union}, head_counts(adapter), device)
                    if adapter.has_pooled_text:
                        swap.pooled_rows = torch.tensor(pooled_rows, device=device)
                schedule = None
                if self.steps is not None:  # the sets are withheld at these steps only
                    swap, schedule = None, StepSwaps(self.steps, swap, None)
                session.begin_call(g * n, swap=swap, schedule=schedule)
                call = dict(prompt=prompts, generator=self.resolved.generators([s for _ in group for _, s in chunk]),
                            output_type="latent" if self.judge is not None else "pil", **kw)
                if gradient:
                    rest = self.gradient_gate  # the other blocks' gates where the derivative is taken
                    base = torch.tensor([[1.0 if b in s else rest for s in group for _ in chunk]
                                         for b in self.names]).to(device)  # [blocks, g*n], once per call
                    probe = CausalProbe(adapter, session, "attribution", adapter.encode_text(clean, kw), base=base,
                                        objective=self.gradient_objective, steps=self.gradient_steps)
                    with probe.installed():
                        result = self.pipe(**call).images
                    scores = probe.stacked(len(self.names), session.forwards).sum(1)  # [blocks, g*n]
                    for k, s in enumerate(group):
                        grads[s].append(scores[:, k * n : (k + 1) * n])
                else:
                    result = self.pipe(**call).images
                session.begin_call(0)  # drop the swap before scoring
                values = self._score(result, [j for _ in group for j in self._indices(chunk)], prompts, clean)
                for k, s in enumerate(group):
                    out[s].append(values[k * n : (k + 1) * n])
        for s in group:
            grad = torch.cat(grads[s], 1).double().numpy() if gradient else None  # [blocks, samples]
            yield s, np.concatenate(out[s]), grad

    def _indices(self, chunk) -> list[int]:
        index = {sample: j for j, sample in enumerate(self.samples)}
        return [index[sample] for sample in chunk]

    def _score(self, result, sample_index: list[int], prompts: list[str], clean: list[str]) -> np.ndarray:
        if self.judge is None:
            return self.evaluator.score(result, self.eval_text)
        latents = self.adapter.unpack_latents(result)
        full_text = self.adapter.encode_text(prompts, self.kw)
        clean_text = self.adapter.encode_text(clean, self.kw)
        return self.judge.q(latents, sample_index, full_text, clean_text)

    def settings(self) -> dict:
        record = self.resolved.record()
        return {
            "model": model_record(self.pipe), "family": self.adapter.family, "objective": self.objective,
            "eval_text": self.eval_text, "evaluator": None if self.evaluator is None else type(self.evaluator).__name__,
            "prompts": self.prompts, "clean_prompts": self.clean, "seeds": self.seeds, "pooled": self.pooled,
            **({"heads": {b: list(h) for b, h in self.heads.items()}} if self.heads else {}),
            **({"steps": sorted(self.steps)} if self.steps is not None else {}),
            **{k: record[k] for k in ("num_inference_steps", "guidance_scale", "max_sequence_length",
                                      "generator_device", "adapter_options", "pipeline_kwargs")},
        }


@torch.no_grad()
def presence(pipe, prompts, concept: str, sets=(), *, evaluator=None, eval_text: str | None = None,
             objective: str = "evaluator", clean_prompts=None, seed=0, block_batch: int | None = None,
             batch_size: int | None = None, pooled: str | None = None, options: RunOptions | None = None,
             heads=None, steps=None, **run) -> SetPresence:
    """Presence of `concept` with it withheld from each block set of `sets`.

    Each (prompt, seed) follows the trajectory ``ditloc.generate(pipe, prompt,
    withhold=S, concept=concept, seed=seed)`` samples. The result's first set is the
    empty one (the baseline), then `sets` in order. `evaluator` (a
    `ditloc.evaluate.Evaluator`; default: the toy oracle on the toy model) scores
    `eval_text` (default: the concept) in each image; `objective="self"` uses the
    unedited model as the judge instead. `block_batch`: sets per pipeline call (default:
    as many as keep a call within 64 images); `batch_size`: samples per call.

    `heads` (one list for every block, one list per block of the model, or a dict block ->
    list) and `steps` (denoising step indices): each set withholds its blocks in those heads
    only, at those steps only, as ``ditloc.generate(..., heads=, steps=)`` does; they need
    ``objective="evaluator"``.
    """
    runner = PresenceRunner(pipe, prompts, concept, objective=objective, evaluator=evaluator, eval_text=eval_text,
                            clean_prompts=clean_prompts, seed=seed, block_batch=block_batch, batch_size=batch_size,
                            pooled=pooled, options=options, heads=heads, steps=steps, **run)
    chosen = [frozenset()] + [s for s in runner.check_sets(sets) if s]
    chosen = list(dict.fromkeys(chosen))
    values = runner.presence(chosen)
    order = runner.names
    return SetPresence(concept=concept, sets=tuple(tuple(sorted(s, key=order.index)) for s in chosen),
                       per_image=values, objective=objective,
                       settings={**runner.settings(), "generations": runner.generations,
                                 "seconds": round(runner.seconds, 3)})
