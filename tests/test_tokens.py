"""Concept -> token positions, checked against the embedding the transformer receives."""

import functools
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ditloc
from ditloc.adapters import get_adapter
from ditloc.errors import DitlocError
from ditloc.testing import WORDS

localize_contribution = functools.partial(ditloc.localize, method="contribution")


def ids_seen_by_transformer(pipe, prompt, **call):
    """Token id at every position of the text sequence the transformer receives in a real
    `pipe(...)` call: the text encoder's output is replaced by its input ids, and the
    transformer's `encoder_hidden_states` argument is captured."""
    seen = {}

    def encoder_hook(module, args, kwargs, out):
        ids = args[0] if args else kwargs["input_ids"]
        out[0].copy_(ids[..., None].to(out[0].dtype).expand_as(out[0]))
        return out

    def transformer_hook(module, args, kwargs):
        seen.setdefault("embeds", kwargs["encoder_hidden_states"].clone())
        seen.setdefault("mask", kwargs["encoder_attention_mask"].clone())

    h1 = pipe.text_encoder.register_forward_hook(encoder_hook, with_kwargs=True)
    h2 = pipe.transformer.register_forward_pre_hook(transformer_hook, with_kwargs=True)
    try:
        pipe(prompt, num_inference_steps=2, guidance_scale=1.0, output_type="latent", height=32, width=32,
             use_resolution_binning=False, **call)
    finally:
        h1.remove()
        h2.remove()
    return seen["embeds"][0, :, 0].round().long().tolist(), seen["mask"][0].tolist()


def check(pipe, prompt, concept, n_occurrences=None, **call):
    adapter = get_adapter(pipe)
    span = adapter.concept_span(prompt, concept, call)
    ids, mask = ids_seen_by_transformer(pipe, prompt, **call)
    want = pipe.tokenizer(concept.lower(), add_special_tokens=False)["input_ids"]
    got = [ids[p] for p in span.positions]
    assert all(mask[p] == 1 for p in span.positions)
    # positions cover whole occurrences of the concept's token sequence
    assert len(got) % len(want) == 0 and got == want * (len(got) // len(want)), (span, ids)
    if n_occurrences is not None:
        assert len(got) == n_occurrences * len(want)
    return span


CASES = [
    ("van gogh painting of a dog", "Van Gogh", 1),  # start, multi-token, case
    ("a painting of a dog by van gogh", "van gogh", 1),  # end
    ("van gogh and van gogh again, van gogh.", "Van Gogh", 3),  # repeated, punctuation
    ("a photo of Snoopy!", "snoopy", 1),  # punctuation right after
    ("A PHOTO OF THE EIFFEL TOWER", "Eiffel Tower", 1),  # the model reads lowercase
]


@pytest.mark.parametrize("prompt,concept,n", CASES)
def test_positions_pixart(pixart, prompt, concept, n):
    check(pixart, prompt, concept, n)


@pytest.mark.parametrize("prompt,concept,n", CASES)
@pytest.mark.parametrize("instruction", [None, [], ["given a prompt, describe it:", "user prompt:"]])
def test_positions_sana(sana, prompt, concept, n, instruction):
    """SANA with its default (long) complex human instruction, none, and a short one."""
    call = {} if instruction is None else {"complex_human_instruction": instruction}
    span = check(sana, prompt, concept, n, **call)
    if instruction is None:  # the default instruction is long: positions are re-indexed into the crop
        assert min(span.positions) < 40


def test_sana_instruction_shifts_positions(sana):
    on = get_adapter(sana).concept_span("a photo of snoopy", "snoopy", {})
    off = get_adapter(sana).concept_span("a photo of snoopy", "snoopy", {"complex_human_instruction": []})
    assert on.positions != off.positions and off.positions == (4,)  # <bos> a photo of snoopy


def test_truncation_is_an_error(pixart):
    prompt = "a photo of a dog in the city " * 3 + "by van gogh"
    with pytest.raises(DitlocError, match="cut off by max_sequence_length=8"):
        get_adapter(pixart).concept_span(prompt, "van gogh", {"max_sequence_length": 8})
    # the end token takes the last slot: a concept ending exactly at position L-1 is cut
    with pytest.raises(DitlocError, match="cut off"):
        get_adapter(pixart).concept_span("a photo of van gogh", "van gogh", {"max_sequence_length": 5})
    check(pixart, "a photo of van gogh", "van gogh", 1, max_sequence_length=6)


def test_partial_truncation_keeps_surviving_occurrences(pixart):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        span = check(pixart, "van gogh in the city at night with van gogh", "van gogh", 1, max_sequence_length=8)
    assert any("cut off" in str(x.message) for x in w)
    assert span.positions == (0, 1)


def test_missing_concept_is_an_error(pixart):
    with pytest.raises(DitlocError, match="not in prompt"):
        get_adapter(pixart).concept_span("a photo of a dog", "snoopy", {})
    with pytest.raises(DitlocError, match="empty"):
        get_adapter(pixart).concept_span("a photo of a dog", "  ", {})
    # substrings of other words do not count
    with pytest.raises(DitlocError, match="not in prompt"):
        get_adapter(pixart).concept_span("a photo of a dogma", "dog", {})


def test_clean_caption_rewrites_are_followed(pixart):
    """clean_caption=True rewrites text when bs4/ftfy are present, else lowercases; either way
    the positions must point at the concept in the text the tokenizer saw."""
    check(pixart, "A photo of Van Gogh", "Van Gogh", 1, clean_caption=True)


VOCAB = [w for w in WORDS if w not in ("van", "gogh")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    before=st.lists(st.sampled_from(VOCAB), max_size=6),
    after=st.lists(st.sampled_from(VOCAB), max_size=6),
    repeat=st.integers(1, 3),
    punct=st.sampled_from(["", ",", ".", "!"]),
    upper=st.booleans(),
)
def test_positions_property(pixart, sana, before, after, repeat, punct, upper):
    concept = "Van Gogh" if upper else "van gogh"
    prompt = " ".join(before + [(concept + punct + " ") * repeat] + after).strip()
    for pipe in (pixart, sana):
        check(pipe, prompt, concept, repeat)


def test_localize_validates_before_running(pixart):
    with pytest.raises(DitlocError, match="not in prompt"):
        localize_contribution(pixart, ["a photo of van gogh", "a dog"], "van gogh", num_inference_steps=2)
    with pytest.raises(DitlocError, match="no prompts"):
        localize_contribution(pixart, [], "van gogh")
    with pytest.raises(DitlocError, match="unknown contribution terms 'bogus'"):
        localize_contribution(pixart, ["van gogh"], "van gogh", contribution_terms="bogus")
