"""What an unlearning run erases: one or many concepts, each with its anchor and its
training prompts. Pure text: every check here runs before a model loads.

    plan_erasures([("zibbit", "triangle"), ("striped", "solid")], prompts=[...])

A prompt is assigned to every erased concept it contains; its anchor prompt replaces each
of them by that concept's anchor. Without prompts, each concept gets
``"a picture of X"`` and ``"X"`` (the one-concept default). With prompts, a concept that
occurs in none of them is refused: a typo in a list of concepts must not pass silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DitlocError
from ..text import find_occurrences, substitute


@dataclass(frozen=True)
class Erasure:
    """One concept to erase: `prompts` that contain it, `anchor_prompts` (one per prompt)
    that show the anchor instead; `blocks`, once chosen, the blocks its edit changes."""

    concept: str
    anchor: str | None
    prompts: tuple[str, ...]
    anchor_prompts: tuple[str, ...]
    blocks: tuple[str, ...] = field(default=())

    def with_blocks(self, blocks) -> Erasure:
        return Erasure(self.concept, self.anchor, self.prompts, self.anchor_prompts, tuple(blocks))

    def to_dict(self) -> dict:
        return {"concept": self.concept, "anchor": self.anchor, "prompts": list(self.prompts),
                "anchor_prompts": list(self.anchor_prompts), "blocks": list(self.blocks)}


def read_concepts_file(path, default_anchor: str | None = None) -> list[tuple[str, str | None]]:
    """``concept[=anchor]`` a line, ``#`` comments and blank lines skipped; a line
    without ``=`` takes `default_anchor`. Bad lines: one line naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DitlocError(f"--concepts-file {path} not found; pass a text file with one concept[=anchor] a line")
    pairs = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.count("=") > 1:
            raise DitlocError(f"{path}:{n}: {raw.strip()!r} has two '='; write concept=anchor")
        concept, _, anchor = line.partition("=")
        if not concept.strip():
            raise DitlocError(f"{path}:{n}: {raw.strip()!r} names no concept; write concept=anchor")
        if "=" in line and not anchor.strip():
            raise DitlocError(f"{path}:{n}: {raw.strip()!r} has an empty anchor; write concept=anchor or leave "
                              "out '=' to use --anchor")
        pairs.append((concept.strip(), anchor.strip() if "=" in line else default_anchor))
    if not pairs:
        raise DitlocError(f"--concepts-file {path} lists no concept; write one concept[=anchor] a line")
    return pairs


def check_pairs(pairs) -> list[tuple[str, str | None]]:
    """Concept/anchor pairs without duplicates, empty words or anchors that are
    themselves erased. -> the pairs, stripped."""
    out = [(str(c).strip(), None if a is None else str(a).strip()) for c, a in pairs]
    if not out:
        raise DitlocError("no concept to erase; pass --concept X --anchor Y")
    seen = {}
    for concept, anchor in out:
        if not concept:
            raise DitlocError("the concept is empty; pass --concept 'the words to forget'")
        key = concept.lower()
        if key in seen:
            raise DitlocError(f"the concept {concept!r} is listed twice; list each concept once")
        seen[key] = concept
    for concept, anchor in out:
        if anchor is None:
            continue
        if not anchor:
            raise DitlocError(f"the anchor of {concept!r} is empty; pass --anchor 'what to show instead', e.g. 'a dog'")
        for other in seen.values():
            if find_occurrences(anchor, other):
                if other.lower() == concept.lower():
                    raise DitlocError(f"the anchor {anchor!r} contains the concept {concept!r}; the anchor is what "
                                      "to show instead, without it")
                raise DitlocError(f"the anchor {anchor!r} of {concept!r} contains the erased concept {other!r}; an "
                                  "anchor is what to show instead, and must not be erased itself")
    return out


def plan_erasures(pairs, prompts=None, anchor_prompts=None) -> list[Erasure]:
    """The erasures of `pairs` ((concept, anchor) with anchor None where `anchor_prompts`
    replaces it): each concept's prompts among `prompts` (default: two per concept) and
    their anchor prompts (`anchor_prompts`, one per prompt, or every erased concept in the
    prompt replaced by its anchor)."""
    pairs = check_pairs(pairs)
    if prompts is not None:
        prompts = [str(p) for p in prompts]
        if not prompts or not all(p.strip() for p in prompts):
            raise DitlocError("a training prompt is empty; pass prompts that contain the concepts")
    if anchor_prompts is not None:
        anchor_prompts = [str(a) for a in anchor_prompts]
        if prompts is None or len(anchor_prompts) != len(prompts):
            raise DitlocError(f"{len(anchor_prompts)} anchor prompts for {len(prompts or [])} prompts; give one "
                              "per prompt")
    elif any(a is None for _, a in pairs):
        missing = next(c for c, a in pairs if a is None)
        raise DitlocError(f"no anchor for {missing!r}; pass --anchor (the default) or write {missing}=anchor")
    if prompts is None:
        prompts = [p for c, _ in pairs for p in (f"a picture of {c}", c)]
    for i, p in enumerate(prompts):
        if not any(find_occurrences(p, c) for c, _ in pairs):
            if len(pairs) == 1:
                raise DitlocError(f"prompt {i + 1} ({p!r}) does not contain the concept {pairs[0][0]!r}")
            names = ", ".join(repr(c) for c, _ in pairs)
            raise DitlocError(f"prompt {i + 1} ({p!r}) contains none of the concepts to erase ({names})")
    if anchor_prompts is None:
        anchor_prompts = [_anchored(p, pairs) for p in prompts]
    for i, a in enumerate(anchor_prompts):
        for c, _ in pairs:
            if find_occurrences(a, c):
                raise DitlocError(f"anchor prompt {i + 1} ({a!r}) still contains the concept {c!r}")
    out = []
    for concept, anchor in pairs:
        rows = [i for i, p in enumerate(prompts) if find_occurrences(p, concept)]
        if not rows:
            raise DitlocError(f"the concept {concept!r} occurs in none of the prompts; add prompts with it or "
                              "check its spelling")
        out.append(Erasure(concept, anchor, tuple(prompts[i] for i in rows), tuple(anchor_prompts[i] for i in rows)))
    return out


def _anchored(prompt: str, pairs) -> str:
    for concept, anchor in pairs:
        if find_occurrences(prompt, concept):
            prompt = substitute(prompt, concept, anchor, articles=False)
    return prompt


def check_preserve(preserve, erasures) -> list[str]:
    """Preservation prompts: not empty, none containing an erased concept."""
    preserve = [str(p) for p in preserve]
    for i, p in enumerate(preserve):
        for e in erasures:
            if find_occurrences(p, e.concept):
                raise DitlocError(f"preservation prompt {i + 1} ({p!r}) contains the concept {e.concept!r}; "
                                  "preserve only prompts without the erased concepts")
    return preserve
