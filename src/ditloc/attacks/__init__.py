"""White-box attacks on an erasure: does the concept come back?

An erasure that only hides a concept from its usual word can be undone by an attacker who
chooses the words, the tokens or the text states. `attack` runs one attack on the edited
model and the same attack on the unedited one, beside the plain prompt on both, and reports
the concept's presence in held-out generations (the evaluator's judgement, with 95% intervals):

    import ditloc
    res = ditloc.attack(pipe, "zibbit", edit="runs/no-zibbit", kind="conditioning", out="runs/atk")
    print(res.table())                       # presence: plain prompt / attack, unedited / edited
    ditloc.attack.replay(pipe, "runs/atk")   # the same generations and scores again

Kinds (weakest first): ``prompts`` (the concept in every probe-set template of its category,
and the user's prompts), ``tokens`` (UnlearnDiffAtk-style discrete tokens), ``inversion``
(textual inversion, the CCE attack) and ``conditioning`` (the text states at the concept's
positions: an upper bound). See :mod:`ditloc.attacks.params`.
"""

from .config import DEFAULT_LR, DEFAULT_STEPS, DEFAULT_TOKENS, KINDS, MODES, OPTIMIZED, AttackConfig
from .data import Carriers, carriers, check_image_folder
from .edits import EditInfo, applied, check_erased, read_edit
from .result import AttackResult, Cell
from .run import ATTACK_FILE, REPLAY_FILE, attack, replay
from .slots import Placeholder, find_placeholder, injected

attack.replay = replay  # `ditloc.attack` is the function: `ditloc.attack.replay(pipe, out)` still reads

__all__ = [
    "ATTACK_FILE", "AttackConfig", "AttackResult", "Carriers", "Cell", "DEFAULT_LR", "DEFAULT_STEPS",
    "DEFAULT_TOKENS", "EditInfo", "KINDS", "MODES", "OPTIMIZED", "Placeholder", "REPLAY_FILE", "applied",
    "attack", "carriers", "check_erased", "check_image_folder", "find_placeholder", "injected", "read_edit",
    "replay",
]
