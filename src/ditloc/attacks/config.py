"""What an attack may spend: `AttackConfig`, checked before any model loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import BadOption, DitlocError

#: the attacks, weakest first
KINDS = ("prompts", "tokens", "inversion", "conditioning")
#: kinds that optimize something with the attacked model's denoising loss
OPTIMIZED = ("tokens", "inversion", "conditioning")
#: where learned or searched tokens go: before the prompt (which keeps the concept) or in the concept's place
MODES = ("prefix", "replace")

#: optimizer steps per kind, unless given
DEFAULT_STEPS = {"tokens": 200, "inversion": 200, "conditioning": 100}
#: Adam's learning rate per kind, relative to the scale of what it moves (the embedding table's RMS for
#: tokens and inversion, the text states' RMS for conditioning)
DEFAULT_LR = {"tokens": 1.0, "inversion": 0.2, "conditioning": 0.05}
#: learned tokens per kind, unless given (UnlearnDiffAtk's prefix: 5 tokens; textual inversion: one)
DEFAULT_TOKENS = {"tokens": 5, "inversion": 1}


@dataclass(frozen=True)
class AttackConfig:
    """One attack and its budget.

    ``steps``: optimizer steps (the optimized kinds; None: the kind's default), each on
    ``batch_size`` noisy versions of the ``train_images`` images of the concept;
    ``n_images``: held-out generations per table cell (new seeds, the probe set's evaluation
    prompts); ``lr``: Adam's rate relative to the scale of what it moves; ``tokens``: learned
    tokens (tokens: 5, inversion: 1); ``mode``: tokens only, ``prefix`` (default: k tokens
    before a prompt that keeps the concept) or ``replace`` (k tokens in the concept's place);
    ``threshold``: an image shows the concept when the evaluator's score reaches it."""

    kind: str = "conditioning"
    steps: int | None = None
    n_images: int = 64
    train_images: int = 16
    batch_size: int = 4
    lr: float | None = None
    tokens: int | None = None
    mode: str | None = None
    seed: int = 0
    checkpoint_every: int = 25
    threshold: float = 0.5

    def __post_init__(self):
        if self.kind not in KINDS:
            raise BadOption(f"unknown attack {self.kind!r}; choose one of {', '.join(KINDS)}")
        optimized = self.kind in OPTIMIZED
        for name, flag in (("steps", "--budget-steps"), ("lr", "--lr"), ("tokens", "--tokens"), ("mode", "--mode")):
            if not optimized and getattr(self, name) is not None:
                raise BadOption(f"{flag} is a setting of an optimized attack (tokens, inversion, conditioning); "
                                "the prompts attack has none")
        counts = {"steps": "--budget-steps", "n_images": "--n-images", "train_images": "--train-images",
                  "batch_size": "--batch-size", "tokens": "--tokens", "checkpoint_every": "--checkpoint-every"}
        for name, flag in counts.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DitlocError(f"{flag} must be a positive integer (got {value!r})")
        if self.lr is not None and not self.lr > 0:
            raise DitlocError(f"--lr must be > 0 (got {self.lr})")
        if self.mode is not None and self.mode not in MODES:
            raise BadOption(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.kind != "tokens" and self.mode == "prefix":
            raise BadOption(f"the {self.kind} attack works in the concept's place; --mode prefix is the tokens "
                            "attack's")
        if self.kind == "conditioning" and self.tokens is not None:
            raise BadOption("--tokens counts learned tokens; the conditioning attack moves the concept's own "
                            "text states")
        if not 0 < self.threshold < 1:
            raise DitlocError(f"threshold must be in (0, 1) (got {self.threshold})")

    @property
    def optimized(self) -> bool:
        return self.kind in OPTIMIZED

    @property
    def total_steps(self) -> int:
        return (self.steps or DEFAULT_STEPS[self.kind]) if self.optimized else 0

    @property
    def learning_rate(self) -> float | None:
        return (self.lr or DEFAULT_LR[self.kind]) if self.optimized else None

    @property
    def n_tokens(self) -> int | None:
        return (self.tokens or DEFAULT_TOKENS[self.kind]) if self.kind in DEFAULT_TOKENS else None

    @property
    def placement(self) -> str | None:
        """Where the learned tokens or states go: prefix or replace (None for the prompts attack)."""
        if not self.optimized:
            return None
        return self.mode or ("prefix" if self.kind == "tokens" else "replace")

    def budget(self) -> dict:
        """What the attack spends, as the tables report it."""
        out = {"n_images": self.n_images}
        if self.optimized:
            out.update(steps=self.total_steps, batch_size=self.batch_size, train_images=self.train_images,
                       lr=self.learning_rate, placement=self.placement)
            if self.n_tokens is not None:
                out["tokens"] = self.n_tokens
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "budget": self.budget()}
