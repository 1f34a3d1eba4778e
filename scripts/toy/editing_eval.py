"""What the toy-world editing scripts share (`evaluate_editing.py`, `evaluate_erase_many.py`,
`evaluate_unlearned.py`): how a toy model is sampled, its images drawn and read by the oracle, and
every rate and mean with its 95% interval."""

from __future__ import annotations

import threading
import zlib

import numpy as np
import torch

# same directory: the expected oracle label per attribute
from evaluate_fidelity import expected

from ditloc.adapters import get_adapter
from ditloc.options import RunOptions
from ditloc.stats import mean_ci, wilson
from ditloc.toy import toy_model

CATS = ("shape", "color", "style", "place", "character", "hazard")
#: what this script adds to a toy model's own sampling arguments (`TOY_MODELS[model].call_defaults`) when
#: it draws images: the toy images' size, 32 text tokens (every toy prompt fits) and, on PixArt, no
#: resolution binning (toy-flux's call_defaults hold its size and text length already)
DRAW_EXTRA = {"toy": {"height": 32, "width": 32, "use_resolution_binning": False, "max_sequence_length": 32},
              "toy-flux": {}}


def sampling(model: str = "toy", guidance: float | None = None) -> tuple[dict, dict]:
    """How this script samples the toy model `model`, decided here only -> (the `pipe(...)`
    keyword arguments of every image it draws, besides prompts, generators, steps and output
    type; the sampling keywords every edit gets, `unlearn`/`personalize`'s ``**run``: their
    localization and the images they draw). Both are the arguments the model was trained for
    (`TOY_MODELS[model].call_defaults`, which ditloc passes to a toy pipeline anyway; the steps
    are the script's --steps) and
    `guidance` (None: the model's own) under the name of the model's CFG scale: ``guidance_scale``
    on toy (PixArt), the true CFG's ``true_cfg_scale`` on toy-flux (FLUX's ``guidance_scale`` is the
    distilled-guidance embedding, which this base model does not have)."""
    spec = toy_model(model)
    edit = {k: v for k, v in spec.call_defaults.items() if k != "num_inference_steps"}  # --steps sets it
    if guidance is not None:
        edit[spec.guidance_argument] = float(guidance)
    return {**edit, **DRAW_EXTRA[model]}, edit


def own_guidance(model: str, pipe) -> float:
    """The CFG scale `model` samples with when none is given: its call_defaults' (toy-flux 4.0),
    else its pipeline's default as ditloc resolves it (toy: PixArt's 4.5)."""
    spec = toy_model(model)
    if spec.call_defaults.get(spec.guidance_argument) is not None:
        return float(spec.call_defaults[spec.guidance_argument])
    run = RunOptions(num_inference_steps=None, max_sequence_length=32).resolve(pipe)
    return float(run.effective(spec.guidance_argument))


STREAMS = {"double": "double-stream", "single": "single-stream"}


def block_set(pipe, edited) -> str:
    """Which of the model's blocks an edit of "all" blocks changed: every block, or only the
    editable ones (on FLUX the closed form rewrites double-stream blocks only)."""
    names = get_adapter(pipe).block_names()
    if set(edited) == set(names):
        return f"all {len(names)} blocks"
    kinds = "/".join(dict.fromkeys(STREAMS.get(b.split(".")[0], b.split(".")[0]) for b in edited))
    return f"all {len(edited)} {kinds} blocks of {len(names)}"


def rate(flags) -> dict:
    """A proportion with its 95% Wilson interval."""
    flags = [bool(f) for f in flags]
    k, n = sum(flags), len(flags)
    lo, hi = wilson(k, n)
    return {"value": k / n, "lo": lo, "hi": hi, "n": n}


def average(values) -> dict:
    m, lo, hi = mean_ci(values)
    return {"value": m, "lo": lo, "hi": hi, "n": len(list(values))}


class PeakRSS:
    """Peak resident memory of this process above its level at entry (Linux /proc)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.extra = self.peak - self.base


@torch.no_grad()
def generate(pipe, prompts, seed, steps, guidance, batch=32, model="toy"):
    """Images [N, h, w, 3] uint8 of `prompts` from the toy model `model` (`sampling`), one seeded
    generator per image; `guidance`: its CFG scale (None: the model's own)."""
    call, _ = sampling(model, guidance)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(seed * 100_003 + i + j) for j in range(len(chunk))]
        out.append(pipe(chunk, generator=gens, num_inference_steps=steps, output_type="np", **call).images)
    return (np.concatenate(out) * 255).round().astype(np.uint8)


def labels(oracle, images):
    return oracle.classify(images).labels


def evaluate(pipe, oracle, sets, args, reference=None):
    """Oracle metrics of `pipe` on the fixed evaluation sets (same seeds for every model),
    each with its 95% interval."""
    res, labs = {}, {}
    for name, (scenes, prompts, concept_cat, concept_label) in sets.items():
        imgs = generate(pipe, prompts, seed=zlib.crc32(name.encode()) % 997, steps=args.steps, guidance=args.guidance,
                        model=getattr(args, "model", "toy"))
        lab = labels(oracle, imgs)
        labs[name] = lab
        if concept_cat is not None:  # presence of the concept
            res[f"{name}_presence"] = rate(l == concept_label for l in lab[concept_cat])
        if name == "quality":
            res["quality_fidelity"] = average([np.mean([lab[k][i] == v for k, v in expected(s).items()])
                                               for i, s in enumerate(scenes)])
        if reference is not None and name.startswith("locality"):
            ref = reference[name]
            res[f"{name}_unchanged"] = rate(all(lab[c][i] == ref[c][i] for c in CATS) for i in range(len(prompts)))
    return res, labs
