"""Robust (adversarial) erasure: the inner attacker changes only the concept's text states and lowers
the edited model's denoising loss, training runs on every family, a resumed run trains exactly what an
uninterrupted one does (the attacker's state is in the checkpoint), and bad input is one line, exit 2,
before any model loads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ditloc.adapters import get_adapter
from ditloc.edit import RobustConfig, load_edit, unlearn
from ditloc.edit.robust import Attacker, training_prompts
from ditloc.errors import DitlocError, Interrupted
from ditloc.testing import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

from cli_helpers import run_main

RUN = {"num_inference_steps": 2, "max_sequence_length": 16}
PROMPTS = ["a photo of a dog on the beach", "a dog in the snow", "a small dog at night"]
PRESERVE = ["a photo of a cat on the beach", "a car in the snow"]


def _config(**kw) -> RobustConfig:
    base = dict(steps=4, batch_size=2, rank=2, attack_steps=2, restart_every=3, images_per_prompt=1,
                checkpoint_every=2, seed=3)
    return RobustConfig(**{**base, **kw})


def test_the_attacker_moves_only_the_concepts_states_and_lowers_the_loss():
    pipe = tiny_pixart_pipeline()
    adapter = get_adapter(pipe)
    text = adapter.encode_text(PROMPTS, {"max_sequence_length": 16})
    attacker = Attacker(adapter, {"max_sequence_length": 16}, text, PROMPTS, ["dog"] * 3, lr=0.5)
    rows = torch.tensor([0, 1, 2, 0])
    values = {k: torch.randn_like(v) for k, v in attacker.state.items()}
    changed = (attacker.apply(rows, values)["embeds"] - text["embeds"][rows]).abs().sum(-1) > 0  # [B, L]
    for b, r in enumerate(rows.tolist()):
        span = adapter.concept_span(PROMPTS[r], "dog", {"max_sequence_length": 16}).positions
        assert changed[b].nonzero().flatten().tolist() == sorted(span)
    zero = attacker.apply(rows, attacker.state)["embeds"]
    assert torch.equal(zero, text["embeds"][rows])  # a restart is the plain prompt

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    target = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([200, 400, 600, 800])

    def loss_of(v):
        with torch.enable_grad():
            return torch.nn.functional.mse_loss(adapter.denoise(x, t, attacker.apply(rows, v)), target)

    with torch.no_grad():
        before = float(loss_of(attacker.state))
    for p in pipe.transformer.parameters():
        p.requires_grad_(True)
    attacker.attack(loss_of, 5)
    assert all(p.grad is None for p in pipe.transformer.parameters())  # the model takes no gradient
    with torch.no_grad():
        after = float(loss_of(attacker.state))
    assert after < before
    attacker.restart()
    assert all(float(v.abs().max()) == 0 for v in attacker.state.values())


@pytest.mark.parametrize("make", [tiny_pixart_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline],
                         ids=["pixart", "flux", "sd3"])
def test_robust_unlearning_trains_and_loads_on_every_family(make, tmp_path):
    pipe = make()
    res = unlearn(pipe, "dog", "cat", prompts=PROMPTS, blocks=get_adapter(pipe).block_names()[:1],
                  preserve=PRESERVE, config=_config(steps=2), out=tmp_path, **RUN)
    assert res.config["attack_steps"] == 2 and len(res.losses) == 2
    assert res.details["robust"]["prompts"] == PROMPTS  # the given prompts, not the probe set's
    assert res.details["preserve_target"] == "teacher"
    state = load_file(str(tmp_path / "checkpoint.safetensors"))
    extra = [k for k in state if k.startswith("extra.")]
    assert "extra.states" in extra and ("extra.pooled" in extra) == (make is not tiny_pixart_pipeline)
    fresh = make()
    before = fresh.transformer.state_dict()
    load_edit(fresh, tmp_path)
    assert any("lora" in k for k in fresh.transformer.state_dict()) and before  # the adapter is in place


def test_a_resumed_robust_erasure_trains_exactly_what_an_uninterrupted_one_does(tmp_path, monkeypatch):
    kw = dict(prompts=PROMPTS, blocks="block.0,block.1", preserve=PRESERVE, **RUN)
    straight = unlearn(tiny_pixart_pipeline(), "dog", "cat", config=_config(), out=tmp_path / "a", **kw)

    from ditloc.edit import train

    calls = {"n": 0}
    real = train.LocalizedTrainer.train_step

    def interrupted(self, loss_fn):
        calls["n"] += 1
        if calls["n"] == 4:  # after the checkpoint at step 2 and one more step (lost: resumed from 2)
            raise KeyboardInterrupt
        return real(self, loss_fn)

    monkeypatch.setattr(train.LocalizedTrainer, "train_step", interrupted)
    with pytest.raises(Interrupted):
        unlearn(tiny_pixart_pipeline(), "dog", "cat", config=_config(), out=tmp_path / "b", **kw)
    monkeypatch.setattr(train.LocalizedTrainer, "train_step", real)
    resumed = unlearn(tiny_pixart_pipeline(), "dog", "cat", config=_config(), out=tmp_path / "b", **kw)
    assert resumed.losses == straight.losses
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_robust_training_prompts_come_from_the_probe_set_unless_given():
    from ditloc.toy import load_pipeline

    pipe = load_pipeline()
    prompts = training_prompts(pipe, "zibbit", ["zibbit"])
    assert len(prompts) >= 12 and all("zibbit" in p for p in prompts)
    assert training_prompts(tiny_pixart_pipeline(), "a word no probe set has", ["x y"]) == ["x y"]


def test_robust_config_refuses_bad_settings():
    for bad, match in [({"attack_steps": 0}, "--attack-steps"), ({"restart_every": -1}, "--restart-every"),
                       ({"attack_lr": 0.0}, "--attack-lr"), ({"images_per_prompt": 0}, "--images-per-prompt"),
                       ({"plain_weight": -1.0}, "--plain-weight")]:
        with pytest.raises(DitlocError, match=match):
            RobustConfig(**bad)
    assert RobustConfig().learning_rate == 1e-3 and RobustConfig(method="full").learning_rate == 1e-5
    assert RobustConfig().no_grad_prefix is False  # the attacker's gradient needs every block


@pytest.mark.parametrize("argv, message", [
    (["--robust", "--edit-method", "closed-form"], "--robust trains the erasure against an attacker"),
    (["--attack-steps", "2"], "--attack-steps sets the inner attacker of --robust"),
    (["--robust", "--preserve-target", "teacher"], "--robust keeps the preserved prompts"),
    (["--robust", "--attack-steps", "0"], "--attack-steps must be a positive integer"),
])
def test_robust_bad_input_is_one_line_before_the_model_loads(argv, message, capsys, monkeypatch, tmp_path):
    import ditloc.toy

    monkeypatch.setattr(ditloc.toy, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    code, _, err = run_main(["unlearn", "toy", "--concept", "zibbit", "--anchor", "triangle", "--out",
                             str(tmp_path / "out"), *argv], capsys)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_cli_robust_unlearning_and_an_attack_on_it(tmp_path, capsys):
    import json

    from ditloc import cli

    model, out = tmp_path / "model", tmp_path / "edit"
    tiny_pixart_pipeline().save_pretrained(model)
    size = ["--steps", "2", "--height", "32", "--width", "32"]
    code, _, err = run_main(["unlearn", str(model), "--concept", "dog", "--anchor", "cat", "--prompt", PROMPTS[0],
                             "--prompt", PROMPTS[1], "--preserve", PRESERVE[0], "--robust", "--train-steps", "2",
                             "--attack-steps", "1", "--images-per-prompt", "1", "--lora-rank", "2", "--blocks",
                             "block.1", *size, "--out", str(out)], capsys)
    assert code == 0, err
    record = json.loads((out / "ditloc_edit.json").read_text())
    config = record["config"]
    assert (config["attack_steps"], config["images_per_prompt"], config["rank"], config["steps"]) == (1, 1, 2, 2)
    assert config["learning_rate"] == 1e-3 and record["details"]["robust"]["prompts"] == PROMPTS[:2]
    code, printed, err = run_main(["attack", str(model), "--edit", str(out), "--concept", "dog", "--attack",
                                   "conditioning", "--budget-steps", "2", "--n-images", "2", "--train-images", "2",
                                   "--batch-size", "2", "--evaluator", "toy", "--eval-text", "shape: star", *size,
                                   "--max-sequence-length", "16",
                                   "--out", str(tmp_path / "atk")], capsys)
    assert code == 0, err
    assert "| edited |" in printed and cli is not None


def test_robust_auto_blocks_train_every_block_unless_a_k_is_given(tmp_path):
    said = []
    pipe = tiny_pixart_pipeline()
    res = unlearn(pipe, "dog", "cat", prompts=PROMPTS, preserve=PRESERVE, config=_config(steps=1), progress=said.append,
                  **RUN)
    assert list(res.blocks) == get_adapter(pipe).block_names()
    assert any(m.startswith("robust erasure: training every block") for m in said)
