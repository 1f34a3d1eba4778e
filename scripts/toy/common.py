"""Shared helpers for the toy-world training scripts (tokenizer, model configs,
data pool, checkpoint I/O)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import torch

from ditloc import _state
from ditloc.toy import world

REPO = Path(__file__).resolve().parents[2]
RUNS = REPO / "toy_training" / "runs"
MODEL_DIR = REPO / "src" / "ditloc" / "toy" / "model"
MAX_LEN = 32  # training token length (padding masked, see README/PROVENANCE)

SPECIALS = ["<pad>", "</s>", "<unk>"]


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in world.vocabulary():
        vocab.setdefault(w, len(vocab))
    # never in a training prompt; appended so existing ids are unchanged
    for w in world.RESERVED_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_LEN,
    )
    return fast


def text_encoder_config(vocab_size: int):
    from transformers import T5Config

    v = int(np.ceil(vocab_size / 8) * 8)
    return T5Config(
        vocab_size=v,
        d_model=128,
        d_ff=256,
        d_kv=32,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def make_text_encoder(vocab_size: int):
    from transformers import T5EncoderModel

    return T5EncoderModel(text_encoder_config(vocab_size))


def make_vae(latent_channels: int = 8, levels: int = 3):
    """levels 3: 32x32 -> 8x8 (the PixArt toy); levels 2: 32x32 -> 16x16 (the FLUX toy)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels={3: (32, 32, 64), 2: (32, 64)}[levels],
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=32,
        mid_block_add_attention=False,
    )


def make_transformer(num_layers=12, patch_size=2, heads=4, head_dim=32, channels=4):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=channels,
        out_channels=channels,
        num_layers=num_layers,
        dropout=0.0,
        norm_num_groups=32,
        cross_attention_dim=heads * head_dim,
        attention_bias=True,
        sample_size=8,
        patch_size=patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        upcast_attention=False,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=None,
        use_additional_conditions=False,
        caption_channels=128,
    )


def scheduler_config():
    """PixArt-alpha scheduler settings (linear betas 1e-4..0.02, 1000 steps)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
    )


def images_to_tensor(imgs: np.ndarray) -> torch.Tensor:
    """uint8 [N,32,32,3] -> float [-1,1] [N,3,32,32]."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_grid(imgs: np.ndarray, path, ncol: int = 8, scale: int = 3):
    from PIL import Image

    n = len(imgs)
    nrow = (n + ncol - 1) // ncol
    g = np.zeros((nrow * 32, ncol * 32, 3), np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, ncol)
        g[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] = im
    Image.fromarray(g).resize((ncol * 32 * scale, nrow * 32 * scale), Image.NEAREST).save(path)


# --------------------------------------------------------------------------
# Checkpoint / cache I/O: tensors in .safetensors, everything else in a .json
# sidecar.  Nothing is pickled or unpickled.
# --------------------------------------------------------------------------

FORMAT = "ditloc-toy-state-v1"


def save_state(stem, tensors: dict, meta: dict):
    _state.save_state(stem, tensors, meta, fmt=FORMAT)


def load_state(stem, prefixes=None):
    return _state.load_state(stem, prefixes, fmt=FORMAT)


state_exists = _state.state_exists
stem_of = _state.stem_of
flatten_optimizer = _state.flatten_optimizer
unflatten_optimizer = _state.unflatten_optimizer
_sub = _state._sub


def rng_state():
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(st):
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])


def _rng_to_json(st):
    name, key, pos, has_gauss, gauss = st["numpy"]
    version, internal, gauss_next = st["python"]
    return {
        "numpy": [name, [int(x) for x in key], int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }


def _rng_from_json(d, torch_state):
    name, key, pos, has_gauss, gauss = d["numpy"]
    version, internal, gauss_next = d["python"]
    return {
        "torch": torch_state,
        "numpy": (name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss),
        "python": (version, tuple(internal), gauss_next),
    }


_MODELS = ("transformer", "text_encoder", "ema_transformer", "ema_text_encoder", "id_head",
           "text_encoder_2", "ema_text_encoder_2")  # the last two: the FLUX family (CLIP + T5)


def save_dit_ckpt(ck: dict, stem):
    """Save a DiT training checkpoint dict (keys as built by train_dit.py) as
    ``<stem>.safetensors`` + ``<stem>.json``.  Model / optimizer / RNG entries
    are optional (the permanent ``ema_<step>`` copies hold only the EMA)."""
    tensors, meta = {}, {}
    for k, v in ck.items():
        if k in _MODELS:
            tensors.update({f"{k}.{n}": t for n, t in v.items()})
        elif k == "opt":
            t, meta["opt"] = flatten_optimizer(v)
            tensors.update(t)
        elif k == "gen":
            tensors["rng.gen"] = v
        elif k == "rng":
            tensors["rng.torch"] = v["torch"]
            meta["rng"] = _rng_to_json(v)
        else:  # step, args, data_rng (numpy bit_generator.state), configs, ...
            meta[k] = v
    save_state(stem, tensors, meta)


def load_dit_ckpt(stem, opt=None, models=_MODELS) -> dict:
    """Inverse of :func:`save_dit_ckpt` (same keys as the saved dict).  The
    optimizer state is only rebuilt when ``opt`` (the live optimizer) is given."""
    prefixes = [m + "." for m in models] + (["opt.", "rng."] if opt is not None else [])
    tensors, meta = load_state(stem_of(stem), prefixes)
    ck = {k: v for k, v in meta.items() if k not in ("opt", "rng", "format", "token")}
    for m in models:
        sd = _sub(tensors, m + ".")
        if sd:
            ck[m] = sd
    if opt is not None:
        ck["opt"] = unflatten_optimizer(tensors, meta["opt"], opt)
        ck["gen"] = tensors["rng.gen"]
        ck["rng"] = _rng_from_json(meta["rng"], tensors["rng.torch"])
    return ck


def log(fh, msg: str):
    print(msg, flush=True)
    if fh is not None:
        fh.write(msg + "\n")
        fh.flush()


def ensure_path():
    # allow `python scripts/toy/xxx.py` to import common
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
