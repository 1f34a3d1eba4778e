"""What differs between the toy model families (PixArt-alpha, FLUX): how the
trainable models are built, how prompts become conditioning, the noising and
the loss target, warm starts from an exported pipeline, and the export.

``train_dit.py --family pixart|flux`` and ``export_pipeline.py`` take
everything family-specific from here; the training loop, checkpointing, EMA,
scene pool and logging are shared.

- ``pixart``: PixArtTransformer2DModel + T5 (word-level toy tokenizer), DDPM
  epsilon prediction (linear betas), optionally v-weighted (``--loss-weight v``).
- ``flux``: FluxTransformer2DModel (double + single stream blocks, RoPE,
  ``guidance_embeds=False``) + T5 (``text_encoder_2``, the toy tokenizer) + a
  small CLIPTextModel (``text_encoder``, pooled output; a CLIP-style word-level
  tokenizer ``<bos> ... </s>`` over the same vocabulary), a 2-level VAE
  (32x32 -> 16x16 latents, 2x2 packed -> 64 image tokens), rectified flow
  (velocity target ``noise - x0``, FLUX's shifted logit-normal timesteps).

Sampling a flux export: ``FluxPipeline.from_pretrained(dir)(prompt, height=32,
width=32, num_inference_steps=20, true_cfg_scale=4.0, negative_prompt="",
max_sequence_length=32)``.  FluxPipeline runs T5 without an attention mask, so
the padding length is part of the conditioning: training pads to
``common.MAX_LEN`` (32) and sampling must pass ``max_sequence_length=32``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

import common


def _config_dict(model) -> dict:
    cfg = model.config
    return dict(cfg) if isinstance(cfg, dict) else cfg.to_dict()


def _check_vocab(pipe_dir: Path, sub: str, tokenizer):
    vocab_file = pipe_dir / sub / "tokenizer.json"
    if vocab_file.exists():
        saved = json.loads(vocab_file.read_text())["model"]["vocab"]
        own = tokenizer.get_vocab()
        if any(own.get(w) != i for w, i in saved.items()):  # an extension (new reserved words) is fine
            raise ValueError(f"{vocab_file}: tokenizer vocabulary differs from the family's tokenizer")


def _load_partial(name, src, dst, partial):
    if partial:
        own = dst.state_dict()
        keep = {k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape}
        dst.load_state_dict(keep, strict=False)
        fresh = sorted(set(own) - set(keep))
        print(f"partial init {name}: {len(keep)}/{len(own)} tensors copied; fresh: {fresh}", flush=True)
    else:
        dst.load_state_dict(src.state_dict(), strict=True)


# ==========================================================================
# PixArt-alpha (the shipped toy model).  Numerics exactly as before the split.
# ==========================================================================


class PixArt:
    name = "pixart"
    default_layers = 12
    default_out = common.RUNS / "dit"
    default_vae = common.RUNS / "vae" / "model"
    loss_weights = ("eps", "v")
    default_loss_weight = "eps"
    id_encoder = "text_encoder"  # the encoder whose token identity --id-loss keeps

    def build(self, args, channels):
        """(tokenizers, models): models in parameter order (transformer first)."""
        tokenizer = common.build_tokenizer()
        text_encoder = common.make_text_encoder(len(tokenizer))
        transformer = common.make_transformer(
            num_layers=args.layers, patch_size=args.patch, heads=args.heads, head_dim=args.head_dim,
            channels=channels,
        )
        self.tokenizer = tokenizer
        from diffusers import DDPMScheduler

        self.alphas_cumprod = DDPMScheduler(**common.scheduler_config()).alphas_cumprod
        self.args = args
        return {"tokenizer": tokenizer}, {"transformer": transformer, "text_encoder": text_encoder}

    def text_inputs(self, prompts):
        return self.tokenizer(prompts, padding="longest", max_length=common.MAX_LEN, truncation=True,
                              return_tensors="pt")

    def noise(self, x0, gen):
        """(xt, state) -- draws noise then timesteps from ``gen``."""
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return xt, {"t": t, "a": a, "target": noise}

    def forward(self, models, tok, xt, st):
        """(prediction, loss weight [B,1,1,1], id-loss encodings [N,d], their token ids [N])."""
        emb = models["text_encoder"](tok.input_ids, attention_mask=tok.attention_mask)[0]
        pred = models["transformer"](
            xt,
            encoder_hidden_states=emb,
            encoder_attention_mask=tok.attention_mask,
            timestep=st["t"],
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        if self.args.loss_weight == "v":
            a = st["a"]
            snr = (a / (1 - a)).view(-1)  # [B]
            w = (1 + 1 / snr).clamp(max=self.args.max_weight).view(-1, 1, 1, 1)
        else:
            w = torch.ones(xt.shape[0], 1, 1, 1)
        keep = tok.attention_mask.bool()
        return pred, w, emb[keep], tok.input_ids[keep]

    def init_from_pipeline(self, pipe_dir: Path, models, tokenizers, partial=False):
        from diffusers import PixArtTransformer2DModel
        from transformers import T5EncoderModel

        _load_partial("transformer", PixArtTransformer2DModel.from_pretrained(pipe_dir / "transformer"),
                      models["transformer"], partial)
        _load_partial("text_encoder", T5EncoderModel.from_pretrained(pipe_dir / "text_encoder"),
                      models["text_encoder"], partial)
        _check_vocab(pipe_dir, "tokenizer", tokenizers["tokenizer"])

    def build_pipeline(self, ck, vae):
        """The exported pipeline from a checkpoint's EMA weights (``ck`` from load_dit_ckpt)."""
        from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
        from transformers import T5Config, T5EncoderModel

        tokenizer = common.build_tokenizer()
        te = T5EncoderModel(T5Config.from_dict(ck["text_encoder_config"]))
        te.load_state_dict(ck["ema_text_encoder"])
        tcfg = {k: v for k, v in ck["transformer_config"].items() if not k.startswith("_")}
        tr = PixArtTransformer2DModel(**tcfg)
        tr.load_state_dict(ck["ema_transformer"])
        sched = DPMSolverMultistepScheduler(**common.scheduler_config())
        return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=te.eval(), vae=vae.eval(),
                                   transformer=tr.eval(), scheduler=sched)

    def sample(self, pipe, prompts, generator, steps=20):
        return pipe(prompts, num_inference_steps=steps, height=32, width=32, use_resolution_binning=False,
                    generator=generator, output_type="np").images


# ==========================================================================
# FLUX (joint attention)
# ==========================================================================

CLIP_BOS = "<bos>"
FLUX_ROPE = (8, 12, 12)  # text/id axis, rows, columns: sums to the head dim 32
FLUX_CLIP_HIDDEN = 64
FLUX_VAE_LEVELS = 2  # 32x32 -> 16x16 latents, 2x2 packed -> 64 tokens
FLUX_VAE_SCALE = 2 ** (FLUX_VAE_LEVELS - 1)  # FluxPipeline.vae_scale_factor
FLUX_LATENT_CHANNELS = 4
FLUX_CFG = 4.0


def build_clip_tokenizer():
    """CLIP-style tokenizer over the toy vocabulary: ``<bos> words </s>``, padded
    with ``<pad>``.  The toy tokenizer's ids with ``<bos>`` appended, so a word
    has the same id in both tokenizers; the pooled output is read at the first
    ``</s>`` (CLIPTextConfig.eos_token_id = 1)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(common.build_tokenizer().get_vocab())
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    vocab.setdefault(CLIP_BOS, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A </s>", special_tokens=[(CLIP_BOS, vocab[CLIP_BOS]), ("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=CLIP_BOS, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=common.MAX_LEN,
    )


def clip_config(tokenizer):
    from transformers import CLIPTextConfig

    v = int(np.ceil(len(tokenizer) / 8) * 8)
    return CLIPTextConfig(
        vocab_size=v, hidden_size=FLUX_CLIP_HIDDEN, intermediate_size=4 * FLUX_CLIP_HIDDEN, num_attention_heads=4,
        num_hidden_layers=2, projection_dim=FLUX_CLIP_HIDDEN, max_position_embeddings=common.MAX_LEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attention_dropout=0.0, dropout=0.0,
    )


def flux_scheduler_config():
    """FLUX.1's FlowMatchEulerDiscreteScheduler settings (dynamic shifting by image tokens)."""
    return dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)


def flux_mu(image_seq_len: int) -> float:
    """The ``mu`` FluxPipeline samples with for ``image_seq_len`` tokens (its calculate_shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = flux_scheduler_config()
    return calculate_shift(image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"],
                           c["max_shift"])


class Flux:
    name = "flux"
    default_layers = 4
    default_out = common.RUNS / "flux" / "dit"
    default_vae = common.RUNS / "flux" / "vae" / "model"
    loss_weights = ("flow",)
    default_loss_weight = "flow"
    id_encoder = "text_encoder_2"

    def build(self, args, channels):
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextModel

        tokenizer_2 = common.build_tokenizer()  # T5's
        tokenizer = build_clip_tokenizer()
        text_encoder_2 = common.make_text_encoder(len(tokenizer_2))
        text_encoder = CLIPTextModel(clip_config(tokenizer))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * channels, num_layers=args.layers, num_single_layers=args.single_layers,
            attention_head_dim=args.head_dim, num_attention_heads=args.heads,
            joint_attention_dim=text_encoder_2.config.d_model, pooled_projection_dim=FLUX_CLIP_HIDDEN,
            guidance_embeds=False, axes_dims_rope=FLUX_ROPE,
        )
        self.tokenizer, self.tokenizer_2, self.args = tokenizer, tokenizer_2, args
        self.shift = math.exp(flux_mu(64))
        return ({"tokenizer": tokenizer, "tokenizer_2": tokenizer_2},
                {"transformer": transformer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2})

    def text_inputs(self, prompts):
        # exactly the FluxPipeline calls (padding to max_length, no attention masks passed to the models)
        kw = dict(padding="max_length", max_length=common.MAX_LEN, truncation=True, return_tensors="pt")
        return {"clip": self.tokenizer(prompts, **kw), "t5": self.tokenizer_2(prompts, **kw)}

    def noise(self, x0, gen):
        """Rectified flow: x_t = (1 - s) x0 + s noise, target noise - x0.  s: logit-normal
        (``--logit-mean``, ``--logit-std``) shifted as FluxPipeline's sampling sigmas for 64 tokens."""
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.randn(x0.shape[0], generator=gen) * self.args.logit_std + self.args.logit_mean
        s = torch.sigmoid(u)
        s = self.shift * s / (1 + (self.shift - 1) * s)
        sv = s.view(-1, 1, 1, 1)
        xt = (1 - sv) * x0 + sv * noise
        return xt, {"sigma": s, "target": noise - x0}

    @staticmethod
    def pack(x):
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        return FluxPipeline._pack_latents(x, b, c, h, w)

    @staticmethod
    def unpack(x, latent_size):
        from diffusers import FluxPipeline

        # pixel size 2 * latent, vae_scale_factor 2 (what FluxPipeline._unpack_latents expects)
        return FluxPipeline._unpack_latents(x, latent_size * FLUX_VAE_SCALE, latent_size * FLUX_VAE_SCALE,
                                            FLUX_VAE_SCALE)

    def forward(self, models, tok, xt, st):
        from diffusers import FluxPipeline

        b, c, h, w = xt.shape
        emb = models["text_encoder_2"](tok["t5"].input_ids, output_hidden_states=False)[0]
        pooled = models["text_encoder"](tok["clip"].input_ids, output_hidden_states=False).pooler_output
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, xt.device, xt.dtype)
        txt_ids = torch.zeros(emb.shape[1], 3, dtype=xt.dtype)
        pred = models["transformer"](
            hidden_states=self.pack(xt), encoder_hidden_states=emb, pooled_projections=pooled,
            timestep=st["sigma"], img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False,
        )[0]
        pred = self.unpack(pred, h)
        keep = tok["t5"].attention_mask.bool()  # the prompt's tokens (the padding is not a word)
        return pred, torch.ones(b, 1, 1, 1), emb[keep], tok["t5"].input_ids[keep]

    def init_from_pipeline(self, pipe_dir: Path, models, tokenizers, partial=False):
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        _load_partial("transformer", FluxTransformer2DModel.from_pretrained(pipe_dir / "transformer"),
                      models["transformer"], partial)
        _load_partial("text_encoder", CLIPTextModel.from_pretrained(pipe_dir / "text_encoder"),
                      models["text_encoder"], partial)
        _load_partial("text_encoder_2", T5EncoderModel.from_pretrained(pipe_dir / "text_encoder_2"),
                      models["text_encoder_2"], partial)
        _check_vocab(pipe_dir, "tokenizer", tokenizers["tokenizer"])
        _check_vocab(pipe_dir, "tokenizer_2", tokenizers["tokenizer_2"])

    def build_pipeline(self, ck, vae):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        te2 = T5EncoderModel(T5Config.from_dict(ck["text_encoder_2_config"]))
        te2.load_state_dict(ck["ema_text_encoder_2"])
        te = CLIPTextModel(CLIPTextConfig.from_dict(ck["text_encoder_config"]))
        te.load_state_dict(ck["ema_text_encoder"])
        tcfg = {k: v for k, v in ck["transformer_config"].items() if not k.startswith("_")}
        tr = FluxTransformer2DModel(**tcfg)
        tr.load_state_dict(ck["ema_transformer"])
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**flux_scheduler_config()), vae=vae.eval(),
            text_encoder=te.eval(), tokenizer=build_clip_tokenizer(), text_encoder_2=te2.eval(),
            tokenizer_2=common.build_tokenizer(), transformer=tr.eval(),
        )

    def sample(self, pipe, prompts, generator, steps=20):
        return pipe(prompts, num_inference_steps=steps, height=32, width=32, true_cfg_scale=FLUX_CFG,
                    negative_prompt=[""] * len(prompts), max_sequence_length=common.MAX_LEN,
                    generator=generator, output_type="np").images


FAMILIES = {"pixart": PixArt, "flux": Flux}


def get(name: str):
    return FAMILIES[name]()


def family_of_ckpt(ck: dict) -> str:
    return ck.get("args", {}).get("family", "pixart")
