"""ditloc.text: finding a concept, substituting it and tidying, by property and example."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from ditloc.text import find_occurrences, fit_article, indefinite_article, substitute, tidy

# concept words, words that contain them, and filler; "qqq" never occurs (a replacement marker)
WORDS = ["dog", "dogma", "hotdog", "van", "gogh", "vangogh", "a", "an", "owl", "the", "of", "photo", "x_1", "Émile"]
MARKER = "QQQ"
SEPARATORS = [" ", "  ", "\t", "\n ", ", ", " . ", "; ", "-", "'"]

words = st.sampled_from(WORDS)
cased = words.flatmap(lambda w: st.sampled_from([w, w.upper(), w.capitalize()]))


@st.composite
def texts(draw, max_words: int = 10, around: str = "") -> str:
    """Words from WORDS in random case, joined by spaces, tabs, newlines and punctuation;
    with `around`, mostly that concept, its words, and it nested in itself ("van van gogh
    gogh"), so that taking it out can join a new occurrence."""
    nested = around.replace(" ", f" {around} ", 1)
    pieces = st.sampled_from([around, nested, *around.split()]) if around else cased
    n = draw(st.integers(0, max_words))
    parts = []
    for i in range(n):
        parts.append(draw(st.one_of(cased, pieces, pieces)))
        if i < n - 1:
            parts.append(draw(st.sampled_from(SEPARATORS)))
    return draw(st.sampled_from(["", " ", ", "])) + "".join(parts) + draw(st.sampled_from(["", " ", ".", " ,"]))


concepts = st.lists(words, min_size=1, max_size=2).map(" ".join)
settings_ = settings(max_examples=300, deadline=None)


def spaced(concept: str, draw_ws) -> str:
    """`concept` with each space replaced by some other run of whitespace."""
    return "".join(draw_ws() if ch == " " else ch for ch in concept)


# ---------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------


@settings_
@given(concepts, st.booleans(), st.data())
def test_removed_concept_is_gone(concept, articles, data):
    text = data.draw(texts(around=concept))
    out = substitute(text, concept, "", articles=articles)
    assert find_occurrences(out, concept) == [], (text, out)
    assert find_occurrences(tidy(out), concept) == [], (text, out)


@settings_
@given(concepts, st.data())
def test_replacement_sits_where_each_occurrence_was(concept, data):
    text = data.draw(texts(around=concept))
    spans = find_occurrences(text, concept)
    out = substitute(text, concept, MARKER, articles=False)
    # find and substitute agree: one replacement per occurrence, the rest of the text untouched
    assert len(find_occurrences(out, MARKER)) == len(spans)
    pos, shift = 0, 0
    for a, b in spans:
        assert out[pos + shift : a + shift] == text[pos:a]
        assert out[a + shift : a + shift + len(MARKER)] == MARKER
        shift += len(MARKER) - (b - a)
        pos = b
    assert out[pos + shift :] == text[pos:]
    assert find_occurrences(out, concept) == []


@settings_
@given(concepts, st.data())
def test_replacing_with_articles_replaces_every_occurrence(concept, data):
    text = data.draw(texts(around=concept))
    spans = find_occurrences(text, concept)
    out = substitute(text, concept, MARKER)
    assert len(find_occurrences(out, MARKER)) == len(spans)
    if spans:
        assert out.endswith(text[spans[-1][1] :])


@settings_
@given(texts(max_words=4), concepts, texts(max_words=4), st.data())
def test_find_tolerates_case_and_whitespace(before, concept, after, data):
    variant = spaced(concept, lambda: data.draw(st.sampled_from([" ", "  ", "\t", "\n", " \n\t"])))
    variant = data.draw(st.sampled_from([variant, variant.upper(), variant.title(), variant.swapcase()]))
    text = before + " . " + variant + " . " + after  # no match runs across the dots
    start = len(before) + 3
    assert (start, start + len(variant)) in find_occurrences(text, concept)
    assert (start, start + len(variant)) in find_occurrences(text, " " + variant.lower() + "\t")


@settings_
@given(concepts, st.text(alphabet="abcxyz_019É", min_size=1, max_size=4), texts(max_words=4))
def test_find_never_matches_inside_a_longer_word(concept, glue, rest):
    assert find_occurrences(glue + concept, concept) == []
    assert find_occurrences(concept + glue, concept) == []
    for a, b in find_occurrences(rest + " " + concept + glue + " " + concept, concept):
        text = rest + " " + concept + glue + " " + concept
        assert a == 0 or not re.match(r"\w", text[a - 1])
        assert b == len(text) or not re.match(r"\w", text[b])


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=list("ab ,.;:!?\t\n'-"), max_size=30))
def test_tidy_is_idempotent_and_tidy(text):
    out = tidy(text)
    assert tidy(out) == out
    assert "  " not in out and out == out.strip() and not re.search(r"\s[,.;:!?]", out)
    assert not out.startswith((",", ";", ":")) and not out.endswith((",", ";", ":"))


@settings_
@given(texts())
def test_tidy_keeps_the_words(text):
    """Tidying only moves spaces and drops repeated or dangling , ; : -- every word stays."""
    assert re.findall(r"\w+", tidy(text)) == re.findall(r"\w+", text)


# ---------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------


def test_find_examples():
    assert find_occurrences("a dogma and a Dog", "dog") == [(14, 17)]
    assert find_occurrences("a photo of Van\n Gogh.", " van gogh ") == [(11, 20)]
    assert find_occurrences("Mr. Peanut and mr.  peanut", "Mr. Peanut") == [(0, 10), (15, 26)]
    assert find_occurrences("asp.net", ".net") == [(3, 7)]  # no word boundary where the concept has none
    assert find_occurrences("anything", "  ") == []


def test_substitute_examples():
    assert substitute("a photo of an owl", "owl", "dog") == "a photo of a dog"
    assert substitute("a photo of an owl", "owl", "dog", articles=False) == "a photo of an dog"
    assert substitute("An owl, an owl", "owl", "eagle") == "An eagle, an eagle"
    assert substitute("a cat sitting", "cat") == "a  sitting"
    assert substitute("a photo of a cat", "cat") == "a photo of "  # no word follows: the article goes too
    assert substitute("an orange circle", "orange") == "a  circle"
    assert substitute("van van gogh gogh", "van gogh") == ""  # removal repeats until none is left
    assert substitute("a dog", "cat", "bird") == "a dog"


def test_tidy_examples():
    assert tidy(" , a photo of , smiling ,") == "a photo of, smiling"
    assert tidy("a tower in the style of .") == "a tower in the style of."
    assert tidy("x ,; y\t\tz") == "x, y z"


def test_articles():
    assert [indefinite_article(w) for w in ("owl", "dog", "hour", "unicorn", "Eiffel", "one")] == \
        ["an", "a", "an", "a", "an", "a"]
    assert fit_article("a photo of a ", "owl at night") == "a photo of an "
    assert fit_article("An ", "dog") == "A "
    assert fit_article("a photo of a ", "") == "a photo of "
    assert fit_article("a banana ", "owl") == "a banana "
