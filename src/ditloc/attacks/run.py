"""`attack` and `replay`: an attack on an erasure, judged by the evaluator, beside the same attack on
the unedited model and the plain prompt on both.

``OUT`` holds, per model (``unedited``, ``edited``; ``given`` without an edit folder):
``<model>/plain.json`` and ``<model>/attack.json`` (one cell each: prompts, seeds, scores),
``<model>/adversarial.safetensors`` (+ ``.json``: the learned vectors, token ids or state changes,
and their metadata), ``<model>/checkpoint.*`` (the optimization, resumable); then
``concept_latents.*`` (images of the concept drawn by the unedited model), ``job.json`` (what
the folder is for: another attack there is refused) and ``attack.json`` (the result). Every
part is written as it finishes and reused by a rerun, so an interrupted attack resumes.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from .. import _state
from .._io import OutputLock, write_json
from ..errors import DitlocError
from ..options import RunOptions, _jsonable, generators, model_record
from . import edits, params, slots
from .config import AttackConfig
from .data import Carriers, carriers, check_image_folder, concept_latents, held_out_seeds, spread
from .optimize import frozen, optimize
from .result import AttackResult, Cell

ATTACK_FILE = "attack.json"
JOB_FILE = "job.json"
REPLAY_FILE = "replay.json"


def attack(pipe, concept: str, *, edit=None, kind: str = "conditioning", steps: int | None = None,
           n_images: int | None = None, train_images: int = 16, batch_size: int = 4, lr: float | None = None,
           tokens: int | None = None, mode: str | None = None, images=None, captions=None, prompts=None,
           seeds=0, evaluator=None, eval_text: str | None = None, threshold: float = 0.5, checkpoint_every: int = 25,
           generation_batch: int = 16, out=None, options: RunOptions | None = None, progress=None,
           note: dict | None = None, **run) -> AttackResult:
    """Attack the erasure of `concept` (white box) and score it with the evaluator.

    `edit`: the folder of `ditloc unlearn` (`pipe` is the unedited model: every condition runs on
    it, then with the edit loaded, which is taken out again at the end), or None (`pipe` as it
    is). `kind`: ``prompts`` (the concept in every probe-set template of its category and in
    `prompts`), ``tokens`` (k discrete tokens, UnlearnDiffAtk-style), ``inversion`` (a new
    token embedding, textual inversion) or ``conditioning`` (the text states at the concept's
    positions: an upper bound); see :mod:`ditloc.attacks.params`. The optimized kinds fit the
    attacked model's own denoising loss on `train_images` images of the concept: `images` (a
    folder or an [N, 3, h, w] tensor in [-1, 1]) or drawn by the unedited model. Each image is
    fitted with its own prompt: the one it was drawn from, or its caption (`captions`: one per
    image, each with the concept, or True to read a folder's ``<image>.txt`` files); images
    without captions are fitted with random training prompts (on the toy model their places then
    contradict the images', and the attacks fit far worse).

    Budget: `steps` optimizer steps of `batch_size` rows at Adam rate `lr` (relative to the scale
    of what is learned), `tokens` learned tokens, `mode` (tokens: ``prefix`` or ``replace``);
    `n_images` held-out generations per cell (default 64). `seeds`: a base seed (optimizer,
    drawn images, held-out seeds) or the list of held-out seeds. `evaluator` (default: the
    model's own, the oracle on the toy models) scores `eval_text` (default: the probe set's text
    for the concept, else the concept); an image shows the concept when its score reaches
    `threshold`. `out`: checkpoints and results (a rerun resumes). `options`/`run`: how the
    pipeline is called (:class:`~ditloc.options.RunOptions`). `note`: kept with the result's
    settings (the CLI keeps MODEL and its evaluator flags there for ``--replay``)."""
    if isinstance(seeds, (list, tuple)):
        seed, held = 0, held_out_seeds(seeds, n_images)
    else:
        seed, held = int(seeds), held_out_seeds(seeds, n_images)
    config = AttackConfig(kind=kind, steps=steps, n_images=len(held), train_images=train_images,
                          batch_size=batch_size, lr=lr, tokens=tokens, mode=mode, seed=seed,
                          checkpoint_every=checkpoint_every, threshold=threshold)
    if not isinstance(concept, str) or not concept.strip():
        raise DitlocError("the concept is empty; pass --concept 'the erased words'")
    info = None
    if edit is not None:
        info = edit if isinstance(edit, edits.EditInfo) else edits.read_edit(edit)
        edits.check_erased(info, concept)
    captions = _captions(images, captions, config)
    job = _Job(pipe, concept.strip(), config, info, held, evaluator=evaluator, eval_text=eval_text,
               user_prompts=list(prompts or []) + list(captions or []), images=images, options=options, run=run,
               out=out,
               generation_batch=generation_batch, progress=progress)
    job.note = dict(note or {})
    job.captions = captions
    if job.out is None:
        return job.run()
    with OutputLock(job.out):
        return job.run()


def replay(pipe, out, *, evaluator=None, progress=None) -> AttackResult:
    """Regenerate and re-score every cell of the attack saved in `out` (its adversarial artifacts,
    prompts, seeds and settings; with its edit folder, checked unchanged) -> the replayed result,
    also written to ``OUT/replay.json`` with the largest score difference from the recorded one."""
    out = Path(out)
    path = out / ATTACK_FILE
    if not path.is_file():
        raise DitlocError(f"{out} holds no finished attack ({ATTACK_FILE}); run `ditloc attack ... --out {out}` "
                          "to the end first")
    recorded = AttackResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    s = recorded.settings
    info = None
    if s.get("edit"):
        info = edits.read_edit(s["edit"]["path"])
        info = edits.EditInfo(info.path, info.record, info.erased, dict(s["edit"]["files"]))
        edits.check_unchanged(info)
    config = AttackConfig(**{k: v for k, v in s["config"].items() if k != "budget"})
    options = RunOptions(**{**s["options"], "pipeline_kwargs": s["options"]["pipeline_kwargs"]})
    job = _Job(pipe, recorded.concept, config, info, list(recorded.cell(recorded.models[0], "plain").seeds),
               evaluator=evaluator, eval_text=s["eval_text"], user_prompts=s["carriers"]["user"], images=None,
               options=options, run={}, out=None, generation_batch=s["generation_batch"], progress=progress)
    cells = []
    for model in recorded.models:
        with job.model(model):
            method, values = job.method_from_artifact(out / model / "adversarial")
            for condition in ("plain", "attack"):
                old = recorded.cell(model, condition)
                use = (params.Plain(), None) if condition == "plain" else (method, values)
                cells.append(job.generate_cell(model, condition, *use, list(old.prompts), list(old.seeds)))
    result = AttackResult(recorded.kind, recorded.concept, tuple(cells), recorded.budget, s, recorded.artifacts,
                          recorded.optimization, str(out))
    diff = max(float(np.max(np.abs(np.asarray(c.scores) - np.asarray(recorded.cell(c.model, c.condition).scores))))
               for c in cells)
    write_json(out / REPLAY_FILE, {**result.to_dict(), "replay": {"max_score_difference": diff, "equal": diff == 0.0}})
    return result


class _Job:
    """One attack, resolved once: pipeline, adapter, call arguments, prompts, seeds, evaluator."""

    def __init__(self, pipe, concept, config: AttackConfig, info, held, *, evaluator, eval_text, user_prompts,
                 images, options, run, out, generation_batch, progress):
        from ..edit.jobs import _native_size, _prepare_out
        from ..localization import default_evaluator
        from ..registry import probe_set_name

        if not isinstance(generation_batch, int) or generation_batch < 1:
            raise DitlocError(f"generation_batch must be a positive integer (got {generation_batch!r})")
        self.pipe, self.concept, self.config, self.info, self.held = pipe, concept, config, info, list(held)
        self.progress, self.generation_batch = progress, generation_batch
        options = RunOptions.of(options if options is not None else RunOptions(num_inference_steps=None), **run)
        self.options = RunOptions.of(options, pipeline_kwargs=_native_size(pipe, options.pipeline_kwargs))
        resolved = self.options.resolve(pipe)
        self.resolved, self.adapter, self.kw = resolved, resolved.adapter, resolved.call_kwargs
        self.carriers: Carriers = carriers(probe_set_name(pipe), concept, user_prompts)
        for p in self.carriers.everything:  # the model must read the concept in every prompt
            self.adapter.concept_span(p, concept, self.kw)
        self.evaluator = evaluator if evaluator is not None else default_evaluator(pipe)
        if self.evaluator is None:
            raise DitlocError("no evaluator for this model: pass evaluator= (ditloc.evaluate.get_evaluator('clip', "
                              "model=...)), or --evaluator clip --evaluator-model PATH")
        text = eval_text
        if text is None:
            text = self.carriers.eval_text if self.carriers.eval_text is not None else concept
        self.eval_text = self.evaluator.check_text(text)
        h, w = int(self.kw.get("height") or self.adapter.image_size()[0]), int(self.kw.get("width") or
                                                                           self.adapter.image_size()[1])
        self.evaluator.check_image_size(w, h)
        if isinstance(images, (str, Path)):
            check_image_folder(images, (h, w))
        self.images = images
        self.out = _prepare_out(out)
        self._method = None
        self.note: dict = {}
        self.captions: list[str] | None = None

    # ---- the parts -------------------------------------------------------------------------
    def models(self) -> list[str]:
        return ["unedited", "edited"] if self.info is not None else ["given"]

    def model(self, name: str):
        """The pipeline as the model `name` (the edit applied for ``edited``)."""
        return edits.applied(self.pipe, self.info) if name == "edited" else contextlib.nullcontext()

    def method(self):
        """The attack's parameterization (built once: the placeholder search encodes prompts)."""
        if self._method is None:
            kind, cfg = self.config.kind, self.config
            every = self.carriers.everything
            if kind == "prompts":
                self._method = params.Plain()
            elif kind == "conditioning":
                self._method = params.Conditioning(self.adapter, self.kw, self.concept, every)
            else:
                placeholder = slots.find_placeholder(self.adapter, self.kw, every, self.concept, cfg.placement,
                                                     cfg.n_tokens)
                cls = params.Tokens if kind == "tokens" else params.Inversion
                self._method = cls(self.adapter, self.kw, self.concept, cfg.placement, placeholder)
        return self._method

    def method_from_artifact(self, stem: Path):
        """(method, values) rebuilt from a saved artifact (a replay)."""
        if not _state.state_exists(stem):
            raise DitlocError(f"{stem}.safetensors is missing; the attack in {stem.parent.parent} is incomplete")
        tensors, meta = _state.load_state(stem)
        kind = self.config.kind
        if kind == "prompts":
            return params.Plain(), None
        if kind == "conditioning":
            return params.Conditioning(self.adapter, self.kw, self.concept, self.carriers.held_out), \
                params.Conditioning.values(tensors)
        details = meta["details"]
        ph = details["placeholder"]
        placeholder = slots.Placeholder(ph["word"], int(ph["k"]), {k: int(v) for k, v in ph["ids"].items()})
        cls = params.Tokens if kind == "tokens" else params.Inversion
        return cls(self.adapter, self.kw, self.concept, details["placement"], placeholder), cls.values(tensors)

    def identity(self) -> dict:
        record = {k: v for k, v in model_record(self.pipe).items() if k != "device"}
        images = None
        if isinstance(self.images, (str, Path)):
            from ..edit.data import load_image_folder  # noqa: F401  (same records as training)
            import hashlib

            images = [{"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                      for p in check_image_folder(self.images, None)]
        elif self.images is not None:
            images = {"tensor": list(self.images.shape), "sum": float(self.images.double().sum())}
        return json.loads(json.dumps({
            "model": record, "concept": self.concept,
            "config": {k: v for k, v in self.config.to_dict().items() if k != "checkpoint_every"},
            "edit": self.info.to_dict() if self.info is not None else None, "images": images,
            "carriers": self.carriers.to_dict(), "seeds": self.held, "call": _jsonable(self.kw),
            "eval_text": self.eval_text, "evaluator": getattr(self.evaluator, "kind", type(self.evaluator).__name__),
            "generation_batch": self.generation_batch}))

    def settings(self) -> dict:
        return {"model": model_record(self.pipe), "config": self.config.to_dict(), "options": self.options.to_dict(),
                "sampling": self.resolved.record(), "edit": self.info.to_dict() if self.info is not None else None,
                "carriers": self.carriers.to_dict(), "eval_text": self.eval_text,
                "evaluator": getattr(self.evaluator, "kind", type(self.evaluator).__name__),
                "generation_batch": self.generation_batch, "device": str(self.pipe._execution_device),
                "torch_threads": torch.get_num_threads(), "note": self.note}

    def say(self, message: str) -> None:
        if self.progress:
            self.progress(message)

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> AttackResult:
        identity = self.identity()
        if self.out is not None:
            job_file = self.out / JOB_FILE
            if job_file.exists():
                old = json.loads(job_file.read_text(encoding="utf-8")).get("identity")
                if old != identity:
                    which = next((k for k in identity if old is None or old.get(k) != identity[k]), "settings")
                    raise DitlocError(f"{self.out} holds another attack (its {which} differ); use another --out")
            else:
                write_json(job_file, {"identity": identity})
        latents = pairs = None
        if self.config.optimized:
            latents, pairs, image_record = self.latents()
        cells, artifacts, optimization = [], {}, {}
        for model in self.models():
            with self.model(model):
                cells.append(self.cell(model, "plain", params.Plain(), None, self.plain_prompts()))
                method, values, art, opt = self.adversarial(model, latents, pairs)
                artifacts[model], optimization[model] = art, opt
                cells.append(self.cell(model, "attack", method, values, self.attack_prompts()))
        settings = self.settings()
        if self.config.optimized:
            settings["images"] = image_record
        result = AttackResult(self.config.kind, self.concept, tuple(cells), self.config.budget(), settings,
                              artifacts, optimization, str(self.out) if self.out is not None else None)
        if self.out is not None:
            write_json(self.out / ATTACK_FILE, result.to_dict())
        return result

    def plain_prompts(self) -> list[str]:
        return spread(self.carriers.held_out, len(self.held))

    def attack_prompts(self) -> list[str]:
        source = self.carriers.everything if self.config.kind == "prompts" else self.carriers.held_out
        return spread(source, len(self.held))

    def latents(self):
        if self.images is None:
            self.say(f"drawing {self.config.train_images} image(s) of {self.concept!r} with the "
                     f"{'unedited' if self.info is not None else 'given'} model")
        train = list(self.carriers.train)
        latents, pairs, record = concept_latents(self.pipe, self.adapter, self.kw, self.images, train,
                                                 self.config.train_images, self.config.seed, self.out)
        if self.captions is not None:  # each image with its own caption
            pairs = torch.tensor([train.index(c) for c in self.captions])
            record["captions"] = list(self.captions)
        return latents, pairs, record

    def adversarial(self, model: str, latents, pairs):
        """(method, values, artifact record, optimization record) for `model`: optimized now, or read
        back from ``OUT/<model>/adversarial``."""
        method = self.method()
        stem = self.out / model / "adversarial" if self.out is not None else None
        if not self.config.optimized:
            tensors, meta = {}, {"prompts": self.carriers.everything}
            if stem is not None:
                _state.save_state(stem, tensors, {"kind": "prompts", "model": model, **meta})
            return method, None, {"file": _file(stem), **meta}, {}
        if stem is not None and _state.state_exists(stem):
            tensors, meta = _state.load_state(stem)
            self.say(f"{model}: the adversarial {self.config.kind} of a previous run")
            return method, method.values(tensors), {"file": _file(stem), **meta["details"]}, meta["optimization"]
        cfg = self.config
        self.say(f"{model}: optimizing the {cfg.kind} attack ({cfg.total_steps} steps of {cfg.batch_size}, "
                 f"{len(latents)} image(s) of the concept)")
        leaves, losses, wall = self.fit(model, method, latents, pairs)
        tensors, details = method.artifact(leaves)
        if isinstance(method, params.Tokens):
            details["adversarial_prompts"] = method.adversarial_prompts(self.carriers.held_out, details)
            self.say(f"{model}: tokens " + "; ".join(f"{n}: {t!r}" for n, t in details["tokens"].items()))
        elif isinstance(method, params.Inversion):
            details["prompts"] = method.prompts(list(self.carriers.held_out))
        opt = {"steps": len(losses), "losses": losses, "wall_seconds": wall}
        if stem is not None:
            _state.save_state(stem, tensors, {"kind": cfg.kind, "model": model, "details": details,
                                              "optimization": opt})
        return method, method.values(tensors), {"file": _file(stem), **details}, opt

    def fit(self, model, method, x0, pairs):
        from ..noise import NoiseRule

        cfg, adapter = self.config, self.adapter
        prompts = list(self.carriers.train)
        noise = NoiseRule.from_scheduler(self.pipe.scheduler)
        x0 = x0.to(self.pipe.transformer.device)
        init = method.init(torch.Generator("cpu").manual_seed(cfg.seed))

        def loss_fn(leaves, g):
            idx = torch.randint(len(x0), (cfg.batch_size,), generator=g)  # [B] images
            which = pairs[idx] if pairs is not None else torch.randint(len(prompts), (cfg.batch_size,), generator=g)
            x_t, t, target = noise.sample(x0[idx.to(x0.device)], g)
            text = method.text(leaves, [prompts[int(i)] for i in which])
            pred = adapter.denoise(x_t, t, text)  # [B, C, h, w]
            return torch.nn.functional.mse_loss(pred.float(), target.float())

        stem = self.out / model / "checkpoint" if self.out is not None else None
        identity = {"model": model, "job": self.identity()}
        with frozen(self.pipe):
            return optimize(init, method.lrs(cfg.learning_rate), loss_fn, steps=cfg.total_steps, seed=cfg.seed,
                            stem=stem, identity=identity, checkpoint_every=cfg.checkpoint_every,
                            progress=(lambda m: self.say(f"{model}: {m}")) if self.progress else None)

    def cell(self, model, condition, method, values, prompts) -> Cell:
        path = self.out / model / f"{condition}.json" if self.out is not None else None
        if path is not None and path.is_file():
            return Cell.from_dict(json.loads(path.read_text(encoding="utf-8")))
        cell = self.generate_cell(model, condition, method, values, prompts, self.held)
        if path is not None:
            write_json(path, cell.to_dict())
        return cell

    @torch.no_grad()
    def generate_cell(self, model, condition, method, values, prompts, seeds) -> Cell:
        from .._progress import bar, count_steps

        self.say(f"{model}: {'the plain prompt' if condition == 'plain' else 'the attack'}, {len(seeds)} images")
        start = time.perf_counter()
        pairs = list(zip(prompts, seeds))
        batches = [pairs[i : i + self.generation_batch] for i in range(0, len(pairs), self.generation_batch)]
        scores = []
        with bar(desc=f"{model} {condition}", unit="step", leave=False, off=self.progress is None) as steps, \
                count_steps(self.pipe, steps, calls=len(batches)):
            for batch in batches:
                context, kwargs = method.call([p for p, _ in batch], values)
                with context:
                    images = self.pipe(**kwargs, generator=generators([s for _, s in batch],
                                                                      self.options.generator_device),
                                       output_type="np", **self.kw).images  # [b, H, W, 3] in [0, 1]
                scores += self.evaluator.score(images, self.eval_text).tolist()
        return Cell(model, condition, tuple(prompts), tuple(int(s) for s in seeds), tuple(scores),
                    self.config.threshold, time.perf_counter() - start)


def _captions(images, captions, config: AttackConfig) -> list[str] | None:
    """One prompt per given image (see `attack`), checked before any work."""
    if captions is None or captions is False:
        return None
    if images is None or not config.optimized:
        raise DitlocError("captions describe the images of the concept (--images) an optimized attack fits; "
                          "pass the images too")
    if captions is True:
        if not isinstance(images, (str, Path)):
            raise DitlocError("captions=True reads a folder's <image>.txt files; with a tensor of images pass a list")
        from ..edit.data import read_captions

        captions = read_captions(images)
    captions = [" ".join(str(c).split()) for c in captions]
    if isinstance(images, (str, Path)):
        from ..edit.data import image_files

        n = len(image_files(images))
    else:
        n = int(images.shape[0])
    if len(captions) != n:
        raise DitlocError(f"{len(captions)} captions for {n} images; give one caption per image")
    return captions


def _file(stem: Path | None) -> str | None:
    return None if stem is None else str(stem.with_name(stem.name + ".safetensors"))
