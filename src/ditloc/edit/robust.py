"""Robust erasure: LoRA trained against an attacker (adversarial unlearning).

A closed-form erasure maps the concept's *word* to its anchor; the blocks still draw the concept
for any other text state, so a textual inversion or an optimized conditioning brings it back.
Here the attacker is inside the training loop. Every step:

1. *inner attack*: a change of the text states at the concept's positions (one per position and
   concept, shared by every prompt, as ``ditloc attack --attack conditioning`` learns it) takes
   `attack_steps` normalized-gradient steps that lower the edited model's denoising loss on noisy
   images of the concept (drawn by the unedited model from the concept's prompts). The change
   persists from step to step (the attacker keeps improving) and starts again from the plain
   prompt every `restart_every` steps;
2. *outer step*: on the same noisy images of the concept, the prediction of the attacked prompt
   and of the plain prompt is fitted to the frozen model's prediction for the anchor prompt;
   the preserved prompts keep the frozen model's prediction on its own images of them.

So the trained blocks (LoRA on the image side and the text side) learn to draw the anchor for
whatever text state draws the concept, not only for its word. The attacker's state is part of the
checkpoint: a resumed run trains exactly what an uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DitlocError
from .train import TrainConfig


@dataclass(frozen=True)
class RobustConfig(TrainConfig):
    """:class:`~ditloc.edit.train.TrainConfig` (LoRA by default) plus the inner attacker:
    ``attack_steps`` steps per training step of size ``attack_lr`` (relative to the text
    states' RMS), restarted from the plain prompt every ``restart_every`` steps;
    ``images_per_prompt`` images of the concept per training prompt (drawn by the unedited
    model); ``plain_weight``: the weight of the plain prompt's term beside the attacked one.
    LoRA learns at 1e-3 unless ``lr`` says otherwise (full weights: 1e-5)."""

    steps: int = 150
    rank: int = 8
    attack_steps: int = 3
    attack_lr: float = 0.1
    restart_every: int = 20
    images_per_prompt: int = 2
    plain_weight: float = 1.0

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.method == "lora" else 1e-5)

    def __post_init__(self):
        super().__post_init__()
        # the attacker's gradient flows through every block's cross-attention, the untrained ones too
        object.__setattr__(self, "no_grad_prefix", False)
        for name, flag in (("attack_steps", "--attack-steps"), ("restart_every", "--restart-every"),
                           ("images_per_prompt", "--images-per-prompt")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DitlocError(f"{flag} must be a positive integer (got {value!r})")
        if not self.attack_lr > 0:
            raise DitlocError(f"--attack-lr must be > 0 (got {self.attack_lr})")
        if not self.plain_weight >= 0:
            raise DitlocError(f"--plain-weight must be >= 0 (got {self.plain_weight})")


def training_prompts(pipe, concept: str, given) -> list[str]:
    """The prompts a robust erasure of `concept` trains on: the training split `ditloc attack` fits
    (its probe-set category's localization templates; the evaluation templates stay held out), else
    `given` when no probe-set category holds the concept."""
    from ..attacks.data import carriers
    from ..registry import probe_set_name

    found = carriers(probe_set_name(pipe), concept)
    return list(found.train) if found.category is not None else list(given)


class Attacker:
    """The inner attacker: additive changes of the text states at each concept's positions, one
    per position and concept (``states`` [C, M, D], M the most positions a concept takes) and, in
    families with a pooled text vector, of that vector per concept (``pooled`` [C, D_pooled])."""

    def __init__(self, adapter, kw: dict, text: dict, prompts: list[str], concepts: list[str], *, lr: float):
        self.text = text
        embeds = text["embeds"]  # [P, L, D]
        p_count, length, width = embeds.shape
        names = list(dict.fromkeys(concepts))
        spans = [list(adapter.concept_span(p, c, kw).positions) for p, c in zip(prompts, concepts)]
        counts: dict[str, set] = {}
        for c, pos in zip(concepts, spans):
            counts.setdefault(c, set()).add(len(pos))
        for c, n in counts.items():
            if len(n) != 1:
                raise DitlocError(f"the training prompts hold {c!r} at different numbers of text positions "
                                  f"({sorted(n)}); give prompts that hold it once")
        self.names, self.m = names, max(len(pos) for pos in spans)
        # slot[p, l]: the row of the flattened states [C*M + 1, D] added at position l of prompt p (the last: zero)
        zero = len(names) * self.m
        slot = torch.full((p_count, length), zero, dtype=torch.long)
        for r, (c, pos) in enumerate(zip(concepts, spans)):
            i = names.index(c)
            for j, position in enumerate(pos):
                slot[r, position] = i * self.m + j
        self.slot = slot.to(embeds.device)  # [P, L]
        self.concept_of = torch.tensor([names.index(c) for c in concepts], device=embeds.device)  # [P]
        mask = text.get("mask")
        states = embeds[mask.bool()] if mask is not None else embeds.reshape(-1, width)
        self.step_size = {"states": lr * float(states.detach().float().pow(2).mean().sqrt())}
        if "pooled" in text:
            self.step_size["pooled"] = lr * float(text["pooled"].detach().float().pow(2).mean().sqrt())
        self.state: dict[str, torch.Tensor] = {}
        self.restart()

    def restart(self) -> None:
        """Back to the plain prompt (every change zero)."""
        embeds = self.text["embeds"]
        self.state = {"states": torch.zeros(len(self.names), self.m, embeds.shape[-1], device=embeds.device)}
        if "pooled" in self.text:
            self.state["pooled"] = torch.zeros(len(self.names), self.text["pooled"].shape[-1], device=embeds.device)

    def apply(self, rows: torch.Tensor, values: dict) -> dict:
        """The text of prompt rows `rows` [B] (a device tensor) with each row's concept changes added."""
        text = {k: v[rows] for k, v in self.text.items()}
        embeds = text["embeds"]  # [B, L, D]
        flat = values["states"].reshape(-1, embeds.shape[-1])  # [C*M, D]
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])]).to(embeds.dtype)  # [C*M + 1, D]
        out = dict(text, embeds=embeds + flat[self.slot[rows]])  # [B, L, D]
        if "pooled" in text:
            out["pooled"] = text["pooled"] + values["pooled"][self.concept_of[rows]].to(text["pooled"].dtype)
        return out

    def attack(self, loss_of, steps: int) -> None:
        """`steps` normalized-gradient steps lowering ``loss_of(values)`` (the edited model's
        denoising loss); the model's parameters take no gradient here."""
        for _ in range(steps):
            leaves = {k: v.detach().requires_grad_(True) for k, v in self.state.items()}
            grads = torch.autograd.grad(loss_of(leaves), list(leaves.values()), allow_unused=True)
            new = {}
            for (k, v), g in zip(leaves.items(), grads):
                if g is None:
                    new[k] = v.detach()
                    continue
                scale = g.pow(2).mean().sqrt().clamp_min(1e-20)
                new[k] = (v - self.step_size[k] * g / scale).detach()
            self.state = new


def train_robust(pipe, adapter, kw, erasures, preserve, preserve_weight, config: RobustConfig, out, progress,
                 details, *, expand: bool = True):
    """Adversarial LoRA (or full-weight) unlearning of `erasures` in the union of their blocks (see
    the module doc). `expand`: train on each concept's probe-set templates (:func:`training_prompts`;
    when no prompts were given) instead of the erasures' own prompts.
    -> :class:`~ditloc.edit.train.EditResult`."""
    from ..devices import reset_peak_memory, to_device
    from ..processes import current as current_processes
    from ..text import substitute
    from .jobs import _cached_latents, _data_dtype, _encode, _finish, _identity
    from .train import LocalizedTrainer, run_training

    if current_processes().world > 1:
        raise DitlocError("--robust trains in one process (its inner attacker is not split over processes); run it "
                          "without accelerate launch")
    prompts, anchors, concepts = [], [], []
    for e in erasures:
        mine = training_prompts(pipe, e.concept, e.prompts) if expand and e.anchor is not None else list(e.prompts)
        for p in mine:
            if p in e.prompts:
                a = e.anchor_prompts[e.prompts.index(p)]
            elif e.anchor is not None:
                a = substitute(p, e.concept, e.anchor.strip(), articles=False)
            else:
                continue
            prompts.append(p), anchors.append(a), concepts.append(e.concept)
    for p, c in zip(prompts, concepts):
        adapter.concept_span(p, c, kw)  # every training prompt must reach the text encoder with its concept
    chosen = list(dict.fromkeys(b for b in adapter.block_names() for e in erasures if b in e.blocks))
    ipp = config.images_per_prompt
    if progress:
        progress(f"drawing {ipp} image(s) of the concept per training prompt ({len(prompts)} prompts)")
    x0 = _cached_latents(out, "concept_latents", pipe, prompts, ipp, config.seed, kw)
    x0 = x0.to(pipe.transformer.device, _data_dtype(pipe, config))  # [P*ipp, C, h, w]
    if progress:
        progress(f"drawing one image per preserved prompt ({len(preserve)}): their predictions stay the frozen "
                 "model's")
    keep = _cached_latents(out, "preserve_latents", pipe, preserve, 1, config.seed + 1, kw).to(x0)
    n = len(prompts)
    # text rows: [0, n) training prompts, [n, 2n) their anchors, [2n, 2n + len(preserve)) preserved prompts
    text = _encode(adapter, prompts + anchors + list(preserve), kw)
    attacker = Attacker(adapter, kw, {k: v[:n] for k, v in text.items()}, prompts, concepts, lr=config.attack_lr)
    data = {"concept": details["concept"], "anchor": details["anchor"], "concepts": details["concepts"],
            "robust": {"prompts": prompts, "anchor_prompts": anchors, "images_per_prompt": ipp,
                       "attack_steps": config.attack_steps, "attack_lr": config.attack_lr,
                       "restart_every": config.restart_every, "plain_weight": config.plain_weight},
            "preserve_target": "teacher", "preserve_weight": preserve_weight, "preserve": list(preserve)}
    reset_peak_memory(pipe.transformer.device)
    trainer = LocalizedTrainer(pipe, adapter, chosen, config)
    device = pipe.transformer.device

    def get_state():
        return attacker.state

    def set_state(values):
        attacker.state = {k: v.to(device, torch.float32) for k, v in values.items()}

    trainer.extra_state = (get_state, set_state)
    b = trainer.global_batch
    mse = torch.nn.functional.mse_loss

    def rows_of(index):
        return {k: v[index] for k, v in text.items()}

    def loss_fn() -> torch.Tensor:
        g = trainer.generator
        img = to_device(torch.randint(len(x0), (b,), generator=g), x0.device)  # images of the concept
        which = img // ipp  # [B] their prompts
        x_t, t, noise_target = trainer.noise.sample(x0[img], g)
        kimg = torch.randint(len(keep), (b,), generator=g)
        kx_t, kt, _ = trainer.noise.sample(keep[to_device(kimg, keep.device)], g)
        if trainer.step % config.restart_every == 0:
            attacker.restart()

        def attacked_loss(values):  # the attacker's objective: the edited model denoises the concept well
            pred = adapter.denoise(x_t, t, attacker.apply(which, values))
            return mse(pred.float(), noise_target.float())

        attacker.attack(attacked_loss, config.attack_steps)
        keep_text = rows_of(to_device(kimg + 2 * n, keep.device))
        ktarget = trainer.teacher(kx_t, kt, keep_text)
        target = trainer.teacher(x_t, t, rows_of(which + n))  # the anchor's prediction on the concept's images
        adv = attacker.apply(which, attacker.state)
        plain = rows_of(which)
        both = {k: torch.cat([adv[k], plain[k]]) for k in adv}
        pred = adapter.denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        loss = mse(pred[:b].float(), target.float()) + config.plain_weight * mse(pred[b:].float(), target.float())
        kpred = adapter.denoise(kx_t, kt, keep_text)
        return loss + preserve_weight * mse(kpred.float(), ktarget.float())

    wall = run_training(trainer, loss_fn, out, _identity("unlearn", pipe, chosen, config, data), progress)
    return _finish("unlearn", pipe, trainer, out, wall, dict(details, **data))
