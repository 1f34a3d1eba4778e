"""The images of a set-level search, for its report: the original image and the image
with each searched set S_K withheld, for the first prompts of the search (its seed).

`save_search_images` generates them once, when `ditloc localize --save-images N` runs
(the pipeline is loaded then); `read_search_images` reads them back for `ditloc report`,
which loads no model. Files, beside the localization.json::

    images.json                  what was generated: steps, the sets, per sample its prompt,
                                 clean prompt, seed and image files
    images/p<i>_s<seed>_original.png, images/p<i>_s<seed>_k<K>.png
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .._io import write_atomic, write_json
from ..errors import DitlocError

IMAGES_FILE = "images.json"
IMAGES_DIR = "images"
FORMAT = "ditloc.search-images/1"


@dataclass(frozen=True)
class SearchImages:
    """`samples[i]`: (prompt, seed, {"original" or K: path}); `steps`: the generations' sampling steps."""

    steps: int
    sets: tuple[tuple[str, ...], ...]
    samples: tuple[tuple[str, int, dict], ...]


def save_search_images(pipe, loc, out, n: int, *, clean_prompts=None, options=None) -> Path:
    """Generate and save the original and every S_K-withheld image of the first `n` samples
    (prompt x seed, prompt-major) of `loc`'s search into `out`; returns `out/images.json`.
    `options`: how the pipeline is called (the run's own steps, not the search's)."""
    from ..intervene import derive_clean_prompt, generate
    from ..options import RunOptions

    if loc.search is None:
        raise DitlocError("images of searched sets need a set-level search (method 'search')")
    if n < 1:
        raise DitlocError(f"the number of image samples must be at least 1, got {n}")
    out = Path(out)
    prompts, seeds = list(loc.settings["prompts"]), list(loc.settings["seeds"])
    clean = list(clean_prompts or loc.settings.get("clean_prompts")  # the search's own clean prompts
                 or [derive_clean_prompt(p, loc.concept) for p in prompts])
    samples = [(i, s) for i in range(len(prompts)) for s in seeds][:n]
    used = sorted({i for i, _ in samples})
    chosen, chosen_clean = [prompts[i] for i in used], [clean[i] for i in used]
    chosen_seeds = sorted({s for _, s in samples}, key=seeds.index)
    conditions = [("original", None)] + [(str(k), list(s)) for k, s in enumerate(loc.search.sets, 1)]
    files: dict[tuple[int, int], dict] = {sample: {} for sample in samples}
    for name, blocks in conditions:
        images = generate(pipe, chosen, seed=chosen_seeds, options=options,
                          **({} if blocks is None else {"withhold": blocks, "concept": loc.concept,
                                                          "clean_prompts": chosen_clean}))
        grid = [(i, s) for i in used for s in chosen_seeds]  # generate's order: prompt-major
        for (i, s), image in zip(grid, images):
            if (i, s) in files:
                rel = f"{IMAGES_DIR}/p{i}_s{s}_{'original' if blocks is None else 'k' + name}.png"
                write_atomic(out / rel, lambda tmp, im=image: im.save(tmp, format="PNG"))
                files[i, s][name] = rel
    steps = int(RunOptions.of(options).resolve(pipe).record()["num_inference_steps"])
    record = {"format": FORMAT, "concept": loc.concept, "num_inference_steps": steps,
              "sets": [list(s) for s in loc.search.sets],
              "samples": [{"prompt_index": i, "prompt": prompts[i], "clean_prompt": clean[i], "seed": s,
                           "images": files[i, s]} for i, s in samples]}
    return write_json(out / IMAGES_FILE, record)


def read_search_images(directory) -> SearchImages | None:
    """The saved images of the localization in `directory` (None: none saved); a damaged
    images.json or a missing image is a one-line DitlocError."""
    directory = Path(directory)
    path = directory / IMAGES_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError
        samples = tuple((str(e["prompt"]), int(e["seed"]), {str(k): directory / v for k, v in e["images"].items()})
                        for e in d["samples"])
        sets = tuple(tuple(s) for s in d["sets"])
        steps = int(d["num_inference_steps"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise DitlocError(f"{path} is damaged; delete it (the report then shows no images) or rerun "
                          "`ditloc localize --save-images N` to rewrite it") from None
    missing = [p for _, _, images in samples for p in images.values() if not p.is_file()]
    if missing:
        raise DitlocError(f"{missing[0]} is missing; rerun `ditloc localize --save-images N` to rewrite the images")
    return SearchImages(steps=steps, sets=sets, samples=samples)
