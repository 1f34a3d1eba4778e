"""Reading probe files (JSON or YAML), with errors that name the file and line.

Every value read from a file has a path (`categories.style.concepts[3]`); the
parser records the line each path starts on, so a schema error points at the
entry that is wrong. The format is documented in `ditloc.probes`.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, NoReturn

from ..errors import DitlocError
from ..text import find_occurrences
from .core import Category, CleanRule, Concept, ProbeSet, check_template

KeyPath = tuple  # a value's place in the document: ("categories", "style", "concepts", 3)

TOP_KEYS = ("name", "base", "description", "sources", "categories")
CATEGORY_KEYS = ("description", "concepts", "localization_prompts", "evaluation_prompts", "clean_rule", "eval_text")
REQUIRED_FOR_NEW = ("concepts", "localization_prompts", "evaluation_prompts", "eval_text")
CONCEPT_KEYS = ("name", "text", "replacement")
RULE_KEYS = ("replacement", "drop")
BASES = ("lock", "toy", "none")


# --------------------------------------------------------------------------
# Line maps: value path -> line number (1-based)
# --------------------------------------------------------------------------


def _json_lines(text: str) -> dict[KeyPath, int]:
    """Line of every value in a JSON document (of a mapping entry: its key's line).
    The text must already be valid JSON."""
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]
    decoder = json.JSONDecoder()
    space = re.compile(r"\s*")
    lines: dict[KeyPath, int] = {}

    def line(i: int) -> int:
        return bisect.bisect_right(newlines, i - 1) + 1

    def skip(i: int) -> int:
        return space.match(text, i).end()

    def value(i: int, path: KeyPath) -> int:
        i = skip(i)
        lines.setdefault(path, line(i))
        if text[i] == "{":
            i = skip(i + 1)
            while text[i] != "}":
                key_at = i
                key, i = json.decoder.scanstring(text, i + 1)
                lines[path + (key,)] = line(key_at)
                i = value(skip(i) + 1, path + (key,))  # + 1: the ':'
                i = skip(i)
                i = skip(i + 1) if text[i] == "," else i
            return i + 1
        if text[i] == "[":
            i, n = skip(i + 1), 0
            while text[i] != "]":
                i = skip(value(i, path + (n,)))
                i = skip(i + 1) if text[i] == "," else i
                n += 1
            return i + 1
        _, end = decoder.raw_decode(text, i)
        return end

    value(0, ())
    return lines


def _yaml_lines(node, path: KeyPath = (), lines: dict | None = None) -> dict[KeyPath, int]:
    """Line of every value in a composed YAML node tree (of a mapping entry: its key's line)."""
    import yaml

    lines = {} if lines is None else lines
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[path + (key,)] = key_node.start_mark.line + 1
            _yaml_lines(value_node, path + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for n, item in enumerate(node.value):
            _yaml_lines(item, path + (n,), lines)
    return lines


def read_document(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse a probe file -> (data, line map). Syntax errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DitlocError(f"cannot read probe file {path}: {e}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DitlocError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
        return data, _json_lines(text)
    try:
        import yaml
    except ImportError:
        raise DitlocError(f"reading {path} needs PyYAML (pip install pyyaml); or write the probe file as .json") from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        lines = text.splitlines()
        if "{concept}" in (lines[line - 1] if 0 < line <= len(lines) else ""):
            problem += " (quote a template that starts with {concept} or sits in a [...] list)"
        raise DitlocError(f"{path}:{line}: not valid YAML: {problem}") from None
    return data, ({} if node is None else _yaml_lines(node))


# --------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------


def _dotted(path: KeyPath) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class _Document:
    """A parsed probe file and where its values sit, for error messages."""

    def __init__(self, source: str, lines: dict[KeyPath, int]):
        self.source = source
        self.lines = lines

    def fail(self, path: KeyPath, message: str) -> NoReturn:
        line = next((self.lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in self.lines), None)
        where = f"{self.source}:{line}" if line is not None else self.source
        raise DitlocError(f"{where}: {_dotted(path) or 'file'}: {message}")

    def mapping(self, value, path: KeyPath, allowed: tuple[str, ...], what: str) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"{what} must be a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                self.fail(path + (key,), f"unknown key {key!r} in {what}; allowed: {', '.join(allowed)}")
        return value

    def string(self, value, path: KeyPath, *, empty_ok: bool = False) -> str:
        if not isinstance(value, str) or (not empty_ok and not value.strip()):
            self.fail(path, f"must be a {'' if empty_ok else 'non-empty '}string, got {value!r}")
        if "\n" in value:
            self.fail(path, f"must be one line, got {value!r}")
        return value

    def nonempty_list(self, value, path: KeyPath) -> list:
        if not isinstance(value, list) or not value:
            self.fail(path, f"must be a non-empty list, got {value!r}")
        return value

    def templates(self, value, path: KeyPath) -> tuple[str, ...]:
        out: list[str] = []
        for n, t in enumerate(self.nonempty_list(value, path)):
            problem = check_template(t)
            if problem:
                self.fail(path + (n,), problem)
            if t in out:
                self.fail(path + (n,), f"template {t!r} appears twice")
            out.append(t)
        return tuple(out)

    def concept(self, value, path: KeyPath) -> Concept:
        if isinstance(value, str):
            return Concept(self.string(value, path).strip())
        entry = self.mapping(value, path, CONCEPT_KEYS, "a concept")
        if "name" not in entry:
            self.fail(path, "a concept needs a 'name' (or write it as a plain string)")
        name = self.string(entry["name"], path + ("name",)).strip()
        text = self.string(entry.get("text", name), path + ("text",)).strip()
        if not find_occurrences(text, name):
            self.fail(path + ("text",), f"text {text!r} must contain the concept's name {name!r} (it is what localization looks for)")
        replacement = entry.get("replacement")
        if replacement is not None:
            replacement = self.string(replacement, path + ("replacement",), empty_ok=True)
        return Concept(name, text, replacement)

    def concepts(self, value, path: KeyPath) -> tuple[Concept, ...]:
        out: list[Concept] = []
        for n, item in enumerate(self.nonempty_list(value, path)):
            c = self.concept(item, path + (n,))
            if "{" in c.text or "}" in c.text:
                self.fail(path + (n,), f"concept {c.text!r} contains a brace")
            if any(o.name.lower() == c.name.lower() for o in out):
                self.fail(path + (n,), f"concept {c.name!r} appears twice")
            out.append(c)
        return tuple(out)

    def clean_rule(self, value, path: KeyPath) -> CleanRule:
        rule = self.mapping(value, path, RULE_KEYS, "a clean_rule")
        replacement = self.string(rule.get("replacement", ""), path + ("replacement",), empty_ok=True)
        drop = rule.get("drop", [])
        if not isinstance(drop, list):
            self.fail(path + ("drop",), f"must be a list of phrases with a {{concept}} slot, got {drop!r}")
        phrases = []
        for n, phrase in enumerate(drop):
            problem = check_template(phrase)
            if problem:
                self.fail(path + ("drop", n), problem)
            phrases.append(phrase)
        return CleanRule(replacement, tuple(phrases))


def _merge_concepts(base: tuple[Concept, ...], new: tuple[Concept, ...]) -> tuple[Concept, ...]:
    """Base concepts (an entry of `new` with the same name replaces one in place), then the new ones."""
    by_name = {c.name.lower(): c for c in new}
    merged = [by_name.pop(c.name.lower(), c) for c in base]
    return tuple(merged) + tuple(c for c in new if c.name.lower() in by_name)


def apply_document(base: ProbeSet | None, data, doc: _Document, *, name: str) -> ProbeSet:
    """`base` with the document's categories added or overridden."""
    top = doc.mapping(data, (), TOP_KEYS, "a probe file")
    if "categories" not in top:
        doc.fail((), "a probe file needs a 'categories' mapping")
    cats = top["categories"]
    if not isinstance(cats, dict) or not cats:
        doc.fail(("categories",), f"must be a non-empty mapping of category name -> category, got {cats!r}")
    merged = {c.name: c for c in (base.categories if base else ())}
    for cat_name, entry in cats.items():
        path = ("categories", cat_name)
        if not isinstance(cat_name, str) or not re.fullmatch(r"[A-Za-z_][\w-]*", cat_name):
            doc.fail(path, f"category name {cat_name!r} must be a word (letters, digits, _ or -)")
        entry = doc.mapping(entry, path, CATEGORY_KEYS, f"category {cat_name!r}")
        old = merged.get(cat_name)
        if old is None:
            missing = [k for k in REQUIRED_FOR_NEW if k not in entry]
            if missing:
                doc.fail(path, f"new category {cat_name!r} is missing {', '.join(map(repr, missing))} "
                               f"(a new category needs {', '.join(REQUIRED_FOR_NEW)})")
        fields = {}
        if "concepts" in entry:
            new = doc.concepts(entry["concepts"], path + ("concepts",))
            fields["concepts"] = _merge_concepts(old.concepts, new) if old else new
        for key in ("localization_prompts", "evaluation_prompts"):
            if key in entry:
                fields[key] = doc.templates(entry[key], path + (key,))
        if "eval_text" in entry:
            fields["eval_text"] = doc.string(entry["eval_text"], path + ("eval_text",))
            problem = check_template(fields["eval_text"])
            if problem:
                doc.fail(path + ("eval_text",), problem)
        if "clean_rule" in entry:
            fields["clean_rule"] = doc.clean_rule(entry["clean_rule"], path + ("clean_rule",))
        if "description" in entry:
            fields["description"] = doc.string(entry["description"], path + ("description",), empty_ok=True)
        merged[cat_name] = Category(name=cat_name, **fields) if old is None else dataclasses.replace(old, **fields)
    sources = (base.sources if base else ()) + (doc.source,)
    return ProbeSet(name, tuple(merged.values()), sources)


def _open(path: Path) -> tuple[dict, _Document]:
    data, lines = read_document(path)
    doc = _Document(str(path), lines)
    if data is None:
        doc.fail((), "the probe file is empty; see docs/probes.md for the format")
    return data, doc


def apply_probe_file(path: Path, base: ProbeSet | None, *, name: str | None = None) -> ProbeSet:
    """A probe file applied on top of `base` (None: on nothing), whatever its `base` key says."""
    data, doc = _open(path)
    return apply_document(base, data, doc, name=name or path.stem)


def read_probe_file(path: Path, builtins: dict) -> ProbeSet:
    """A probe file applied on top of the set its `base` key names (looked up in `builtins`)."""
    data, doc = _open(path)
    base_name = data.get("base", "lock") if isinstance(data, dict) else "lock"
    if base_name not in BASES:
        doc.fail(("base",), f"unknown base {base_name!r}; use one of {', '.join(BASES)}")
    base = None if base_name == "none" else builtins[base_name]()
    name = data.get("name") if isinstance(data, dict) else None
    return apply_document(base, data, doc, name=name if isinstance(name, str) and name else path.stem)
