"""Evaluators on tiny random models saved to disk and loaded back by path (offline)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ditloc import DitlocError
from ditloc.evaluate import (
    ClipScore,
    StyleSimilarity,
    ToyOracle,
    VLMJudge,
    get_evaluator,
    parse_toy_concept,
    to_pil_images,
    yes_probability,
)
from ditloc.testing import clip_like_tokenizer, word_tokenizer
from ditloc.toy import world

from conftest import EPS32

#: Scores compared across batch sizes, input forms or paths come from the tiny models in float64: their
#: forwards then agree to float64 rounding on any CPU, and what remains is the evaluators' float32 readout.
#: A CLIP score is a float32 cosine of float32 unit embeddings (D = 16 components, each rounded within
#: eps32 / 2, then a 16-term sum): within 4 * eps32 * sqrt(16) of the float64 cosine, twice that between two.
F64 = torch.float64
COS_TOL = 2 * 4 * EPS32 * 16**0.5

TEXTS = ["a painting of a dog by van gogh", "a photo of the eiffel tower at night", "a red car"]


def _images(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)  # [N, H, W, 3]


def _image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    tok = clip_like_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=32, patch_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    d = tmp_path_factory.mktemp("clip")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    _image_processor().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def clip(clip_dir):
    return ClipScore(str(clip_dir), dtype=F64)


def _by_hand(clip, images, text):
    """Cosine similarity straight from the model's feature functions."""
    model, tok = clip.encoder.model, clip.encoder.tokenizer
    pixels = clip.encoder.image_processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"]
    pixels = pixels.to(model.dtype)
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        img, txt = model.get_image_features(pixel_values=pixels), model.get_text_features(**enc)
    img = img if isinstance(img, torch.Tensor) else img.pooler_output  # [N, D]
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output  # [1, D]
    return (F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T)[:, 0].numpy()  # [N]


def test_clip_score_is_cosine_similarity(clip):
    images = _images(3)
    for text in TEXTS:
        np.testing.assert_allclose(clip.score(images, text), _by_hand(clip, images, text), atol=COS_TOL / 2)
    s = clip.score(images, TEXTS[0])
    assert s.shape == (3,) and s.dtype == np.float64 and np.all(np.abs(s) <= 1 + 1e-6)


def test_clip_score_scaled(clip_dir, clip):
    images = _images(4, seed=3)
    scaled = ClipScore(str(clip_dir), scale=100.0, dtype=F64).score(images, TEXTS[1])
    np.testing.assert_allclose(scaled, 100 * np.maximum(clip.score(images, TEXTS[1]), 0), atol=100 * COS_TOL)


def test_clip_batching_and_input_forms_agree(clip_dir):
    images = _images(5, seed=1)
    texts = [TEXTS[i % 3] for i in range(5)]  # one text per image
    batched = ClipScore(str(clip_dir), batch_size=4, dtype=F64).score(images, texts)
    single = ClipScore(str(clip_dir), batch_size=1, dtype=F64)
    one_by_one = np.array([single.score(images[i], texts[i])[0] for i in range(5)])
    np.testing.assert_allclose(batched, one_by_one, atol=COS_TOL)
    # the same pixels as PIL images, float [0, 1] NHWC, and a float [N, 3, H, W] tensor
    fresh = ClipScore(str(clip_dir), batch_size=4, dtype=F64)
    pil = [Image.fromarray(x) for x in images]
    as_float = images.astype(np.float32) / 255
    as_tensor = torch.from_numpy(as_float).permute(0, 3, 1, 2)
    for form in (pil, as_float, as_tensor):
        fresh.clear_cache()
        np.testing.assert_allclose(fresh.score(form, texts), batched, atol=COS_TOL)


def test_cache_avoids_recomputation(clip_dir, monkeypatch):
    clip = ClipScore(str(clip_dir), batch_size=2)
    calls = {"image": 0, "text": 0}
    model = clip.encoder.model
    image_fn, text_fn = model.get_image_features, model.get_text_features

    def count_image(**kw):
        calls["image"] += len(kw["pixel_values"])
        return image_fn(**kw)

    def count_text(**kw):
        calls["text"] += len(kw["input_ids"])
        return text_fn(**kw)

    monkeypatch.setattr(model, "get_image_features", count_image)
    monkeypatch.setattr(model, "get_text_features", count_text)
    images = _images(3, seed=2)
    first = clip.score(images, TEXTS[0])
    assert calls == {"image": 3, "text": 1}
    again = clip.score(images[::-1], TEXTS[0])  # same images, another order: all cached
    assert calls == {"image": 3, "text": 1}
    np.testing.assert_array_equal(again, first[::-1])
    clip.score(np.concatenate([images[:1], images[:1]]), TEXTS[1])  # a repeated image is scored once
    assert calls == {"image": 4, "text": 2}
    assert clip.cache_size == 4
    clip.clear_cache()
    clip.score(images[:1], TEXTS[0])
    assert calls["image"] == 5


def test_style_similarity(clip_dir, clip):
    with pytest.raises(DitlocError, match="reference"):
        StyleSimilarity(str(clip_dir))
    with pytest.raises(DitlocError, match="reference"):
        StyleSimilarity(str(clip_dir), references=[])
    refs, images = _images(3, seed=10), _images(4, seed=11)
    style = StyleSimilarity(str(clip_dir), references=refs, batch_size=3, dtype=F64)
    emb = lambda x: clip.encoder.embed_images(to_pil_images(x))  # noqa: E731  [N, D]
    np.testing.assert_allclose(style.score(images), (emb(images) @ emb(refs).T).mean(-1).numpy(), atol=COS_TOL)
    one_ref = StyleSimilarity(str(clip_dir), references=refs[:1], dtype=F64)
    np.testing.assert_allclose(one_ref.score(refs[:1]), [1.0], atol=COS_TOL)  # an image is its own style
    by_concept = StyleSimilarity(str(clip_dir), references={"monet": refs[:1], "hokusai": refs[1:]}, dtype=F64)
    np.testing.assert_allclose(by_concept.score(refs[:1], "monet"), [1.0], atol=COS_TOL)
    with pytest.raises(DitlocError, match="no reference images for 'klimt'"):
        by_concept.score(images, "klimt")


def test_input_errors(clip):
    with pytest.raises(DitlocError, match=r"\[0, 1\]"):
        clip.score(np.full((1, 32, 32, 3), -1.0, np.float32), "a dog")
    with pytest.raises(DitlocError, match="one per image"):
        clip.score(_images(2), ["a dog", "a cat", "a car"])
    with pytest.raises(DitlocError, match="non-empty text"):
        clip.score(_images(1), None)
    with pytest.raises(DitlocError, match="cannot load"):
        ClipScore("/nonexistent/clip")
    with pytest.raises(DitlocError, match="unknown evaluator"):
        get_evaluator("fid")
    assert isinstance(get_evaluator("clip", model=clip.encoder.path), ClipScore)


# ---------------------------------------------------------------- VLM judge


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A tiny random LLaVA (CLIP vision tower + Llama) with a word-level tokenizer and a chat template."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = word_tokenizer("does this image show a dog cat the eiffel tower yes no answer or".split() + ["<image>"],
                         bos=True, eos=False)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).eval()
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %} answer :{% endif %}")
    processor = LlavaProcessor(image_processor=_image_processor(), tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>", chat_template=template)
    d = tmp_path_factory.mktemp("vlm")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def test_yes_probability_math():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 3.0]])  # [B=2, V=4]
    p = yes_probability(logits, yes_ids=[1, 2], no_ids=[3])
    e = logits.exp()
    np.testing.assert_allclose(p.numpy(), ((e[:, 1] + e[:, 2]) / (e[:, 1] + e[:, 2] + e[:, 3])).numpy(), rtol=1e-6)


def test_vlm_judge_reads_yes_vs_no_logits(vlm_dir):
    judge = VLMJudge(str(vlm_dir), batch_size=3, dtype=F64)
    tok = judge.processor.tokenizer
    assert judge.yes_ids == [tok.convert_tokens_to_ids("yes")] and judge.no_ids == [tok.convert_tokens_to_ids("no")]
    assert judge.prompt("a dog") == "<image> Does this image show a dog? Answer yes or no. answer :"
    images, texts = _images(3, seed=5), ["a dog", "the eiffel tower", "a cat"]
    p = judge.score(images, texts)
    assert p.shape == (3,) and np.all((p > 0) & (p < 1))
    # by hand, one image at a time (no padding): softmax over the yes/no logits of the next token
    for i in range(3):
        inputs = judge.processor(images=[Image.fromarray(images[i])], text=[judge.prompt(texts[i])], return_tensors="pt")
        inputs = {k: v.to(F64) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            logits = judge.model(**inputs).logits[0, -1]  # [V]
        pair = torch.stack([logits[judge.yes_ids[0]], logits[judge.no_ids[0]]])
        # batched (left-padded) = single: float64 forwards, then the judge's float32 logits (eps32 / 2 relative
        # each) move p = sigmoid(yes - no) by at most (|yes| + |no|) * eps32 / 8, and its float32 softmax by eps32
        tol = EPS32 * (1 + float(pair.abs().sum()) / 8)
        assert p[i] == pytest.approx(float(pair.softmax(0)[0]), abs=2 * tol)
    # invariants of the readout, whatever the weights: equal yes/no rows -> 1/2; swapped rows -> 1 - p
    head = judge.model.get_output_embeddings().weight
    y, n = judge.yes_ids[0], judge.no_ids[0]
    with torch.no_grad():
        head[[y, n]] = head[[n, y]]
    judge.clear_cache()
    np.testing.assert_allclose(judge.score(images, texts), 1 - p, atol=1e-5)
    with torch.no_grad():
        head[y] = head[n]
    judge.clear_cache()
    np.testing.assert_allclose(judge.score(images, texts), 0.5, atol=1e-6)


def test_vlm_judge_errors(vlm_dir):
    with pytest.raises(DitlocError, match="slot"):
        VLMJudge(str(vlm_dir), question="Is this a dog?")
    with pytest.raises(DitlocError, match="single, different tokens"):
        VLMJudge(str(vlm_dir), yes=("absolutely",))


# ---------------------------------------------------------------- toy oracle


@pytest.fixture(scope="module")
def toy():
    return ToyOracle()


def _scenes(n, seed, **pin):
    rng = np.random.default_rng(seed)
    return world.render_batch([world.sample_scene(rng, **pin) for _ in range(n)])  # uint8 [N, 32, 32, 3]


@pytest.mark.parametrize(
    "concept, present, absent",
    [
        ("shape: star", dict(shape="star", character=None), dict(shape="circle", character=None)),
        ("color: red", dict(color="red", character=None), dict(color="blue", character=None)),
        ("place: beach", dict(place="beach"), dict(place="forest")),
        ("character: blip", dict(character="blip"), dict(character=None)),
        ("hazard: hazard", dict(hazard=True), dict(hazard=False)),
    ],
)
def test_toy_oracle_presence(toy, concept, present, absent):
    with_it, without = toy.score(_scenes(12, 0, **present), concept), toy.score(_scenes(12, 1, **absent), concept)
    assert with_it.mean() > 0.9 and without.mean() < 0.1


def test_toy_oracle_hard_is_the_classification(toy):
    """hard=True scores 1 where the oracle classifies the image as the concept (what `ditloc demo` measures)."""
    images = np.concatenate([_scenes(6, 3, shape="star", character=None), _scenes(6, 4, character=None)])
    hard = ToyOracle(toy.oracle, hard=True).score(list(to_pil_images(images)), "shape: star")
    labels = toy.oracle.classify(images).labels["shape"]
    np.testing.assert_array_equal(hard, [float(x == "star") for x in labels])
    assert 0 < hard.sum() < len(hard)


def test_toy_oracle_concepts(toy):
    images = _scenes(4, 2, shape="star", character=None)
    np.testing.assert_array_equal(toy.score(images, "star"), toy.score(images, "shape=star"))
    np.testing.assert_array_equal(toy.score(images, "hazard: hazard"), toy.score(images, "hazard: present"))
    assert parse_toy_concept("character: none") == ("character", "none")
    with pytest.raises(DitlocError, match="not a toy shape"):
        toy.score(images, "shape: blob")
    with pytest.raises(DitlocError, match="not a toy concept"):
        toy.score(images, "a photo of a dog")
    with pytest.raises(DitlocError, match="32x32"):
        toy.score(_images(1, size=64), "shape: star")
