"""Tiny, randomly initialised pipelines built from configs (nothing downloaded).

For tests, benchmarks and users who want to check a workflow without weights.
Every component is a real diffusers/transformers class, so the code paths are
the ones a real checkpoint takes.
"""

from __future__ import annotations

import re

import torch

from .errors import DitlocError

WORDS = (
    "a an the of in on at with and photo painting picture style van gogh monet eiffel tower night "
    "red blue green dog cat snoopy beach forest city river bridge sky sunset portrait man woman "
    "castle cake apple house car boat tree flower field mountain lake snow rain"
).split()


def word_tokenizer(words=WORDS, *, bos: bool = False, eos: bool = True, model_max_length: int = 512):
    """A word-level fast tokenizer (the `tokenizers` library) with character offsets.
    T5-like by default (`</s>` appended); `bos=True, eos=False` is Gemma-like."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<bos>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in words:
        for piece in re.findall(r"\w+|[^\w\s]", w.lower()):
            vocab.setdefault(piece, len(vocab))
    for p in ",.;:!?'\"()-":
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = " ".join((["<bos>"] if bos else []) + ["$A"] + (["</s>"] if eos else []))
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<bos>", vocab["<bos>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<bos>",
        model_max_length=model_max_length,
    )


#: the `tokenizers=` choices of the builders: one token per word (`words` is the vocabulary), or the
#: subword tokenizers of `ditloc.testing_tokenizers` (T5 Unigram, Gemma BPE, CLIP byte-level BPE), as real
#: checkpoints have (`words` join the corpus their vocabulary is learned on)
TOKENIZERS = ("word", "subword")


def _check_tokenizers(tokenizers: str) -> None:
    if tokenizers not in TOKENIZERS:
        raise DitlocError(f"tokenizers must be one of {', '.join(TOKENIZERS)}; got {tokenizers!r}")


def _t5_tokenizer(tokenizers: str, words):
    from .testing_tokenizers import t5_tokenizer

    return word_tokenizer(words) if tokenizers == "word" else t5_tokenizer(tuple(words))


def _gemma_tokenizer(tokenizers: str, words):
    from .testing_tokenizers import gemma_tokenizer

    return word_tokenizer(words, bos=True, eos=False) if tokenizers == "word" else gemma_tokenizer(tuple(words))


def _clip_tokenizer(tokenizers: str, words, pad_token: str = "<|endoftext|>"):
    from .testing_tokenizers import clip_tokenizer

    return clip_like_tokenizer(words) if tokenizers == "word" else clip_tokenizer(tuple(words), pad_token=pad_token)


def tiny_pixart_pipeline(*, num_layers: int = 4, seed: int = 0, words=WORDS, tokenizers: str = "word"):
    """PixArtAlphaPipeline: T5 text encoder, small VAE, PixArt transformer (32x32 images).
    `tokenizers="subword"`: a T5 Unigram tokenizer instead of one token per word."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    _check_tokenizers(tokenizers)
    with torch.random.fork_rng():
        torch.random.manual_seed(seed)  # isolated by fork_rng: the caller's RNG state is restored
        tokenizer = _t5_tokenizer(tokenizers, words)
        text_encoder = T5EncoderModel(
            T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4)
        ).eval()
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        ).eval()
        transformer = PixArtTransformer2DModel(
            sample_size=16,
            num_layers=num_layers,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_channels=32,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=32,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
        ).eval()
        _randomize_zero_init(transformer, seed)
    scheduler = DPMSolverMultistepScheduler()
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def tiny_pixart_sigma_pipeline(*, num_layers: int = 4, seed: int = 0, words=WORDS, tokenizers: str = "word"):
    """PixArtSigmaPipeline, laid out where PixArt-Sigma differs from alpha: the pipeline reads 300 T5
    tokens (its default; alpha's is 120), an SDXL-style VAE (scaling factor 0.13025; here 3 levels,
    4x), no size conditions, positional embeddings at interpolation scale 2; sample size 8 (32x32
    images). `tokenizers="subword"`: a T5 Unigram tokenizer instead of one token per word."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    _check_tokenizers(tokenizers)
    with torch.random.fork_rng():
        torch.random.manual_seed(seed)  # isolated by fork_rng: the caller's RNG state is restored
        tokenizer = _t5_tokenizer(tokenizers, words)
        text_encoder = T5EncoderModel(
            T5Config(vocab_size=len(tokenizer), d_model=48, d_ff=64, d_kv=12, num_layers=2, num_heads=4)
        ).eval()
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8, sample_size=32,
            scaling_factor=0.13025,
        ).eval()
        transformer = PixArtTransformer2DModel(
            sample_size=8, num_layers=num_layers, patch_size=2, attention_head_dim=8, num_attention_heads=4,
            caption_channels=48, in_channels=4, out_channels=8, cross_attention_dim=32, norm_type="ada_norm_single",
            use_additional_conditions=False, interpolation_scale=2,
        ).eval()
        _randomize_zero_init(transformer, seed)
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def tiny_sana_pipeline(*, num_layers: int = 3, seed: int = 0, words=WORDS, qk_norm: str | None = None,
                       tokenizers: str = "word"):
    """SanaPipeline: Gemma-2 text encoder, small AutoencoderDC, SANA transformer.
    `tokenizers="subword"`: a Gemma BPE tokenizer instead of one token per word."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    _check_tokenizers(tokenizers)
    with torch.random.fork_rng():
        torch.random.manual_seed(seed)  # isolated by fork_rng: the caller's RNG state is restored
        tokenizer = _gemma_tokenizer(tokenizers, words)
        text_encoder = Gemma2Model(
            Gemma2Config(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        ).eval()
        vae = AutoencoderDC(
            in_channels=3,
            latent_channels=4,
            attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)),
            decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1),
            decoder_layers_per_block=[1, 1],
            downsample_block_type="conv",
            upsample_block_type="interpolate",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        ).eval()
        transformer = SanaTransformer2DModel(
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=num_layers,
            num_attention_heads=2,
            attention_head_dim=4,
            num_cross_attention_heads=2,
            cross_attention_head_dim=4,
            cross_attention_dim=8,
            caption_channels=16,
            sample_size=16,
            qk_norm=qk_norm,
        ).eval()
        _randomize_zero_init(transformer, seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def _clip_text_encoder(tokenizer, with_projection: bool, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, projection_dim=hidden, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _flat_vae(latent_channels: int, shift_factor: float):
    """A one-level AutoencoderKL (vae_scale_factor 1), as the FLUX/SD3 families expect it."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=shift_factor, scaling_factor=1.5035,
    ).eval()


def clip_like_tokenizer(words=WORDS):
    """CLIP-like: <bos> ... </s>, 77 tokens, a vocabulary in another order than the
    T5-like tokenizer's (so CLIP and T5 token ids and positions differ)."""
    tok = word_tokenizer(tuple(reversed(words)), bos=True, eos=True, model_max_length=77)
    return tok


def tiny_flux_pipeline(*, num_layers: int = 2, num_single_layers: int = 2, seed: int = 0, words=WORDS,
                       guidance_embeds: bool = True, tokenizers: str = "word"):
    """FluxPipeline: CLIP (pooled) + T5 (text stream), FLUX transformer with double and single blocks.
    `guidance_embeds=True` is FLUX.1-dev's guidance-distilled layout; False has no guidance embedding
    (FLUX.1-schnell, base models with true CFG). `tokenizers="subword"`: CLIP BPE and T5 Unigram."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    _check_tokenizers(tokenizers)
    with torch.random.fork_rng():
        torch.random.manual_seed(seed)  # isolated by fork_rng: the caller's RNG state is restored
        tokenizer = _clip_tokenizer(tokenizers, words)
        text_encoder = _clip_text_encoder(tokenizer, with_projection=False)
        tokenizer_2 = _t5_tokenizer(tokenizers, words)
        text_encoder_2 = T5EncoderModel(
            T5Config(vocab_size=len(tokenizer_2), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4)
        ).eval()
        vae = _flat_vae(latent_channels=1, shift_factor=0.0)  # FLUX needs shift_factor=0.0
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds,
        ).eval()
        _randomize_zero_init(transformer, seed)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def tiny_flux_schnell_pipeline(*, num_layers: int = 2, num_single_layers: int = 2, seed: int = 0, words=WORDS,
                               tokenizers: str = "word"):
    """FluxPipeline laid out as FLUX.1-schnell: no guidance embedding (timestep-distilled; run it with
    `guidance_scale=0.0` and no CFG), a flow-matching scheduler with a fixed shift of 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_flux_pipeline(num_layers=num_layers, num_single_layers=num_single_layers, seed=seed, words=words,
                              guidance_embeds=False, tokenizers=tokenizers)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return pipe


def tiny_sd3_pipeline(*, num_layers: int = 3, seed: int = 0, words=WORDS, dual_attention_layers=(0,),
                      qk_norm: str | None = "rms_norm", with_t5: bool = True, tokenizers: str = "word"):
    """StableDiffusion3Pipeline: CLIP-L, CLIP-G, T5. The defaults are SD3.5 Medium's layout (MMDiT-X:
    dual attention in the first blocks, RMS qk norm); `dual_attention_layers=()` is SD3.5 Large's,
    and with `qk_norm=None` too SD3 Medium's. `tokenizers="subword"`: CLIP BPE (the second one pads
    with "!", as SD3's does) and T5 Unigram."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    _check_tokenizers(tokenizers)
    with torch.random.fork_rng():
        torch.random.manual_seed(seed)  # isolated by fork_rng: the caller's RNG state is restored
        tokenizer = _clip_tokenizer(tokenizers, words)
        tokenizer_2 = _clip_tokenizer(tokenizers, words, pad_token="!")
        text_encoder = _clip_text_encoder(tokenizer, with_projection=True)
        text_encoder_2 = _clip_text_encoder(tokenizer_2, with_projection=True)
        tokenizer_3 = _t5_tokenizer(tokenizers, words) if with_t5 else None
        text_encoder_3 = (
            T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=64, d_ff=64, d_kv=8, num_layers=2, num_heads=4)).eval()
            if with_t5 else None
        )
        vae = _flat_vae(latent_channels=4, shift_factor=0.0609)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, num_layers=num_layers, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
            out_channels=4, dual_attention_layers=tuple(dual_attention_layers), qk_norm=qk_norm,
        ).eval()
        _randomize_zero_init(transformer, seed)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def _randomize_zero_init(module: torch.nn.Module, seed: int) -> None:
    """DiTs zero-initialise their output layers and some biases, which makes a fresh
    model ignore its text. Give every zero tensor small random values so random
    models have text-dependent outputs (for invariants that must be tested)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def main(argv=None) -> int:
    """`python -m ditloc.testing save DIR [--family pixart|sana|...] [--tokenizers word|subword]`: write a
    tiny random pipeline."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ditloc.testing")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="save a tiny random pipeline directory")
    s.add_argument("dir")
    builders = {"pixart": tiny_pixart_pipeline, "pixart-sigma": tiny_pixart_sigma_pipeline, "sana": tiny_sana_pipeline,
                "flux": tiny_flux_pipeline, "flux-schnell": tiny_flux_schnell_pipeline, "sd3": tiny_sd3_pipeline}
    s.add_argument("--family", choices=tuple(builders), default="pixart")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tokenizers", choices=TOKENIZERS, default="word")
    args = ap.parse_args(argv)
    pipe = builders[args.family](seed=args.seed, tokenizers=args.tokenizers)
    pipe.save_pretrained(args.dir)
    print(f"wrote a tiny random {args.family} pipeline to {args.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
