"""The two editing jobs, on the localized engine.

- :func:`personalize`: DreamBooth-style; a few images of a new subject bound to a
  rare token ("a sks dog"), optional prior preservation on the class.
- :func:`unlearn`: concept-ablation-style; for prompts with the concept, match
  the frozen model's prediction for the anchor prompt (same noisy latents, drawn
  from the frozen model's own images of the anchor).

Both train only the chosen blocks (``blocks="auto"``: localize first, take the
top ``k``), checkpoint into ``out`` and resume from it, and write the result in
a format diffusers loads (LoRA) plus ``ditloc_edit.json``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from .. import _state
from .._io import OutputLock, write_json
from ..errors import DitlocError
from ..options import RunOptions, _jsonable, generators, model_record
from ..text import find_occurrences, substitute, tidy
from .blocks import category_prompts, choose_blocks, neighbour_prompts  # noqa: F401  (re-exported)
from .data import encode_images, image_size, load_image_folder
from ..devices import reset_peak_memory, to_device
from .files import BLOCKS_FILE, RESULT_FILE
from .lora import save_lora
from ..processes import current as current_processes
from .train import EditResult, LocalizedTrainer, TrainConfig, run_training

EMPTY_PRESERVE = ("the preservation set is empty; pass prompts to keep (--preserve / --preserve-file) "
                  "or leave both out to preserve the anchor prompts")


def _adapter(pipe):
    from ..adapters import get_adapter

    return get_adapter(pipe)


def run_options(options: RunOptions | None, run: dict) -> RunOptions:
    """The jobs' RunOptions: `options` with `run`'s overrides; sampling steps default
    to the pipeline's own (not localize's 20)."""
    return RunOptions.of(options if options is not None else RunOptions(num_inference_steps=None), **run)


def _plan(pipe, blocks, k, localize_prompts, concept, config, out, *, options: RunOptions, progress,
          require_concept=False, eligible=None, localize_method="search", search=None, seeds=(0, 1)):
    """What both jobs do before training: pipeline call arguments (native size
    unless given), the output folder, and the blocks (localized with those same
    arguments for ``auto``; `search`: the search's objective, evaluator and eval_text).
    -> (adapter, call kwargs, out, blocks, localization)."""
    options = RunOptions.of(options, pipeline_kwargs=_native_size(pipe, options.pipeline_kwargs))
    resolved = options.resolve(pipe)
    adapter, kw = resolved.adapter, resolved.call_kwargs
    for p in localize_prompts if require_concept else ():  # the concept must reach the text encoder
        adapter.concept_span(p, concept, kw)
    out = _prepare_out(out)
    if eligible is not None:
        eligible = eligible(adapter)
    procs = current_processes()
    checkpoint = out / "search.jsonl" if out is not None and localize_method == "search" else None
    chosen, loc = procs.share(lambda: choose_blocks(  # the main process localizes; every process gets its blocks
        pipe, blocks, k, list(localize_prompts), concept, seeds=seeds, progress=progress, options=options,
        eligible=eligible, method=localize_method, checkpoint=checkpoint, **(search or {})))
    if loc is not None and out is not None and procs.is_main:
        loc.save(out / "localization.json")
    if progress:
        verb = "editing" if config.method == "closed-form" else "training"
        progress(f"{verb} {config.method} in {len(chosen)} block(s): {', '.join(chosen)}")
    return adapter, kw, out, chosen, loc


def _identity(kind: str, pipe, blocks, config: TrainConfig, data: dict) -> dict:
    return {"kind": kind, "model": model_record(pipe).get("name_or_path"), "blocks": list(blocks),
            "config": config.to_dict(), "data": data}


def _cached_latents(out: Path | None, name: str, pipe, prompts: list[str], per_prompt: int, seed: int,
                    call_kwargs: dict) -> torch.Tensor:
    """The frozen pipeline's samples of `prompts` (`_generate_latents`), drawn once and kept in
    ``out`` so a resumed run trains on exactly the same data. They are reused only when they
    were drawn by the same model (its record), prompts, count, seed and sampling arguments;
    otherwise they are drawn again (an ``out`` reused for another model or other prompts must
    not train on stale images). Under ``accelerate launch`` the main process draws (or reads)
    and writes them, and every process gets them."""
    key = json.loads(json.dumps({"model": model_record(pipe), "prompts": list(prompts), "per_prompt": int(per_prompt),
                                 "seed": int(seed), "call": _jsonable(call_kwargs)}))

    def load_or_make():
        if out is not None and _state.state_exists(out / name):
            tensors, meta = _state.load_state(out / name)
            if meta.get("key") == key:
                return tensors["latents"]
        latents = _generate_latents(pipe, prompts, per_prompt, seed, call_kwargs)
        if out is not None:
            _state.save_state(out / name, {"latents": latents}, {"key": key})
        return latents

    return current_processes().share(load_or_make)


@torch.no_grad()
def _generate_latents(pipe, prompts: list[str], per_prompt: int, seed: int, call_kwargs: dict) -> torch.Tensor:
    """The frozen pipeline's own samples (latents [len(prompts)*per_prompt, C, h, w])."""
    out = []
    for i, prompt in enumerate(prompts):
        seeds = [seed * 1_000_003 + i * 1000 + j for j in range(per_prompt)]
        res = pipe([prompt] * per_prompt, generator=generators(seeds), output_type="latent", **call_kwargs)
        out.append(_adapter(pipe).unpack_latents(res.images))
    return torch.cat(out)


def _native_size(pipe, pipeline_kwargs) -> dict:
    """Pipeline call arguments with the model's native height/width unless given
    (some pipelines default to 1024 px whatever the checkpoint's sample size)."""
    import inspect

    kw = dict(pipeline_kwargs or {})
    accepted = inspect.signature(pipe.__call__).parameters
    if "height" in accepted and "width" in accepted and not (kw.get("height") or kw.get("width")):
        kw["height"], kw["width"] = image_size(pipe)
    return kw


def _encode(adapter, prompts: list[str], kw: dict) -> dict:
    """Text conditioning, once (the text encoder is frozen): one padded batch."""
    with torch.no_grad():
        return {k: v.detach() for k, v in adapter.encode_text(prompts, kw).items()}


def _data_dtype(pipe, config) -> torch.dtype:
    """Training latents' dtype: the model's, float32 under mixed precision (autocast casts)."""
    return torch.float32 if getattr(config, "mixed_precision", "no") != "no" else pipe.transformer.dtype


def _finish(kind, pipe, trainer, out, wall, details) -> EditResult:
    transformer = pipe.transformer
    result = EditResult(
        kind=kind,
        model=model_record(pipe).get("name_or_path") or type(pipe).__name__,
        blocks=tuple(trainer.blocks),
        config={**trainer.config.to_dict(), **({"lora": trainer.spec.to_dict()} if trainer.spec else {}),
                **trainer.record()},
        trainable_parameters=sum(p.numel() for p in trainer.params),
        total_parameters=sum(p.numel() for p in transformer.parameters()),
        steps=trainer.step,
        losses=tuple(trainer.losses),
        wall_seconds=wall,
        peak_memory_bytes=trainer.peak_memory(),
        details=details,
        out_dir=str(out) if out is not None else None,
    )
    transformer.eval()
    if out is not None and trainer.processes.is_main:  # the others wait for its files
        state = trainer.trainable_state()
        if trainer.spec is not None:
            save_lora(pipe, out, state, trainer.spec)
        else:
            from safetensors.torch import save_file

            save_file(state, str(out / BLOCKS_FILE))
        write_json(out / RESULT_FILE, result.to_dict())
    trainer.close()
    trainer.processes.wait()
    return result


def load_edit(pipe, directory) -> dict:
    """Apply a saved edit (LoRA or full blocks) to `pipe`; returns its record."""
    import json

    from .lora import WEIGHT_NAME, load_lora

    directory = Path(directory)
    if (directory / BLOCKS_FILE).exists():  # exact weights (a closed-form edit also exports a LoRA of them)
        from safetensors.torch import load_file

        state = load_file(str(directory / BLOCKS_FILE))
        missing, unexpected = pipe.transformer.load_state_dict(state, strict=False)
        if unexpected:
            raise DitlocError(f"{directory}: tensors {unexpected[:3]} are not in this transformer")
    elif (directory / WEIGHT_NAME).exists():
        load_lora(pipe, directory)
    else:
        raise DitlocError(f"{directory} holds no edit ({WEIGHT_NAME} or {BLOCKS_FILE})")
    path = directory / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _text_editable(adapter) -> list[str]:
    """Blocks a closed-form text edit can change (FLUX single-stream blocks cannot)."""
    ok = []
    for b in adapter.block_names():
        try:
            adapter.text_projections(b)
        except DitlocError:
            continue
        ok.append(b)
    if not ok:
        raise DitlocError(f"no block of this {adapter.family} model has text-only key/value projections; "
                          "use --edit-method lora or full")
    return ok


def _blank_latents(pipe, kw) -> torch.Tensor:
    """Zero latents [1, C, h, w] at the call's size: the transformer input when the
    text states do not depend on the image."""
    h, w = kw.get("height"), kw.get("width")
    if not (h and w):
        h, w = image_size(pipe)
    f = pipe.vae_scale_factor
    c = pipe.vae.config.latent_channels
    return torch.zeros(1, c, int(h) // f, int(w) // f, device=pipe._execution_device, dtype=pipe.transformer.dtype)


def _prepare_out(out) -> Path | None:
    if out is None:
        return None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DitlocError(f"--out {out} is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _one_writer(job):
    """Run `job` as the only writer of its ``out`` folder (an advisory lock; a
    second process on the same folder is refused with the holder's PID)."""

    @functools.wraps(job)
    def locked(*args, **kwargs):
        procs = current_processes(args[0].transformer.device if args else None)
        if not procs.is_main:  # under accelerate launch: the main process locks, writes and reports
            return job(*args, **dict(kwargs, progress=None))
        out = _prepare_out(kwargs.get("out"))
        if out is None:
            return job(*args, **kwargs)
        with OutputLock(out):
            return job(*args, **kwargs)

    return locked


# ---------------------------------------------------------------------------------------
@_one_writer
def personalize(
    pipe,
    images,
    token: str,
    class_word: str,
    *,
    blocks="auto",
    k: int | str = "auto",
    config: TrainConfig = TrainConfig(),
    instance_prompt: str = "a {token} {class_word}",
    localize_prompts=None,
    localize_method: str = "search",
    localize_seeds=(0, 1),
    objective: str | None = None,
    evaluator=None,
    eval_text: str | None = None,
    prior_preservation: bool = False,
    class_prompt: str | None = None,
    num_class_images: int = 16,
    prior_weight: float = 1.0,
    captions=None,
    class_prompts=None,
    prior_target: str = "noise",
    out=None,
    options: RunOptions | None = None,
    progress=None,
    **run,
) -> EditResult:
    """Bind `token` to the subject of `images` (a folder or [N, 3, h, w] tensor in
    [-1, 1]), training LoRA / full weights only in `blocks`. `options`
    (:class:`~ditloc.options.RunOptions`, keyword overrides in `run`): how the
    pipeline is called (localization, class images); pipeline arguments such as
    ``height``/``width`` then also fix the training resolution.
    `localize_prompts` (with ``blocks="auto"``): prompts containing the class
    word to localize it on (default: the class prompt), with `localize_method`
    (``search``, the default, or ``contribution``, ``patch`` or ``attribution``) at `localize_seeds`; `k`: a number of blocks or "auto"
    (:meth:`~ditloc.localization.Localization.k_auto`); see :func:`category_prompts` for a probe-set category's. `objective`
    ("evaluator" or "self"), `evaluator` and `eval_text` (default: the class word): how the
    search scores the class word's presence (default: the model's own evaluator where it can,
    else the model judges itself; :func:`~ditloc.edit.blocks.search_objective`).

    `captions` (one per image, each containing `token`; as diffusers' DreamBooth
    scripts' ``caption_column``): image i is trained on its own caption, e.g.
    "a blue sks object on the beach", instead of the single `instance_prompt`.
    `class_prompts`: the prior-preservation prompts (default: `class_prompt`, or
    with captions, the captions without the token); the `num_class_images` frozen
    images are drawn evenly over them and each is fitted with its own prompt.
    `prior_weight` weighs the prior term. `prior_target`: what the class images are
    fitted to: ``noise`` (DreamBooth: the sampled noise / flow target) or ``teacher``
    (the frozen model's own prediction at the same noisy latents: zero at the start and
    free of the noise's variance, so any drift of the class prompts' predictions costs;
    one extra forward without gradients per step)."""
    if not token or not token.strip() or not class_word or not class_word.strip():
        raise DitlocError("pass both --token (a rare word, e.g. sks) and --class-word (e.g. dog)")
    for slot in ("{token}", "{class_word}"):
        if slot not in instance_prompt:
            raise DitlocError(f"--instance-prompt must contain {slot} (got {instance_prompt!r})")
    options = run_options(options, run)
    pipeline_kwargs = options.pipeline_kwargs
    size = image_size(pipe)
    if pipeline_kwargs.get("height") and pipeline_kwargs.get("width"):
        size = (int(pipeline_kwargs["height"]), int(pipeline_kwargs["width"]))
    if isinstance(images, (str, Path)):
        pixels, records = load_image_folder(images, size)
    else:
        pixels, records = images, [{"tensor": list(images.shape)}]
        if pixels.ndim != 4 or tuple(pixels.shape[2:]) != size or pixels.shape[1] != 3:
            raise DitlocError(f"images must be [N, 3, {size[0]}, {size[1]}], got {list(pixels.shape)}")
    prompt = instance_prompt.format(token=token.strip(), class_word=class_word.strip())
    class_prompt = class_prompt or instance_prompt.replace("{token} ", "").replace("{token}", "").format(
        class_word=class_word.strip())
    check_personalize_prompts(token.strip(), len(pixels), captions, class_prompts, prior_weight, prior_target)
    prompts = [prompt] if captions is None else [str(c).strip() for c in captions]
    if class_prompts is None:  # the instance prompt(s) without the token
        class_prompts = [class_prompt] if captions is None else list(dict.fromkeys(
            tidy(substitute(c, token.strip(), "")) for c in prompts))
    class_prompts = [str(c).strip() for c in class_prompts]
    adapter, kw, out, chosen, loc = _plan(
        pipe, blocks, k, localize_prompts or [class_prompt], class_word.strip(), config, out,
        options=options, progress=progress, localize_method=localize_method,
        search=_search_settings(objective, evaluator, eval_text), seeds=localize_seeds)

    instance = encode_images(pipe, pixels).to(_data_dtype(pipe, config))  # [N, C, h, w]
    # text row of each instance image, of each class image (rows of `text`: prompts, then class prompts)
    # (host tensors, indexed by the host generator's draws like the latents themselves)
    inst_rows = torch.arange(len(pixels)) if len(prompts) > 1 else torch.zeros(len(pixels), dtype=torch.long)
    prior = prior_rows = None
    if prior_preservation:
        per_prompt = -(-num_class_images // len(class_prompts))  # ceil: every class prompt gets images
        if progress:
            shown = class_prompts[0] if len(class_prompts) == 1 else f"{len(class_prompts)} class prompts"
            progress(f"drawing {per_prompt * len(class_prompts)} class images for prior preservation: {shown!r}")
        prior = _cached_latents(out, "class_latents", pipe, class_prompts, per_prompt, config.seed, kw).to(instance)
        prior_rows = len(prompts) + torch.arange(len(class_prompts)).repeat_interleave(per_prompt)
    text = _encode(adapter, prompts + class_prompts, kw)

    data = {"images": records, "instance_prompt": prompt if captions is None else None,
            "captions": list(prompts) if captions is not None else None,
            "class_prompt": class_prompts[0] if len(class_prompts) == 1 else None,
            "class_prompts": list(class_prompts) if len(class_prompts) > 1 else None,
            "prior_preservation": prior_preservation, "num_class_images": len(prior) if prior is not None else 0,
            "prior_weight": prior_weight, "prior_target": prior_target}
    reset_peak_memory(pipe.transformer.device)
    trainer = LocalizedTrainer(pipe, adapter, chosen, config)
    b = trainer.global_batch  # every process draws the global batch and trains on its rows

    device = instance.device

    def rows(index: torch.Tensor) -> dict:
        return {k: v[index] for k, v in text.items()}

    def loss_fn() -> torch.Tensor:
        g = trainer.generator
        idx = torch.randint(len(instance), (b,), generator=g)
        x_t, t, target, cond = trainer.shard(*trainer.noise.sample(instance[to_device(idx, device)], g),
                                             to_device(inst_rows[idx], device))
        if prior is not None:
            idx = torch.randint(len(prior), (b,), generator=g)
            px_t, pt, ptarget, pcond = trainer.shard(*trainer.noise.sample(prior[to_device(idx, device)], g),
                                                     to_device(prior_rows[idx], device))
            if prior_target == "teacher":  # before any forward with gradients: it swaps the trainable tensors
                ptarget = trainer.teacher(px_t, pt, rows(pcond))
        pred = adapter.denoise(x_t, t, rows(cond))
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        if prior is not None:
            pred = adapter.denoise(px_t, pt, rows(pcond))
            loss = loss + prior_weight * torch.nn.functional.mse_loss(pred.float(), ptarget.float())
        return loss

    wall = run_training(trainer, loss_fn, out, _identity("personalize", pipe, chosen, config, data), progress)
    details = dict(data, localization=loc.to_dict() if loc is not None else None)
    return _finish("personalize", pipe, trainer, out, wall, details)


def _search_settings(objective, evaluator, eval_text) -> dict:
    """The search's objective, evaluator and eval_text as `choose_blocks` keywords, those given only
    (`choose_blocks` refuses them with another localization method)."""
    return {k: v for k, v in (("objective", objective), ("evaluator", evaluator), ("eval_text", eval_text))
            if v is not None}


def check_personalize_prompts(token: str, n_images: int, captions=None, class_prompts=None,
                              prior_weight: float = 1.0, prior_target: str = "noise") -> None:
    """The checks of :func:`personalize`'s text arguments that need no model (the CLI runs
    them before one loads). Bad input: one line."""
    if not prior_weight >= 0:
        raise DitlocError(f"--prior-weight must be >= 0 (got {prior_weight})")
    if prior_target not in ("noise", "teacher"):
        raise DitlocError(f"--prior-target must be noise or teacher (got {prior_target!r})")
    if captions is not None:
        if len(captions) != n_images:
            raise DitlocError(f"{len(captions)} caption(s) for {n_images} image(s); give one caption per image")
        for c in captions:
            if not find_occurrences(str(c), token):
                raise DitlocError(f"the caption {str(c).strip()!r} does not contain the token {token!r}; every caption "
                                  "names the subject with it")
    if class_prompts is not None:
        if not class_prompts or not all(str(c).strip() for c in class_prompts):
            raise DitlocError("the class prompts are empty; pass at least one prompt of the class, without the token")
        for c in class_prompts:
            if find_occurrences(str(c), token):
                raise DitlocError(f"the class prompt {str(c).strip()!r} contains the token {token!r}; class prompts "
                                  "show the class without the subject")
