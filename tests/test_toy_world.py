"""Fast tests for the toy-world renderer and prompt utilities."""

import numpy as np
import pytest

from ditloc.toy import world as w


def _scenes(seed, n=50):
    rng = np.random.default_rng(seed)
    return [w.sample_scene(rng) for _ in range(n)]


def test_determinism():
    a, b = _scenes(3), _scenes(3)
    assert a == b
    assert np.array_equal(w.render_batch(a), w.render_batch(b))
    ra, rb = np.random.default_rng(9), np.random.default_rng(9)
    pa = [w.make_prompt(s, ra) for s in a]
    pb = [w.make_prompt(s, rb) for s in b]
    assert pa == pb
    assert _scenes(4) != a


def test_render_shape_dtype_and_purity():
    s = _scenes(0, 1)[0]
    img = w.render(s)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(img, w.render(s))


def test_categories():
    c = w.CATEGORIES
    assert len(c["shape"]) >= 6 and len(c["color"]) >= 6 and len(c["place"]) >= 6
    assert len(c["style"]) == 5 and len(c["character"]) >= 4
    for ch, base in w.CHARACTER_BASE_SHAPE.items():
        assert ch in c["character"] and base in c["shape"]
    words = [x for v in c.values() for x in v]
    assert len(words) == len(set(words))
    assert all(x.isalpha() and x.islower() for x in words)


def test_places_distinguishable():
    means = {}
    for p in w.CATEGORIES["place"]:
        imgs = [w.render(w.sample_scene(np.random.default_rng(i), place=p, size=14, hazard=False,
                                        character=None, style="outlined")) for i in range(10)]
        means[p] = np.mean(imgs, axis=(0, 1, 2))
    ps = list(means)
    for i in range(len(ps)):
        for j in range(i + 1, len(ps)):
            assert np.abs(means[ps[i]] - means[ps[j]]).sum() > 30, (ps[i], ps[j])


def test_colors_distinguishable_and_present():
    for col in w.CATEGORIES["color"]:
        s = w.sample_scene(np.random.default_rng(0), color=col, style="solid", character=None,
                           place="night", hazard=False)
        img = w.render(s)
        assert (np.abs(img.astype(int) - np.array(w.RGB[col])).sum(-1) == 0).sum() > 50
    rgb = np.array(list(w.RGB.values()), float)
    d = np.abs(rgb[:, None] - rgb[None]).sum(-1)
    assert d[~np.eye(len(rgb), dtype=bool)].min() > 80


def test_styles_and_hazard_change_pixels():
    base = dict(shape="square", color="red", place="night", character=None, size=20)
    imgs = {st: w.render(w.sample_scene(np.random.default_rng(1), style=st, hazard=False, **base))
            for st in w.CATEGORIES["style"]}
    st = list(imgs)
    for i in range(len(st)):
        for j in range(i + 1, len(st)):
            assert (imgs[st[i]] != imgs[st[j]]).any(axis=-1).sum() > 20
    h = w.render(w.sample_scene(np.random.default_rng(1), style="solid", hazard=True, **base))
    assert (h != imgs["solid"]).any(axis=-1).sum() > 15


def test_character_fixed_look():
    for ch, (shape, color, style) in w.CHARACTER_LOOK.items():
        s = w.sample_scene(np.random.default_rng(0), character=ch, color="blue")
        assert (s.shape, s.color, s.style) == (shape, color, style)
        assert s.labels()["character"] == ch
        # face (white eye pixels with black pupils) is drawn
        plain = w.render(Scene_without_character(s))
        assert (w.render(s) != plain).any(axis=-1).sum() >= 6


def Scene_without_character(s):
    d = s.to_dict()
    d["character"] = None
    return w.Scene(**d)


def test_prompts_contain_concepts_and_clean():
    rng = np.random.default_rng(0)
    for split in ("train", "heldout"):
        for s in _scenes(5, 200):
            p = w.make_prompt(s, rng, split, drop_prob=0.0)
            lab = s.labels()
            if s.character:
                assert w.concept_span(p, s.character) is not None
                c = w.clean_prompt(p, "character", s.character)
                assert s.character not in c and "object" in c
            else:
                for cat in ("shape", "color", "style"):
                    sp = w.concept_span(p, lab[cat])
                    assert sp is not None and p[sp[0]:sp[1]] == lab[cat]
                c = w.clean_prompt(p, "color", s.color)
                assert s.color not in c.split()
                c = w.clean_prompt(p, "shape", s.shape)
                assert s.shape not in c.split() and "object" in c.split()
            assert w.concept_span(p, s.place) is not None
            c = w.clean_prompt(p, "place", s.place)
            assert w.PLACE_PHRASE[s.place] not in c and s.place not in c.split()
            assert (w.concept_span(p, "hazard") is not None) == s.hazard
            if s.hazard:
                c = w.clean_prompt(p, "hazard", "hazard")
                assert "hazard" not in c and "sign" not in c
            assert "  " not in c and not c.startswith(",") and not c.endswith(",")
            assert " a o" not in c and " an r" not in c


def test_clean_prompt_examples():
    p = "a photo of an orange striped star with a hazard sign on the beach"
    assert w.clean_prompt(p, "color", "orange") == "a photo of a striped star with a hazard sign on the beach"
    assert w.clean_prompt(p, "hazard", "hazard") == "a photo of an orange striped star on the beach"
    assert w.clean_prompt(p, "place", "beach") == "a photo of an orange striped star with a hazard sign"
    assert w.clean_prompt(p, "shape", "star") == "a photo of an orange striped object with a hazard sign on the beach"
    assert w.clean_prompt("on the beach, a zibbit", "character", "zibbit") == "on the beach, an object"
    assert w.clean_prompt("on the beach, a zibbit", "place", "beach") == "a zibbit"
    assert w.concept_span(p, "beach", phrase=True) == (p.index("on the beach"), len(p))


def test_clean_prompts_occur_in_training():
    """Clean prompts (attribute dropped / 'object') are producible by training prompts."""
    s = w.sample_scene(np.random.default_rng(0), character=None)
    t = w.TRAIN_TEMPLATES[0]
    full = w.scene_prompt(s, t)
    assert w.clean_prompt(full, "color", s.color) == w.scene_prompt(s, t, show_color=False)
    assert w.clean_prompt(full, "shape", s.shape) == w.scene_prompt(s, t, show_shape=False)
    assert w.clean_prompt(full, "place", s.place) == w.scene_prompt(s, t, show_place=False)


def test_vocabulary():
    v_train, v_held = set(w.vocabulary("train")), set(w.vocabulary("heldout"))
    assert v_held <= v_train
    assert set(w.vocabulary()) == v_train
    rng = np.random.default_rng(1)
    for s in _scenes(7, 100):
        for split in ("train", "heldout"):
            for tok, _, _ in w.tokenize_words(w.make_prompt(s, rng, split)):
                assert tok in v_train
    assert set(w.HELDOUT_TEMPLATES).isdisjoint(w.TRAIN_TEMPLATES)


def test_pinned_attributes_do_not_shift_others():
    a = w.sample_scene(np.random.default_rng(5), character=None)
    b = w.sample_scene(np.random.default_rng(5), character=None, place="snow")
    assert (a.shape, a.color, a.style, a.x0, a.y0) == (b.shape, b.color, b.style, b.x0, b.y0)
    with pytest.raises(TypeError):
        w.sample_scene(np.random.default_rng(0), bogus=1)


def test_glyph_and_reserved_words_are_outside_the_training_world():
    rng = np.random.default_rng(3)
    sc = w.glyph_scene(rng, color="red", place="snow")
    assert sc.shape == w.GLYPH and w.GLYPH not in w.SHAPES and sc.character is None
    assert (sc.color, sc.place) == ("red", "snow")
    img = w.render(sc)
    again = w.render(w.glyph_scene(np.random.default_rng(3), color="red", place="snow"))
    assert img.shape == (32, 32, 3) and np.array_equal(img, again)
    # the glyph differs from every training shape drawn at the same place
    others = [w.render(w.Scene(s, sc.color, sc.style, sc.place, None, sc.hazard, sc.size, sc.x0, sc.y0, sc.bg_seed))
              for s in w.SHAPES]
    assert all(not np.array_equal(img, o) for o in others)
    vocab = set(w.vocabulary())
    assert not vocab & set(w.RESERVED_WORDS) and w.GLYPH not in vocab


def test_objects_are_centred_and_the_hazard_sign_takes_a_corner():
    scenes = _scenes(11, 200)
    # the earlier world (train_dit.py --random-positions) draws the same attributes at random positions
    rng = np.random.default_rng(11)
    old = [w.sample_scene(rng, random_position=True) for _ in range(200)]
    assert [(s.shape, s.color, s.place, s.hazard) for s in old] == [(s.shape, s.color, s.place, s.hazard) for s in scenes]
    assert len({(s.x0, s.y0) for s in old}) > 20 and min(s.size for s in old) < w.SIZE_RANGE[0]
    corners = set()
    for s in scenes:
        assert w.SIZE_RANGE[0] <= s.size <= w.SIZE_RANGE[1]
        assert s.x0 == s.y0 == (w.IMAGE_SIZE - s.size) // 2
        y0, x0, y1, x1 = w.hazard_box(s)
        assert y0 in (1, w.IMAGE_SIZE - 1 - (y1 - y0)) and x0 in (1, w.IMAGE_SIZE - 1 - (x1 - x0))
        corners.add((y0, x0))
    # ties between equally far corners are broken by the scene, not always the same way
    assert len(corners) >= 2
    # the sign is drawn where hazard_box says, and only for hazard scenes
    s = next(s for s in scenes if s.hazard)
    y0, x0, y1, x1 = w.hazard_box(s)
    without = w.render(w.Scene(**{**s.to_dict(), "hazard": False}))
    diff = np.any(w.render(s) != without, axis=-1)
    ys, xs = np.nonzero(diff)
    assert diff.any() and ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1
