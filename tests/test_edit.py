"""Localized editing (ditloc.edit): placement, no-op init, the no-autograd prefix,
diffusers round trips, the two jobs, resume, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditloc.adapters import get_adapter
from ditloc.cli import main as cli_main
from ditloc.edit import (
    LoraSpec, TrainConfig, add_lora, load_edit, lora_state_dict, lora_targets, no_grad_prefix, personalize,
    save_lora, unlearn,
)
from ditloc.edit.data import image_size
from ditloc.noise import NoiseRule
from ditloc.errors import DitlocError
from ditloc.testing import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sana_pipeline, tiny_sd3_pipeline


def _inputs(pipe, seed=0, batch=2):
    adapter = get_adapter(pipe)
    g = torch.Generator().manual_seed(seed)
    h, w = image_size(pipe)
    f = pipe.vae_scale_factor
    c = pipe.transformer.config.in_channels
    x = torch.randn(batch, c, h // f, w // f, generator=g)
    t = torch.tensor([100.0, 700.0][:batch])
    with torch.no_grad():
        text = adapter.encode_text(["a red cat on the beach", "a dog"][:batch], {})
    return adapter, x, t, {k: v.detach() for k, v in text.items()}


def _randomize_lora(transformer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ---- placement --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, blocks, expected_paths",
    [
        (tiny_pixart_pipeline, ["block.1", "block.3"], ["transformer_blocks.1", "transformer_blocks.3"]),
        (tiny_sana_pipeline, ["block.2"], ["transformer_blocks.2"]),
        (tiny_flux_pipeline, ["double.1", "single.0"], ["transformer_blocks.1", "single_transformer_blocks.0"]),
        (tiny_sd3_pipeline, ["block.0"], ["transformer_blocks.0"]),
    ],
)
def test_lora_touches_exactly_the_chosen_blocks(make, blocks, expected_paths):
    pipe = make()
    adapter = get_adapter(pipe)
    targets = lora_targets(adapter, blocks)
    assert targets and all(any(t.startswith(p + ".") for p in expected_paths) for t in targets)
    for path in expected_paths:  # every chosen block gets adapters
        assert any(t.startswith(path + ".") for t in targets)
    add_lora(pipe.transformer, LoraSpec(tuple(blocks), tuple(targets), rank=2))
    lora_modules = sorted({n.split(".lora_")[0] for n, _ in pipe.transformer.named_parameters() if ".lora_" in n})
    assert lora_modules == sorted(targets)  # exactly the named modules, nothing else
    trainable = [n for n, p in pipe.transformer.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and n.split(".lora_")[0] in targets for n in trainable)


def test_pixart_targets_are_the_attention_and_mlp_linears():
    adapter = get_adapter(tiny_pixart_pipeline())
    assert lora_targets(adapter, ["block.2"]) == [
        f"transformer_blocks.2.{s}" for s in (
            "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
            "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
    ]
    assert lora_targets(adapter, ["block.0"], suffixes=["attn2.to_k"]) == ["transformer_blocks.0.attn2.to_k"]
    with pytest.raises(DitlocError, match="match no Linear"):
        lora_targets(adapter, ["block.0"], suffixes=["attn9.to_k"])
    with pytest.raises(DitlocError, match="unknown block 'block.9'"):
        lora_targets(adapter, ["block.9"])


@pytest.mark.parametrize("make", [tiny_pixart_pipeline, tiny_sana_pipeline])
def test_fresh_adapter_is_an_exact_noop(make):
    pipe = make()
    adapter, x, t, text = _inputs(pipe)
    # add_lora freezes the base weights, and freezing alone can change the last bit: PyTorch's matmul folds a
    # non-contiguous 3-D input into one mm when the weight requires grad, even under no_grad, and runs a bmm
    # when it does not; MKL's AVX2 kernels sum those in another order (SANA's linear attention feeds to_out a
    # transposed view). So the reference is the frozen model: the adapter itself adds an exact zero.
    pipe.transformer.requires_grad_(False)
    with torch.no_grad():
        before = adapter.denoise(x, t, text)
    add_lora(pipe.transformer, LoraSpec(("block.0", "block.1"), tuple(lora_targets(adapter, ["block.0", "block.1"]))))
    with torch.no_grad():
        after = adapter.denoise(x, t, text)
    assert torch.equal(before, after)
    _randomize_lora(pipe.transformer)
    with torch.no_grad():
        assert not torch.equal(before, adapter.denoise(x, t, text))  # the adapters are live


NOOP_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_edit import test_fresh_adapter_is_an_exact_noop
from ditloc.testing import tiny_sana_pipeline
test_fresh_adapter_is_an_exact_noop(tiny_sana_pipeline)
"""


def test_fresh_adapter_noop_holds_with_avx2_blas():
    """The no-op where it once failed: a machine whose BLAS runs AVX2 kernels (emulated here with
    MKL_ENABLE_INSTRUCTIONS=AVX2; elsewhere the variable is ignored and this is one more run)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "MKL_ENABLE_INSTRUCTIONS": "AVX2", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", NOOP_CHECK, str(Path(__file__).parent)], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]


# ---- the no-autograd prefix ---------------------------------------------------------------
@pytest.mark.parametrize("make, blocks", [(tiny_pixart_pipeline, ["block.2"]), (tiny_flux_pipeline, ["single.0"])])
def test_no_grad_prefix_same_gradients_fewer_saved_tensors(make, blocks):
    pipe = make()
    adapter = get_adapter(pipe)
    add_lora(pipe.transformer, LoraSpec(tuple(blocks), tuple(lora_targets(adapter, blocks))))
    _randomize_lora(pipe.transformer)

    def run(prefix: bool):
        pipe.transformer.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            ctx = no_grad_prefix(adapter, blocks) if prefix else torch.enable_grad()
            with ctx:
                out = _forward(pipe, adapter)
        out.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in pipe.transformer.named_parameters() if p.grad is not None}
        return grads, sum(saved)

    full, saved_full = run(False)
    pref, saved_pref = run(True)
    assert full.keys() == pref.keys() and full
    for n in full:
        assert torch.equal(full[n], pref[n]), n
    # autograd already records nothing for a frozen prefix fed by inputs that need
    # no grad; no_grad_prefix makes that explicit (and robust) and never costs more
    assert saved_pref <= saved_full
    # the cost of training a block grows with the blocks after it, not before it
    early = _saved_with_lora(make, [adapter.block_names()[0]])
    late = _saved_with_lora(make, [adapter.block_names()[-1]])
    assert late < 0.6 * early
    # restored: no instance-level forward left behind
    assert all("forward" not in vars(adapter.block_module(b)) for b in adapter.block_names())


def _saved_with_lora(make, blocks) -> int:
    pipe = make()
    adapter = get_adapter(pipe)
    add_lora(pipe.transformer, LoraSpec(tuple(blocks), tuple(lora_targets(adapter, blocks))))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with no_grad_prefix(adapter, blocks):
            _forward(pipe, adapter)
    return sum(saved)


def _forward(pipe, adapter):
    """One transformer call with fixed random inputs (any family), in the transformer's dtype."""
    dtype = pipe.transformer.dtype
    if adapter.family in ("pixart", "sana"):
        _, x, t, text = _inputs(pipe)
        return adapter.denoise(x.to(dtype), t.to(dtype), text)
    g = torch.Generator().manual_seed(0)
    cfg = pipe.transformer.config
    n_img, n_txt = 16, 8
    randn = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    if adapter.family == "sd3":
        return pipe.transformer(
            hidden_states=randn(1, cfg.in_channels, 8, 8),
            encoder_hidden_states=randn(1, n_txt, cfg.joint_attention_dim),
            pooled_projections=randn(1, cfg.pooled_projection_dim),
            timestep=torch.tensor([500.0], dtype=dtype), return_dict=False,
        )[0]
    return pipe.transformer(
        hidden_states=randn(1, n_img, cfg.in_channels),
        encoder_hidden_states=randn(1, n_txt, cfg.joint_attention_dim),
        pooled_projections=randn(1, cfg.pooled_projection_dim),
        timestep=torch.tensor([0.5], dtype=dtype),
        img_ids=torch.zeros(n_img, 3, dtype=dtype), txt_ids=torch.zeros(n_txt, 3, dtype=dtype),
        guidance=torch.tensor([3.5], dtype=dtype) if cfg.guidance_embeds else None,
        return_dict=False,
    )[0]


def test_prefix_restores_after_exception():
    pipe = tiny_pixart_pipeline()
    adapter = get_adapter(pipe)
    with pytest.raises(RuntimeError):
        with no_grad_prefix(adapter, ["block.3"]) as prefix:
            assert prefix == ["block.0", "block.1", "block.2"]
            raise RuntimeError("boom")
    assert all("forward" not in vars(adapter.block_module(b)) for b in adapter.block_names())


# ---- diffusers round trips ----------------------------------------------------------------
@pytest.mark.parametrize("make, blocks", [
    (tiny_sana_pipeline, ["block.1"]), (tiny_flux_pipeline, ["double.0", "single.1"]), (tiny_sd3_pipeline, ["block.1"]),
    (tiny_pixart_pipeline, ["block.0", "block.3"]),
])
def test_saved_lora_loads_through_diffusers(tmp_path, make, blocks):
    # float64: diffusers' (peft's) LoRA layers and ditloc's compute the same sum in their own order, which
    # in float32 differs in the last bits by CPU; in float64 by ~1e-16 relative per forward, far below 1e-10
    pipe = make().to(torch.float64)
    adapter = get_adapter(pipe)
    spec = LoraSpec(tuple(blocks), tuple(lora_targets(adapter, blocks)), rank=2, alpha=4.0)
    add_lora(pipe.transformer, spec)
    _randomize_lora(pipe.transformer)
    with torch.no_grad():
        expected = _forward(pipe, adapter)
    save_lora(pipe, tmp_path, lora_state_dict(pipe.transformer), spec)
    fresh = make().to(torch.float64)
    with torch.no_grad():
        plain = _forward(fresh, get_adapter(fresh))
    assert not torch.allclose(plain, expected)
    if hasattr(fresh, "load_lora_weights"):  # the user's own tooling
        fresh.load_lora_weights(str(tmp_path))
    else:  # PixArt: diffusers has no LoRA loader; the same file through ditloc/peft
        load_edit(fresh, tmp_path)
    with torch.no_grad():
        got = _forward(fresh, get_adapter(fresh))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


def test_load_edit_twice_is_refused(tmp_path):
    pipe = tiny_pixart_pipeline()
    adapter = get_adapter(pipe)
    spec = LoraSpec(("block.1",), tuple(lora_targets(adapter, ["block.1"])), rank=2)
    add_lora(pipe.transformer, spec)
    save_lora(pipe, tmp_path, lora_state_dict(pipe.transformer), spec)
    fresh = tiny_pixart_pipeline()
    load_edit(fresh, tmp_path)
    with pytest.raises(DitlocError, match="already has an edit loaded"):  # not a second adapter stacked on it
        load_edit(fresh, tmp_path)
    assert len(fresh.transformer.peft_config) == 1


# ---- the jobs ----------------------------------------------------------------------------
def _images(pipe, n=3, seed=0):
    h, w = image_size(pipe)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def test_personalize_full_changes_only_the_chosen_blocks(tmp_path):
    pipe = tiny_pixart_pipeline()
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    res = personalize(pipe, _images(pipe), "sks", "cat", blocks="block.2",
                      config=TrainConfig(method="full", steps=3, batch_size=2, lr=1e-3), out=tmp_path)
    assert res.blocks == ("block.2",) and res.trainable_parameters == sum(
        p.numel() for p in pipe.transformer.transformer_blocks[2].parameters())
    after = pipe.transformer.state_dict()
    changed = sorted({k for k in before if not torch.equal(before[k], after[k])})
    assert changed and all(k.startswith("transformer_blocks.2.") for k in changed)
    record = json.loads((tmp_path / "ditloc_edit.json").read_text())
    assert record["blocks"] == ["block.2"] and record["steps"] == 3 and len(record["losses"]) == 3
    assert record["details"]["instance_prompt"] == "a sks cat"
    fresh = tiny_pixart_pipeline()
    load_edit(fresh, tmp_path)
    assert all(torch.equal(fresh.transformer.state_dict()[k], after[k]) for k in after)


def test_personalize_auto_localizes_and_fits(tmp_path):
    pipe = tiny_pixart_pipeline()
    res = personalize(pipe, _images(pipe), "sks", "cat", blocks="auto", k=2, prior_preservation=True,
                      num_class_images=2, num_inference_steps=2,
                      config=TrainConfig(steps=30, batch_size=2, lr=3e-3), out=tmp_path)
    loc = json.loads((tmp_path / "localization.json").read_text())
    assert loc["concept"] == "cat" and loc["settings"]["method"] == "search"
    # the blocks edited are the search's 2-block set
    assert list(res.blocks) == sorted(loc["search"]["sets"][1], key=lambda b: int(b.split(".")[1]))
    assert np.mean(res.losses[-10:]) < np.mean(res.losses[:10])  # it learns
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()


def test_unlearn_moves_concept_prediction_to_the_anchor(tmp_path):
    pipe = tiny_pixart_pipeline()
    adapter = get_adapter(pipe)
    _, x, t, _ = _inputs(pipe, batch=2)
    text = {k: v.detach() for k, v in adapter.encode_text(["a red dog", "a red cat"], {}).items()}
    with torch.no_grad():
        concept0 = adapter.denoise(x, t, {k: v[:1].expand(2, *v.shape[1:]) for k, v in text.items()})
        anchor = adapter.denoise(x, t, {k: v[1:].expand(2, *v.shape[1:]) for k, v in text.items()})
    res = unlearn(pipe, "dog", "cat", prompts=["a red dog"], blocks="block.1,block.2", images_per_prompt=2,
                  num_inference_steps=2, config=TrainConfig(steps=40, batch_size=4, lr=3e-3), out=tmp_path)
    with torch.no_grad():
        concept1 = adapter.denoise(x, t, {k: v[:1].expand(2, *v.shape[1:]) for k, v in text.items()})
        anchor1 = adapter.denoise(x, t, {k: v[1:].expand(2, *v.shape[1:]) for k, v in text.items()})
    gap0 = (concept0 - anchor).pow(2).mean()
    gap1 = (concept1 - anchor).pow(2).mean()
    assert gap1 < 0.5 * gap0
    assert res.details["anchor_prompts"] == ["a red cat"]
    assert (tmp_path / "anchor_latents.safetensors").exists()
    assert (anchor1 - anchor).abs().max() > 0  # LoRA in shared blocks does move other prompts a little


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    def job(out, progress=None):
        pipe = tiny_pixart_pipeline()
        return pipe, unlearn(pipe, "dog", "cat", prompts=["a red dog"], blocks="block.1", images_per_prompt=2,
                             num_inference_steps=2, out=out, progress=progress,
                             config=TrainConfig(steps=6, batch_size=2, lr=1e-3, checkpoint_every=1))

    pipe_a, res_a = job(tmp_path / "a")

    def interrupt(message):
        if message.startswith("step 3/"):
            raise KeyboardInterrupt

    with pytest.raises(DitlocError, match="interrupted at step 3; rerun"):
        job(tmp_path / "b", progress=interrupt)
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 3
    messages = []
    pipe_b, res_b = job(tmp_path / "b", progress=messages.append)
    assert "resumed at step 3/6" in messages
    assert res_b.losses == res_a.losses
    sa, sb = lora_state_dict(pipe_a.transformer), lora_state_dict(pipe_b.transformer)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_of_another_job_is_refused(tmp_path):
    pipe = tiny_pixart_pipeline()
    unlearn(pipe, "dog", "cat", prompts=["a red dog"], blocks="block.1", images_per_prompt=1, num_inference_steps=2,
            out=tmp_path, config=TrainConfig(steps=1, batch_size=1))
    with pytest.raises(DitlocError, match="different job"):
        unlearn(tiny_pixart_pipeline(), "dog", "cat", prompts=["a red dog"], blocks="block.2", images_per_prompt=1,
                num_inference_steps=2, out=tmp_path, config=TrainConfig(steps=1, batch_size=1))


def test_noise_rule_follows_the_scheduler():
    assert NoiseRule.from_scheduler(tiny_pixart_pipeline().scheduler).kind == "epsilon"
    assert NoiseRule.from_scheduler(tiny_sana_pipeline().scheduler).kind == "flow"
    rule = NoiseRule.from_scheduler(tiny_sana_pipeline().scheduler)
    x0 = torch.randn(3, 4, 2, 2)
    x_t, t, target = rule.sample(x0, torch.Generator().manual_seed(0))
    sigma = (t / 1000).view(-1, 1, 1, 1)
    noise = target + x0
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * noise)


# ---- bad input ---------------------------------------------------------------------------
def _save(path, array, mode=None):
    from PIL import Image

    im = Image.fromarray(array)
    (im.convert(mode) if mode else im).save(path)


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pixart")
    tiny_pixart_pipeline().save_pretrained(d)
    return d


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "no images"),
    ("unreadable", "cannot read image"),
    ("size", "is 16x16; the model trains at 32x32"),
    ("mode", "is L; convert the images to RGB"),
])
def test_bad_image_folders_one_line_errors(tmp_path, capsys, pixart_dir, case, message):
    folder = tmp_path / "imgs"
    if case != "missing":
        folder.mkdir()
    rgb = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    if case == "unreadable":
        _save(folder / "a.png", rgb)
        (folder / "b.png").write_bytes(b"not an image")
    elif case == "size":
        _save(folder / "a.png", rgb[:16, :16])
    elif case == "mode":
        _save(folder / "a.png", rgb, "L")
    code = _cli(["personalize", str(pixart_dir), "--images", str(folder), "--token", "sks", "--class-word", "cat",
                 "--blocks", "block.1", "--train-steps", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("ditloc: error:")


def _cli(argv) -> int:
    try:
        return cli_main(argv)
    except SystemExit as e:
        return int(e.code)


def test_cli_unlearn_concept_absent_and_success(tmp_path, capsys, pixart_dir):
    code = _cli(["unlearn", str(pixart_dir), "--concept", "snoopy", "--anchor", "a dog", "--prompt", "a red cat",
                 "--out", str(tmp_path / "x")])
    assert code == 2 and "does not contain the concept 'snoopy'" in capsys.readouterr().err
    code = _cli(["unlearn", str(pixart_dir), "--concept", "dog", "--anchor", "cat", "--prompt", "a dog on the beach",
                 "--k", "2", "--train-steps", "2", "--steps", "2", "--images-per-prompt", "1",
                 "--out", str(tmp_path / "ok")])
    out = capsys.readouterr().out
    assert code == 0 and "unlearn: trained" in out
    # PixArt pipelines have no load_lora_weights: the hint names the loader that works
    assert "load with ditloc.edit.load_edit(pipe, OUT)" in out and "load_lora_weights" not in out
    rec = json.loads((tmp_path / "ok" / "ditloc_edit.json").read_text())
    assert len(rec["blocks"]) == 2 and rec["config"]["lora"]["targets"]
    assert _cli(["unlearn", str(pixart_dir), "--concept", "dog", "--anchor", "cat", "--prompt", "a dog",
                 "--blocks", "auto", "--k", "9", "--out", str(tmp_path / "k")]) == 2
    assert "--k must be between 1 and 4" in capsys.readouterr().err


@pytest.mark.parametrize("make, size, blocks", [
    (tiny_flux_pipeline, 16, "all"), (tiny_sd3_pipeline, 8, "all"), (tiny_sana_pipeline, 32, "block.2"),
])
def test_unlearn_trains_every_family(tmp_path, make, size, blocks):
    pipe = make()
    adapter = get_adapter(pipe)
    hw = {"height": size, "width": size}
    if adapter.family == "sana":  # the tiny model's 32 px would be binned to SANA's 512 px buckets
        hw["use_resolution_binning"] = False
    with torch.no_grad():
        x = adapter.unpack_latents(pipe(["a red dog"] * 2, num_inference_steps=2, output_type="latent",
                                        generator=[torch.Generator().manual_seed(i) for i in range(2)], **hw).images)
        text = {k: v.detach() for k, v in adapter.encode_text(["a red dog", "a red cat"],
                                                              {"max_sequence_length": 16}).items()}
    t = torch.tensor([300.0, 800.0])
    one = lambda i: {k: v[i : i + 1].expand(2, *v.shape[1:]) for k, v in text.items()}  # noqa: E731
    with torch.no_grad():
        concept0, anchor = adapter.denoise(x, t, one(0)), adapter.denoise(x, t, one(1))
    unlearn(pipe, "dog", "cat", prompts=["a red dog"], blocks=blocks, images_per_prompt=2, num_inference_steps=2,
            config=TrainConfig(steps=15, batch_size=2, lr=5e-3), out=tmp_path, pipeline_kwargs=hw,
            max_sequence_length=16)
    with torch.no_grad():
        concept1 = adapter.denoise(x, t, one(0))
    assert (concept1 - anchor).pow(2).mean() < 0.5 * (concept0 - anchor).pow(2).mean()


def test_category_prompts_for_auto_blocks():
    from ditloc.edit.jobs import category_prompts

    prompts = category_prompts("animal", "cat")
    assert len(prompts) >= 15 and all("cat" in p.split() or "cat" in p for p in prompts)
    with pytest.raises(DitlocError, match="no category 'animl'"):
        category_prompts("animl", "cat")
    toy = category_prompts("shape", "object", probes="toy")
    assert toy and all("object" in p for p in toy)


def test_non_finite_loss_stops_before_any_checkpoint(tmp_path):
    """Losses reach the host in batches (no per-step sync), but a NaN is still caught, named by its
    step, before a checkpoint could save it."""
    from ditloc.edit.train import LocalizedTrainer, run_training

    pipe = tiny_pixart_pipeline()
    adapter = get_adapter(pipe)
    trainer = LocalizedTrainer(pipe, adapter, ["block.1"], TrainConfig(steps=100, checkpoint_every=4))  # losses checked every 5 steps

    def loss_fn():
        loss = sum(p.float().pow(2).sum() for p in trainer.params) * 1e-3
        return loss * float("nan") if trainer.step == 2 else loss

    with pytest.raises(DitlocError, match="loss became nan at step 3; lower --lr"):
        run_training(trainer, loss_fn, tmp_path, {"job": "nan"})
    assert not any(tmp_path.iterdir())  # the step-4 checkpoint was never written


# ---- captions, class prompts, LoRA modules -------------------------------------------------
def test_personalize_captions_condition_each_image_on_its_own_text(tmp_path):
    """Each image trains on its caption; the class images on the captions without the
    token; LoRA sits only in the named modules; identical captions = one instance prompt. In float64: the text
    is encoded here in another batch than in training, which in float32 moves the last bits by CPU."""
    pipe = tiny_pixart_pipeline().to(torch.float64)
    adapter = get_adapter(pipe)
    captions = ["a red sks cat on the beach", "a sks cat in the snow", "a blue sks cat"]
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].detach().clone()) if m.training else None,
        with_kwargs=True)
    cfg = TrainConfig(steps=12, batch_size=2, lr=3e-3, lora_modules="attn2.to_k, attn2.to_v")
    res = personalize(pipe, _images(pipe), "sks", "cat", blocks="block.1,block.3", config=cfg, captions=captions,
                      prior_preservation=True, num_class_images=4, num_inference_steps=2, out=tmp_path / "cap",
                      pipeline_kwargs=dict(clean_caption=False))
    hook.remove()
    rec = json.loads((tmp_path / "cap" / "ditloc_edit.json").read_text())["details"]
    assert rec["captions"] == captions and rec["instance_prompt"] is None
    assert rec["class_prompts"] == ["a red cat on the beach", "a cat in the snow", "a blue cat"]
    assert rec["num_class_images"] == 6  # ceil(4 / 3) per class prompt
    # the text rows the transformer saw in training are exactly the captions' and class prompts'
    with torch.no_grad():
        encoded = adapter.encode_text(captions + rec["class_prompts"], {"clean_caption": False})
    states = next(v for v in encoded.values() if v.ndim == 3)[:, : seen[0].shape[1]]
    used = {min(range(len(states)), key=lambda j: float((row - states[j]).abs().max()))
            for batch in seen for row in batch}
    assert used == set(range(6))
    tol = 1e-10 * float(states.abs().max())  # float64 rounding (~1e-16 relative per operation): far below
    assert all(min(float((row - s).abs().max()) for s in states) < tol for batch in seen for row in batch)
    # LoRA only in the chosen blocks' text keys/values
    names = {n.rsplit(".lora_", 1)[0] for n, _ in pipe.transformer.named_parameters() if "lora_" in n}
    assert names == {f"transformer_blocks.{b}.attn2.to_{kv}" for b in (1, 3) for kv in "kv"}
    assert res.trainable_parameters == sum(p.numel() for n, p in pipe.transformer.named_parameters() if "lora_" in n)
    # captions that all equal the instance prompt train what the instance prompt trains (in float64, as above)
    runs = []
    for caps in (None, ["a sks cat"] * 3):
        p = tiny_pixart_pipeline().to(torch.float64)
        personalize(p, _images(p), "sks", "cat", blocks="block.2", captions=caps, prior_preservation=True,
                    num_class_images=2, num_inference_steps=2, config=TrainConfig(steps=4, batch_size=2, lr=1e-3),
                    pipeline_kwargs=dict(clean_caption=False))
        runs.append(lora_state_dict(p.transformer))
    assert runs[0].keys() == runs[1].keys()
    # 4 Adam steps of lr 1e-3 move a weight by <= ~4e-3: 1e-12 is 1e-9 of that, far above float64 rounding
    assert all(torch.allclose(runs[0][k], runs[1][k], rtol=0, atol=1e-12) for k in runs[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(captions=["a sks cat", "a cat"]), "2 caption(s) for 3 image(s)"),
    (dict(captions=["a sks cat", "a cat", "a sks dog"]), "the caption 'a cat' does not contain the token 'sks'"),
    (dict(class_prompts=["a sks cat"], prior_preservation=True), "contains the token 'sks'"),
    (dict(class_prompts=[], prior_preservation=True), "the class prompts are empty"),
    (dict(prior_weight=-1.0), "--prior-weight must be >= 0"),
    (dict(prior_target="frozen"), "--prior-target must be noise or teacher"),
])
def test_personalize_bad_prompts_refused_before_work(kwargs, message, monkeypatch):
    pipe = tiny_pixart_pipeline()
    from ditloc.edit import jobs

    monkeypatch.setattr(jobs, "_plan", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(DitlocError) as e:
        personalize(pipe, _images(pipe), "sks", "cat", blocks="block.1", **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lora_modules_config_refusals():
    with pytest.raises(DitlocError, match="--lora-modules is empty"):
        TrainConfig(lora_modules=" , ")
    with pytest.raises(DitlocError, match="applies to --edit-method lora"):
        TrainConfig(method="full", lora_modules="attn2.to_k")
    assert TrainConfig(lora_modules="attn2.to_k,attn2.to_v").lora_modules == ("attn2.to_k", "attn2.to_v")


@pytest.mark.parametrize("case, extra, message", [
    ("missing caption", ["--captions"], "b.png has no caption file b.txt next to it"),
    ("no token", ["--captions"], "does not contain the token 'sks'"),
    ("class prompt token", ["--prior-preservation", "--class-prompt", "a sks cat"], "contains the token 'sks'"),
    ("class prompt alone", ["--class-prompt", "a cat"], "--class-prompt is used by --prior-preservation"),
    ("modules with full", ["--edit-method", "full", "--lora-modules", "attn2.to_k"], "applies to --edit-method lora"),
    ("prior weight", ["--prior-weight", "-2"], "--prior-weight must be >= 0"),
])
def test_cli_caption_and_module_errors(tmp_path, capsys, case, extra, message):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgb = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    for name in ("a", "b"):
        _save(folder / f"{name}.png", rgb)
    (folder / "a.txt").write_text("a sks cat on the beach\n")
    if case == "no token":
        (folder / "b.txt").write_text("a cat")
    code = _cli(["personalize", str(tmp_path / "no-model"), "--images", str(folder), "--token", "sks",
                 "--class-word", "cat", "--blocks", "block.1", "--out", str(tmp_path / "out")] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_cli_personalize_with_captions_runs(tmp_path, capsys, pixart_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, caption in (("a", "a sks cat on the beach"), ("b", "a green sks cat")):
        _save(folder / f"{name}.png", (rng.random((32, 32, 3)) * 255).astype(np.uint8))
        (folder / f"{name}.txt").write_text(caption)
    code = _cli(["personalize", str(pixart_dir), "--images", str(folder), "--token", "sks", "--class-word", "cat",
                 "--captions", "--prior-preservation", "--num-class-images", "2", "--prior-weight", "0.5",
                 "--prior-target", "teacher",
                 "--lora-modules", "attn2.to_k,attn2.to_v", "--blocks", "block.1", "--train-steps", "2",
                 "--steps", "2", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "out" / "ditloc_edit.json").read_text())
    assert rec["details"]["captions"] == ["a sks cat on the beach", "a green sks cat"]
    assert rec["details"]["class_prompts"] == ["a cat on the beach", "a green cat"]
    assert rec["details"]["prior_weight"] == 0.5 and rec["details"]["prior_target"] == "teacher"
    assert rec["config"]["lora"]["targets"] == ["transformer_blocks.1.attn2.to_k", "transformer_blocks.1.attn2.to_v"]


def test_teacher_prior_costs_nothing_until_the_class_predictions_move():
    """prior_target="teacher": the class images are fitted to the frozen model's own
    prediction, so at the first step (LoRA B = 0) the prior term is exactly zero and
    the loss is the instance term's; the DreamBooth noise target is not."""
    first = {}
    for name, kw in (("none", dict()), ("noise", dict(prior_preservation=True)),
                     ("teacher", dict(prior_preservation=True, prior_target="teacher"))):
        pipe = tiny_pixart_pipeline().to(torch.float64)  # the instance rows in another batch: float64 rounding
        res = personalize(pipe, _images(pipe), "sks", "cat", blocks="block.1", num_class_images=2,
                          num_inference_steps=2, config=TrainConfig(steps=3, batch_size=2, lr=1e-2),
                          pipeline_kwargs=dict(clean_caption=False), **kw)
        first[name] = res.losses
    assert first["teacher"][0] == pytest.approx(first["none"][0], rel=1e-10)
    assert first["noise"][0] > first["none"][0] * 1.05


def test_per_step_draws_reach_an_accelerator_without_a_blocking_copy(monkeypatch):
    """Host draws (noise, timesteps, indices) go to a non-CPU device through page-locked
    memory and a non-blocking copy; the CPU keeps the plain copy. (The 'meta' device stands
    in for an accelerator: no CUDA here.)"""
    from ditloc.devices import to_device

    pinned, copies = [], []
    real_to = torch.Tensor.to

    def fake_pin(self, *a, **k):
        pinned.append(self.shape)
        return self

    def spy_to(self, *a, **k):
        copies.append((self.device.type, a, k.get("non_blocking", False)))
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    out = to_device(torch.arange(6), "meta", torch.float32)
    assert out.device.type == "meta" and out.dtype == torch.float32 and pinned == [torch.Size([6])]
    assert copies[0] == ("cpu", (torch.device("meta"),), True)  # the host-to-device copy does not block
    pinned.clear()
    x = torch.randn(3)
    assert to_device(x, "cpu") is x and not pinned


def test_cached_latents_are_reused_only_for_the_same_model_prompts_and_sampling(tmp_path, monkeypatch):
    from ditloc.edit import jobs

    pipe = tiny_pixart_pipeline()
    drawn = []
    real = jobs._generate_latents

    def counting(pipe_, prompts, per_prompt, seed, kw):
        drawn.append(list(prompts))
        return real(pipe_, prompts, per_prompt, seed, kw)

    monkeypatch.setattr(jobs, "_generate_latents", counting)
    kw = {"num_inference_steps": 2, "height": 32, "width": 32, "use_resolution_binning": False}
    a = jobs._cached_latents(tmp_path, "anchor_latents", pipe, ["a red cat"], 1, 0, kw)
    again = jobs._cached_latents(tmp_path, "anchor_latents", pipe, ["a red cat"], 1, 0, kw)
    assert len(drawn) == 1 and torch.equal(a, again)  # a resumed run: the same images, not drawn again
    other = jobs._cached_latents(tmp_path, "anchor_latents", pipe, ["a blue cat"], 1, 0, kw)
    assert len(drawn) == 2 and drawn[-1] == ["a blue cat"]  # other prompts: drawn anew, not the stale ones
    jobs._cached_latents(tmp_path, "anchor_latents", pipe, ["a blue cat"], 1, 0, {**kw, "num_inference_steps": 3})
    assert len(drawn) == 3  # other sampling arguments too
    monkeypatch.setattr(jobs, "model_record", lambda p: {"name_or_path": "another/model"})
    jobs._cached_latents(tmp_path, "anchor_latents", pipe, ["a blue cat"], 1, 0, {**kw, "num_inference_steps": 3})
    assert len(drawn) == 4  # another model
    assert other.shape == a.shape


# ---- the search of --blocks auto: objective and evaluator -------------------------------------------------------
def _image_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _save(folder / "a.png", (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    return folder


TINY_EDIT = ["--train-steps", "1", "--steps", "2"]
UNLEARN_DOG = ["--concept", "dog", "--anchor", "cat", "--prompt", "a dog on the beach", "--images-per-prompt", "1"]


@pytest.mark.parametrize("case, extra, line, objective", [
    # not chosen: said before the run (the tiny PixArt has no evaluator of its own: the model judges itself)
    ("default", [], "search objective: self (the model judges itself", "self"),
    ("evaluator", ["--evaluator", "toy", "--eval-text", "shape: star"], "search objective: evaluator (toy)",
     "evaluator"),
    # chosen: nothing to say
    ("chosen", ["--objective", "evaluator", "--evaluator", "toy", "--eval-text", "shape: star"], None, "evaluator"),
])
def test_cli_unlearn_search_flags_reach_the_search(tmp_path, capsys, pixart_dir, case, extra, line, objective):
    out = tmp_path / "out"
    code = _cli(["unlearn", str(pixart_dir), *UNLEARN_DOG, *extra, *TINY_EDIT, "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    said = [s for s in stdout.splitlines() if s.startswith("search objective:")]
    assert said == ([] if line is None else [stdout.splitlines()[0]]) and (line is None or said[0].startswith(line))
    settings = json.loads((out / "localization.json").read_text())["settings"]
    assert settings["objective"] == objective and settings["method"] == "search"
    if objective == "evaluator":
        assert settings["evaluator"] == "ToyOracle" and settings["eval_text"] == "shape: star"
    rec = json.loads((out / "ditloc_edit.json").read_text())
    assert rec["details"]["localization"]["search"]["objective"] == objective


def test_cli_personalize_search_flags_reach_the_search(tmp_path, capsys, pixart_dir):
    out = tmp_path / "out"
    code = _cli(["personalize", str(pixart_dir), "--images", str(_image_folder(tmp_path)), "--token", "sks",
                 "--class-word", "cat", "--evaluator", "toy", "--eval-text", "shape: star", *TINY_EDIT,
                 "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert stdout.splitlines()[0] == "search objective: evaluator (toy)"
    rec = json.loads((out / "ditloc_edit.json").read_text())
    settings = rec["details"]["localization"]["settings"]
    assert settings["objective"] == "evaluator" and settings["eval_text"] == "shape: star"
    assert json.loads((out / "localization.json").read_text())["search"]["objective"] == "evaluator"


BAD_SEARCH_FLAGS = [
    (["--evaluator", "bogus"], "unknown evaluator 'bogus'; use toy, clip or vlm"),
    (["--objective", "judge"], "unknown objective 'judge'"),
    (["--objective", "evaluator"], "--objective evaluator needs --evaluator clip|vlm"),
    (["--objective", "self", "--evaluator", "toy"], "--objective self needs none"),
    (["--eval-text", "a dog"], "pass --evaluator clip|vlm"),
    (["--evaluator-model", "/models/clip"], "pass one of them"),
    (["--blocks", "block.1", "--objective", "self"], "pass --blocks auto"),
    (["--blocks", "all", "--evaluator", "toy"], "pass --blocks auto"),
    (["--localize-method", "patch", "--objective", "self"], "pass --localize-method search"),
]


@pytest.mark.parametrize("extra, message", BAD_SEARCH_FLAGS)
@pytest.mark.parametrize("command", ["unlearn", "personalize"])
def test_cli_bad_search_flags_one_line_before_the_model(tmp_path, capsys, command, extra, message):
    """Refused before the model loads: the model directory does not even exist."""
    args = (UNLEARN_DOG if command == "unlearn" else
            ["--images", str(tmp_path / "imgs"), "--token", "sks", "--class-word", "cat"])
    code = _cli([command, str(tmp_path / "pixart"), *args, *extra, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ditloc: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--evaluator", "toy"], "'dog' is not a toy concept"),  # the evaluator cannot score the concept
    (["--concept", "beach", "--anchor", "sea", "--evaluator", "toy", "--eval-text", "shape: star"],
     "--eval-text names what the evaluator looks for in one concept"),
])
def test_cli_unlearn_evaluator_text_refused_before_the_model(tmp_path, capsys, extra, message):
    code = _cli(["unlearn", str(tmp_path / "pixart"), *UNLEARN_DOG, *extra, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_choose_blocks_refuses_search_settings_of_another_method():
    from ditloc.edit import choose_blocks

    with pytest.raises(DitlocError, match="settings of the search, not of method 'patch'"):
        choose_blocks(None, "auto", 2, ["a dog"], "dog", method="patch", objective="self")
