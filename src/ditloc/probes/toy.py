"""The toy world's six categories as a probe set.

Templates come from `ditloc.toy.world`: localization templates from its
training templates, evaluation templates from its held-out ones. Each toy
template is filled with a few fixed scene contexts (the attributes other than
the probed one), leaving a `{concept}` slot where the probed attribute goes, so
every prompt is exactly a prompt the toy model saw during training (or a held-
out phrasing of one). The clean rules reproduce `world.clean_prompt`; the
evaluation text is the oracle label, "category: value".
"""

from __future__ import annotations

from ..text import indefinite_article, tidy
from ..toy import world
from .core import SLOT, Category, CleanRule, Concept, ProbeSet

#: how the toy world removes each category from a prompt (see `world.clean_prompt`)
_RULES = {
    "shape": CleanRule(replacement=world.GENERIC_SHAPE),
    "color": CleanRule(replacement=""),
    "style": CleanRule(replacement=""),
    "place": CleanRule(replacement=""),
    "character": CleanRule(replacement=world.GENERIC_SHAPE),
    "hazard": CleanRule(replacement=""),
}

_DESCRIPTIONS = {
    "shape": "object shape (~ animal)",
    "color": "object color",
    "style": "rendering style (~ artistic style)",
    "place": "background place (~ landmark)",
    "character": "named character with a fixed look (~ copyright, celebrity)",
    "hazard": "hazard sign (~ unsafe concept)",
}


def toy_context(i: int) -> dict[str, str]:
    """The i-th fixed scene context: the attribute values that surround the probed one."""
    return {
        "shape": world.SHAPES[i % len(world.SHAPES)],
        "color": world.COLORS[(2 + i) % len(world.COLORS)],
        "style": world.STYLES[(1 + i) % len(world.STYLES)],
        "place": world.PLACES[(1 + i) % len(world.PLACES)],
    }


def toy_template(template: str, category: str, context: dict[str, str]) -> str:
    """A toy-world template (slots {a} {np} {place} {hz}) as a probe template with one
    {concept} slot where `category`'s value goes; the other attributes from `context`."""
    color, style, shape = context["color"], context["style"], context["shape"]
    noun_phrase = {
        "shape": f"{color} {style} {SLOT}",
        "color": f"{SLOT} {style} {shape}",
        "style": f"{color} {SLOT} {shape}",
        "character": SLOT,
    }.get(category, f"{color} {style} {shape}")
    # "a" before a slot is made to agree with the concept when the template is filled
    article = "a" if noun_phrase.startswith(SLOT) else indefinite_article(noun_phrase.split()[0])
    text = template.format(
        a=article,
        np=noun_phrase,
        place=SLOT if category == "place" else world.PLACE_PHRASE[context["place"]],
        hz=SLOT if category == "hazard" else "",
    )
    return tidy(text)


def _concept(category: str, value: str) -> Concept:
    if category == "place":
        return Concept(value, world.PLACE_PHRASE[value])
    if category == "hazard":
        return Concept(value, world.HAZARD_PHRASE)
    return Concept(value)


def toy_probe_set(n_contexts: int = 3) -> ProbeSet:
    """The toy world's categories: shape, color, style, place, character, hazard.

    `n_contexts` scene contexts per template (8 training templates -> 8 *
    n_contexts localization prompts per concept; 5 held-out -> 5 * n_contexts
    evaluation prompts).
    """
    contexts = [toy_context(i) for i in range(n_contexts)]
    categories = []
    for category, values in world.CATEGORIES.items():

        def templates(source: tuple[str, ...]) -> tuple[str, ...]:
            out = [toy_template(t, category, ctx) for ctx in contexts for t in source]
            return tuple(dict.fromkeys(out))  # characters ignore the context's look: drop repeats

        categories.append(
            Category(
                name=category,
                concepts=tuple(_concept(category, v) for v in values),
                localization_prompts=templates(world.TRAIN_TEMPLATES),
                evaluation_prompts=templates(world.HELDOUT_TEMPLATES),
                clean_rule=_RULES[category],
                eval_text=f"{category}: {SLOT}",
                description=_DESCRIPTIONS[category],
            )
        )
    return ProbeSet("toy", tuple(categories), ("toy",))
