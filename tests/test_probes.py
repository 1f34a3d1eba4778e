"""The shipped probe set's integrity, the toy probe set, user files and their errors."""

import itertools
import json
import re
from pathlib import Path

import pytest

from ditloc import DitlocError
from ditloc.probes import LOCK_CATEGORIES, SLOT, indefinite_article, load_probe_set, toy_probe_set
from ditloc.tokens import find_occurrences
from ditloc.toy import world

DOCS = Path(__file__).resolve().parents[1] / "docs" / "probes.md"
MIN_CONCEPTS = {"style": 30, "place": 15, "copyright": 30, "animal": 30, "celebrity": 30, "safety": 15}
DANGLING = {"a", "an", "the", "of", "by", "in", "with", "showing", "depicting", "full", "and", "at", "on"}


@pytest.fixture(scope="module")
def lock():
    return load_probe_set("lock")


def _all_prompts(category):
    for concept in category.concepts:
        for split in ("localization", "evaluation"):
            for prompt in category.prompts(concept.name, split):
                yield concept, prompt


def _articles_agree(text):
    """Every "a"/"an" agrees with the word after it."""
    for article, word in re.findall(r"(?<![\w'-])(a|an)\s+([\w'-]+)", text, flags=re.IGNORECASE):
        if article.lower() != indefinite_article(word):
            return False
    return True


# ---------------------------------------------------------------- the shipped set


def test_lock_counts(lock):
    assert lock.category_names == list(LOCK_CATEGORIES)
    for category in lock:
        assert len(category.concepts) >= MIN_CONCEPTS[category.name], category.name
        assert len(category.localization_prompts) >= 15 and len(category.evaluation_prompts) >= 25, category.name
        assert SLOT in category.eval_text and category.description


def test_lock_templates(lock):
    for category in lock:
        loc, ev = category.localization_prompts, category.evaluation_prompts
        assert not set(loc) & set(ev), f"{category.name}: a template is in both splits"
        assert len(set(loc)) == len(loc) and len(set(ev)) == len(ev)
        for t in loc + ev + (category.eval_text,) + category.clean_rule.drop:
            assert t.count(SLOT) == 1 and "{" not in t.replace(SLOT, "") and t == t.strip(), t


def test_lock_concepts_unique(lock):
    names = [c.name.lower() for category in lock for c in category.concepts]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    for category in lock:
        for c in category.concepts:
            assert c.name == c.name.strip() and c.text == c.name and "{" not in c.name


def test_lock_prompts_contain_the_concept_once(lock):
    for category in lock:
        for concept, prompt in _all_prompts(category):
            assert len(find_occurrences(prompt, concept.name)) == 1, (category.name, prompt)
            assert _articles_agree(prompt), prompt
        for concept in category.concepts:
            assert find_occurrences(category.eval_text_for(concept.name), concept.name)


def test_lock_clean_prompts_drop_the_concept(lock):
    for category in lock:
        clean_by_template: dict = {}  # (split, template index, replacement) -> clean prompts
        for concept in category.concepts:
            replacement = concept.replacement if concept.replacement is not None else category.clean_rule.replacement
            for split in ("localization", "evaluation"):
                for i, prompt in enumerate(category.prompts(concept.name, split)):
                    clean = category.clean_prompt(concept.name, prompt)
                    assert not find_occurrences(clean, concept.name), (prompt, clean)
                    assert clean and clean != prompt and clean == clean.strip()
                    assert "  " not in clean and " ," not in clean and clean.split()[-1].lower() not in DANGLING
                    assert _articles_agree(clean), (prompt, clean)
                    assert replacement in clean, (prompt, clean)
                    clean_by_template.setdefault((split, i, replacement), set()).add(clean)
        # the concept leaves no trace: concepts with the same replacement give the same clean prompt
        assert all(len(v) == 1 for v in clean_by_template.values()), category.name


def test_lock_examples(lock):
    assert lock.prompts("animal", "owl")[0] == "a photo of an owl in the wild"
    assert lock.clean_prompt("animal", "owl", "a photo of an owl in the wild") == "a photo of an animal in the wild"
    assert lock.clean_prompt("style", "Claude Monet", "a harbor at dawn, painted by Claude Monet") == "a harbor at dawn"
    assert lock.clean_prompt("style", "claude monet", "a crowded market square in Claude Monet's style") == \
        "a crowded market square"
    assert lock.clean_prompt("place", "the Eiffel Tower", "the Eiffel Tower at night") == "a tower at night"
    assert lock.clean_prompt("safety", "blood", "a dark alley at night with blood") == "a dark alley at night"
    assert lock.eval_text("animal", "owl") == "a photo of an owl"
    assert lock.eval_text("style", "Claude Monet") == "a painting in the style of Claude Monet"
    assert lock.prompts("animal", "owl", "train") == lock.prompts("animal", "owl", "localization")
    assert lock.prompts("animal", "owl", "heldout") == lock.prompts("animal", "owl", "evaluation")


def test_lookup_errors(lock):
    with pytest.raises(DitlocError, match="did you mean 'Claude Monet'"):
        lock.prompts("style", "Claude Monnet")
    with pytest.raises(DitlocError, match="no category 'styles'.*style, place"):
        lock.category("styles")
    with pytest.raises(DitlocError, match="unknown split"):
        lock.prompts("style", "Claude Monet", "test")
    with pytest.raises(DitlocError, match="is not in prompt"):
        lock.clean_prompt("style", "Claude Monet", "a painting of a dog")
    with pytest.raises(DitlocError, match="no probe set 'lokc'"):
        load_probe_set("lokc")


def test_to_dict_round_trip(lock, tmp_path):
    for probes in (lock, toy_probe_set()):
        path = tmp_path / f"{probes.name}.json"
        path.write_text(json.dumps(probes.to_dict(), indent=1))
        again = load_probe_set(path)
        assert again.categories == probes.categories and again.name == probes.name


# ---------------------------------------------------------------- the toy set


def _toy_scene(category, value, ctx):
    """The scene a toy probe prompt describes."""
    attrs = dict(shape=ctx["shape"], color=ctx["color"], style=ctx["style"], place=ctx["place"], character=None,
                 hazard=False)
    if category == "character":
        attrs.update(zip(("shape", "color", "style"), world.CHARACTER_LOOK[value]), character=value)
    elif category == "hazard":
        attrs["hazard"] = True
    else:
        attrs[category] = value
    return world.Scene(**attrs, size=20, x0=0, y0=0, bg_seed=0)


def test_toy_probe_set_follows_the_toy_world():
    from ditloc.probes.toy import toy_context

    toy = load_probe_set("toy")
    assert toy.category_names == list(world.CATEGORIES)
    vocabulary = set(world.vocabulary())
    for category in toy:
        assert category.concept_names == list(world.CATEGORIES[category.name])
        for concept in category.concepts:
            for split, templates in (("localization", world.TRAIN_TEMPLATES), ("evaluation", world.HELDOUT_TEMPLATES)):
                expected = {world.scene_prompt(_toy_scene(category.name, concept.name, toy_context(i)), t)
                            for i, t in itertools.product(range(3), templates)}
                prompts = toy.prompts(category.name, concept.name, split)
                assert set(prompts) == expected and len(prompts) == len(expected)
                for p in prompts:
                    assert world.concept_span(p, concept.name) is not None
                    assert {w for w, _, _ in world.tokenize_words(p)} <= vocabulary
                    clean = toy.clean_prompt(category.name, concept.name, p)
                    assert clean == world.clean_prompt(p, category.name, concept.name)
            label = "present" if category.name == "hazard" else concept.name
            assert toy.eval_text(category.name, concept.name) in (f"{category.name}: {concept.name}",
                                                                   f"{category.name}: {label}")
    heldout = set(toy.category("shape").prompts("star", "evaluation"))
    assert not heldout & set(toy.category("shape").prompts("star", "localization"))
    assert toy.concept("place", "beach").text == "on the beach"


# ---------------------------------------------------------------- user files

USER_YAML = """\
base: lock
categories:
  style:
    concepts:
      - Ivan Aivazovsky
      - {name: claude monet, replacement: an impressionist}
  mascots:
    concepts: [Bibendum, {name: Mr. Peanut, replacement: a peanut}]
    localization_prompts:
      - a photo of {concept} in a parade
      - "{concept} leading a parade"
    evaluation_prompts:
      - a drawing of {concept} on a wall
    clean_rule: {replacement: a mascot}
    eval_text: a photo of {concept}
"""


def test_user_file_adds_and_overrides(lock, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(USER_YAML)
    probes = load_probe_set(path)
    assert probes.name == "mine" and probes.sources == ("lock", str(path))
    assert probes.category_names == list(LOCK_CATEGORIES) + ["mascots"]
    style = probes.category("style")
    base_names = lock.concepts("style")
    monet = base_names.index("Claude Monet")
    expected = base_names[:monet] + ["claude monet"] + base_names[monet + 1 :] + ["Ivan Aivazovsky"]
    assert style.concept_names == expected  # Monet replaced in place, Aivazovsky appended
    assert style.concept("Claude Monet").name == "claude monet"
    assert probes.clean_prompt("style", "Claude Monet", "the sea as Claude Monet saw it") == "the sea as an impressionist saw it"
    assert probes.clean_prompt("style", "Claude Monet", "the sea, painted by Claude Monet") == "the sea"  # drop first
    assert style.localization_prompts == lock.category("style").localization_prompts
    assert probes.category("animal") == lock.category("animal")
    assert probes.prompts("mascots", "Mr. Peanut") == ["a photo of Mr. Peanut in a parade", "Mr. Peanut leading a parade"]
    assert probes.clean_prompt("mascots", "Mr. Peanut", "Mr. Peanut leading a parade") == "a peanut leading a parade"
    assert probes.clean_prompts("mascots", "Bibendum") == ["a drawing of a mascot on a wall"]


def test_user_json_on_toy_and_on_nothing(tmp_path):
    doc = {"base": "toy", "categories": {"shape": {"eval_text": "shape = {concept}"}}}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    probes = load_probe_set(tmp_path / "t.json")
    assert probes.eval_text("shape", "star") == "shape = star"
    assert probes.category("color") == toy_probe_set().category("color")
    doc = {"base": "none", "categories": {"pets": {"concepts": ["cat"], "localization_prompts": ["a {concept}"],
                                                   "evaluation_prompts": ["two {concept}s"], "eval_text": "a {concept}"}}}
    (tmp_path / "n.json").write_text(json.dumps(doc))
    probes = load_probe_set(tmp_path / "n.json")
    assert probes.category_names == ["pets"] and probes.clean_prompt("pets", "cat", "a cat") == ""


def test_docs_example_loads(tmp_path):
    pytest.importorskip("yaml")
    example = re.search(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.DOTALL).group(1)
    path = tmp_path / "example.yaml"
    path.write_text(example)
    probes = load_probe_set(path)
    assert probes.name == "my-probes" and "mascots" in probes.category_names
    assert probes.prompts("mascots", "Michelin Man") == ["a photo of the Michelin Man in a parade",
                                                         "the Michelin Man leading a parade"]


# ---------------------------------------------------------------- malformed files

GOOD_JSON = {
    "base": "none",
    "categories": {
        "pets": {
            "concepts": ["cat", "dog"],
            "localization_prompts": ["a {concept} on a sofa", "a {concept} in a garden"],
            "evaluation_prompts": ["a sleeping {concept}"],
            "eval_text": "a photo of a {concept}",
        }
    },
}


def _line_of(text, needle):
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def _error(path):
    with pytest.raises(DitlocError) as info:
        load_probe_set(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}:")
    return message


@pytest.mark.parametrize(
    "edit, needle, match",
    [
        (lambda d: d["categories"]["pets"]["localization_prompts"].__setitem__(1, "a dog in a garden"),
         "a dog in a garden", "no {concept} slot"),
        (lambda d: d["categories"]["pets"]["evaluation_prompts"].append("a {concept} and a {concept}"),
         "a {concept} and a {concept}", "2 {concept} slots"),
        (lambda d: d["categories"]["pets"]["evaluation_prompts"].append("a {concept} named {name}"), "named {name}", "brace"),
        (lambda d: d["categories"]["pets"]["concepts"].append("Cat"), '"Cat"', "appears twice"),
        (lambda d: d["categories"]["pets"].pop("eval_text"), '"pets"', "missing 'eval_text'"),
        (lambda d: d["categories"]["pets"].__setitem__("evaluation_prompt", ["x {concept}"]),
         '"evaluation_prompt"', "unknown key 'evaluation_prompt'"),
        (lambda d: d["categories"]["pets"]["concepts"].append({"name": "owl", "text": "an eagle"}), '"an eagle"',
         "must contain the concept's name"),
        (lambda d: d["categories"]["pets"].__setitem__("clean_rule", {"drop": ["by someone"]}), '"by someone"',
         "no {concept} slot"),
        (lambda d: d.__setitem__("base", "lox"), '"lox"', "unknown base 'lox'"),
        (lambda d: d["categories"]["pets"].__setitem__("concepts", []), '"concepts"', "non-empty list"),
    ],
)
def test_json_schema_errors_name_the_line(tmp_path, edit, needle, match):
    doc = json.loads(json.dumps(GOOD_JSON))
    edit(doc)
    text = json.dumps(doc, indent=2)
    path = tmp_path / "probes.json"
    path.write_text(text)
    message = _error(path)
    assert message.startswith(f"{path}:{_line_of(text, needle)}:"), message
    assert match in message, message


def test_json_syntax_error_names_the_line(tmp_path):
    text = json.dumps(GOOD_JSON, indent=2).replace('"a {concept} on a sofa",', '"a {concept} on a sofa"')
    path = tmp_path / "probes.json"
    path.write_text(text)
    message = _error(path)
    assert message.startswith(f"{path}:{_line_of(text, 'a {concept} in a garden')}: not valid JSON"), message


def test_yaml_errors_name_the_line(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "probes.yaml"
    bad_template = USER_YAML.replace("a drawing of {concept} on a wall", "a drawing on a wall")
    path.write_text(bad_template)
    message = _error(path)
    assert message.startswith(f"{path}:{_line_of(bad_template, 'a drawing on a wall')}: "
                              "categories.mascots.evaluation_prompts[0]: template"), message
    bad_concept = USER_YAML.replace("[Bibendum, {name: Mr. Peanut", "[Bibendum, {nmae: Mr. Peanut")
    path.write_text(bad_concept)
    assert _error(path).startswith(f"{path}:{_line_of(bad_concept, 'nmae')}: categories.mascots.concepts[1].nmae: unknown key")
    bad_syntax = USER_YAML.replace("      - Ivan Aivazovsky", "      - Ivan Aivazovsky\n     bad: [")
    path.write_text(bad_syntax)
    assert re.match(rf"{re.escape(str(path))}:\d+: not valid YAML", _error(path))
    path.write_text("")
    assert "empty" in _error(path)
