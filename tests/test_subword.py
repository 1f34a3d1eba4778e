"""Concept positions with subword tokenizers (T5 Unigram, Gemma BPE, CLIP byte-level BPE), in
every text stream a transformer reads, checked by decoding the token ids the transformer receives."""

import re
import subprocess
import sys

import pytest
import torch

from ditloc.adapters import get_adapter
from ditloc.errors import DitlocError
from ditloc.testing import (
    tiny_flux_pipeline, tiny_pixart_pipeline, tiny_pixart_sigma_pipeline, tiny_sana_pipeline, tiny_sd3_pipeline,
)
from ditloc.testing_tokenizers import CORPUS, clip_tokenizer, gemma_tokenizer, t5_tokenizer

CROSS_RUN = dict(num_inference_steps=2, height=32, width=32, use_resolution_binning=False, clean_caption=False)
FAMILIES = {  # builder, call arguments
    "pixart": (tiny_pixart_pipeline, CROSS_RUN),
    "sigma": (tiny_pixart_sigma_pipeline, CROSS_RUN),
    "sana": (tiny_sana_pipeline, dict(CROSS_RUN)),  # its default (long) complex human instruction
    "sana_plain": (tiny_sana_pipeline, dict(CROSS_RUN, complex_human_instruction=[])),
    "flux": (tiny_flux_pipeline, dict(num_inference_steps=2, height=16, width=16, max_sequence_length=48)),
    "sd3": (tiny_sd3_pipeline, dict(num_inference_steps=2, height=8, width=8, max_sequence_length=48)),
}
_PIPES = {}


def subword(name):
    make = FAMILIES[name][0]
    if make not in _PIPES:
        pipe = make(tokenizers="subword")
        pipe.set_progress_bar_config(disable=True)
        _PIPES[make] = pipe
    return _PIPES[make]


def streams(name, pipe):
    """(tokenizer, channel, positions, lowercases) of each text stream in the transformer's text sequence:
    which tokenizer's ids sit at those positions (the encoders are made to output their input ids in every
    channel) and whether the text reaches that tokenizer lowercased (the model reads it so)."""
    if name == "sd3":  # CLIP-L | CLIP-G along channels (77 positions), then T5
        clip = range(pipe.tokenizer_max_length)
        width = pipe.text_encoder.config.hidden_size
        return [(pipe.tokenizer, 0, clip, True), (pipe.tokenizer_2, width, clip, True),
                (pipe.tokenizer_3, 0, range(clip.stop, 10**6), False)]
    if name == "flux":  # the T5 stream; CLIP only feeds the pooled vector
        return [(pipe.tokenizer_2, 0, range(10**6), False)]
    return [(pipe.tokenizer, 0, range(10**6), True)]  # PixArt and SANA lowercase the prompt


class _Seen(Exception):
    pass


def text_seen(pipe, prompt, run):
    """The conditional row [L, D] of the text the transformer receives in a real `pipe(...)` call when
    every text encoder outputs its input ids in every channel (the call ends at the transformer)."""
    encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    seen = {}

    def as_ids(module, args, kwargs, out):
        ids = args[0] if args else kwargs["input_ids"]
        values = list(out.values()) if hasattr(out, "values") else list(out)
        for value in values:
            for t in value if isinstance(value, tuple) else (value,):
                if torch.is_tensor(t) and t.ndim == 3 and t.shape[:2] == ids.shape:
                    t.copy_(ids[..., None].to(t.dtype).expand_as(t))

    def stop(module, args, kwargs):
        seen["text"] = kwargs["encoder_hidden_states"][-1].clone()  # the last row is the conditional one
        raise _Seen

    handles = [e.register_forward_hook(as_ids, with_kwargs=True) for e in encoders if e is not None]
    handles.append(pipe.transformer.register_forward_pre_hook(stop, with_kwargs=True))
    try:
        pipe(prompt, output_type="latent", **run)
    except _Seen:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen["text"]


def occurrences(prompt, concept):
    """The concept's occurrences in the prompt, as whole words (an oracle independent of ditloc.text)."""
    pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, concept.split())) + r"(?!\w)"
    return [m.group(0) for m in re.finditer(pattern, prompt, flags=re.IGNORECASE)]


def runs(positions):
    """Maximal runs of consecutive positions."""
    out = []
    for p in sorted(positions):
        if out and p == out[-1][-1] + 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def normalized(text):
    return " ".join(text.split())


CASES = [
    ("a photo of a zibbitron in the city", "zibbitron"),  # one word in several pieces
    ("Zibbit on the beach at night", "zibbit"),  # first word, a capital in the prompt
    ("a zibbit, a dog and a zibbit.", "Zibbit"),  # twice, punctuation right after, a capital in the concept
    ("a dog with a zibbit! and a zibbit's toy", "zibbit"),  # "!" (SD3's second CLIP pads with it), possessive
    ("a painting of the Eiffel Tower by van gogh", "eiffel tower"),  # several words the vocabulary knows
    ("a ZIBBIT gogh near the river", "zibbit gogh"),  # several words, one of them in pieces
    ("a zibbitron and a zibbit in the snow", "zibbit"),  # also the start of a longer word, not matched there
    ("a  photo of\tzibbit   gogh", "zibbit gogh"),  # other whitespace than one space
]


@pytest.mark.parametrize("prompt,concept", CASES)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_positions_decode_to_the_concept(name, prompt, concept):
    pipe, run = subword(name), FAMILIES[name][1]
    adapter = get_adapter(pipe)
    span = adapter.concept_span(prompt, concept, run)
    text = text_seen(pipe, prompt, run)  # [L, D]
    expected = occurrences(prompt, concept)
    assert len(expected) == len(span.char_spans)
    token_ids = adapter.text_token_ids(prompt, run)  # the adapter's view of the same sequence
    tokens = []
    for tokenizer, channel, where, lowercases in streams(name, pipe):
        where = range(where.start, min(where.stop, text.shape[0]))
        ids = text[:, channel].round().long().tolist()
        if channel == 0:
            assert [token_ids[p] for p in where if p < len(token_ids)] == [ids[p] for p in where if p < len(token_ids)]
        mine = [p for p in span.positions if p in where]
        found = runs(mine)
        assert len(found) == len(expected), (name, tokenizer.convert_ids_to_tokens([ids[p] for p in mine]))
        for run_, occurrence in zip(found, expected):
            decoded = tokenizer.decode([ids[p] for p in run_])
            assert normalized(decoded) == normalized(occurrence.lower() if lowercases else occurrence), decoded
            if "zibbit" in concept.lower():  # outside the corpus: in pieces
                assert len(run_) > 1
        if channel == 0:
            tokens += tokenizer.convert_ids_to_tokens([ids[p] for p in mine])
    assert list(span.tokens) == tokens  # what a person reads in the span is what the model reads


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_concept_only_inside_a_longer_word_is_absent(name):
    pipe, run = subword(name), FAMILIES[name][1]
    with pytest.raises(DitlocError, match="not in prompt"):
        get_adapter(pipe).concept_span("a zibbitron on the beach", "zibbit", run)


@pytest.mark.parametrize("name", ["pixart", "sana_plain", "flux", "sd3"])
def test_a_concept_cut_inside_its_pieces_is_cut_off(name):
    """Truncation that keeps only the first pieces of a word cuts the concept off."""
    pipe, run = subword(name), FAMILIES[name][1]
    adapter = get_adapter(pipe)
    prompt = "a photo of a dog by a zibbitron"
    if name == "sd3":
        adapter = get_adapter(pipe, text_stream="t5")
        first = min(adapter.concept_span(prompt, "zibbitron", run).positions) - pipe.tokenizer_max_length
    else:
        first = min(adapter.concept_span(prompt, "zibbitron", run).positions)
    # two of its pieces and the end token fit (SANA has a <bos> first and no end token: three pieces)
    cut = dict(run, max_sequence_length=first + 3)
    with pytest.raises(DitlocError, match="cut off by max_sequence_length"):
        adapter.concept_span(prompt, "zibbitron", cut)


# ---- the tokenizers themselves ------------------------------------------------------------------


def test_tokenizers_split_like_their_checkpoints():
    t5, gemma, clip = t5_tokenizer(), gemma_tokenizer(), clip_tokenizer()
    assert not any("zibbit" in line.lower() for line in CORPUS)
    # T5: "▁" starts a word, cased, </s> appended; an unknown word is several pieces
    pieces = t5.tokenize("a photo of zibbitron")
    assert pieces[:3] == ["▁a", "▁photo", "▁of"] and len(pieces) > 4 and pieces[3].startswith("▁")
    assert t5("zibbit")["input_ids"] != t5("Zibbit")["input_ids"]
    assert t5("a dog")["input_ids"][-1] == t5.eos_token_id
    # Gemma: <bos> first, no prefix space, "▁" inside
    ids = gemma("a photo of zibbit")["input_ids"]
    assert ids[0] == gemma.bos_token_id and gemma.convert_ids_to_tokens(ids)[1:3] == ["a", "▁photo"]
    # CLIP: lowercase, "</w>" ends a word, punctuation apart, <|startoftext|> ... <|endoftext|>
    ids = clip("A Zibbit, photo")["input_ids"]
    assert ids == clip("a zibbit , photo")["input_ids"]
    tokens = clip.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>" and "photo</w>" in tokens
    assert ",</w>" in tokens and sum(t.endswith("</w>") for t in tokens) == 4
    assert len(clip("a dog", padding="max_length")["input_ids"]) == 77
    for tok in (t5, gemma):  # lossless on the alphabet
        text = "Zibbit's 3 dogs: a (red) car!"
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_tokenizers_save_and_load(tmp_path):
    from transformers import AutoTokenizer

    text = "Zibbitron, a photo of the Eiffel Tower!"
    for i, tok in enumerate((t5_tokenizer(), gemma_tokenizer(), clip_tokenizer(pad_token="!"))):
        tok.save_pretrained(tmp_path / str(i))
        back = AutoTokenizer.from_pretrained(tmp_path / str(i))
        assert type(back) is type(tok) and back.pad_token == tok.pad_token
        want = tok(text, return_offsets_mapping=True)
        got = back(text, return_offsets_mapping=True)
        assert got["input_ids"] == want["input_ids"] and got["offset_mapping"] == want["offset_mapping"]


def test_learned_vocabularies_do_not_depend_on_the_process():
    """Learning is deterministic: another process (another hash seed) learns the same merges and scores."""
    code = ("from ditloc.testing_tokenizers import _unigram_vocab, _gemma_bpe, _clip_bpe; "
            "print(repr([_unigram_vocab(()), _gemma_bpe(()), _clip_bpe(())]))")
    from ditloc.testing_tokenizers import _clip_bpe, _gemma_bpe, _unigram_vocab

    here = repr([_unigram_vocab(()), _gemma_bpe(()), _clip_bpe(())])
    for seed in ("1", "2"):
        env = {**__import__("os").environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == here


def test_sd3_concept_past_the_clip_tokens_is_read_in_the_t5_part():
    """SD3 reads 77 CLIP tokens and more T5 tokens (several per word with subword tokenizers): a concept
    past CLIP's end takes its T5 positions, with a warning; cut off in both parts, it is an error."""
    pipe = subword("sd3")
    adapter = get_adapter(pipe)
    prompt = "a photo of a dog in the city at night with a red car and a blue boat " * 4 + "by a zibbit"
    assert len(pipe.tokenizer(prompt)["input_ids"]) > pipe.tokenizer_max_length
    with pytest.warns(UserWarning, match="cut off in the 77-token text part"):
        span = adapter.concept_span(prompt, "zibbit", {"max_sequence_length": 128})
    assert min(span.positions) >= pipe.tokenizer_max_length
    ids = pipe.tokenizer_3(prompt)["input_ids"]
    assert pipe.tokenizer_3.decode([ids[p - pipe.tokenizer_max_length] for p in span.positions]) == "zibbit"
    with pytest.raises(DitlocError, match="cut off by max_sequence_length=32"):
        adapter.concept_span(prompt, "zibbit", {"max_sequence_length": 32})
