"""Training images in, latents out: validated folder loading and VAE encoding."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DitlocError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_size(pipe) -> tuple[int, int]:
    """(height, width) in pixels the pipeline generates by default (its adapter knows)."""
    from ..adapters import get_adapter

    return get_adapter(pipe).image_size()


def image_files(directory) -> list[Path]:
    """The image files of a training folder, in name order; refuses a file, a missing or an empty folder
    (checked before any model loads)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DitlocError(f"{directory} is a file; --images takes a folder of images")
    if not directory.is_dir():
        raise DitlocError(f"image folder {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DitlocError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return files


def read_captions(directory) -> list[str]:
    """One caption per training image: the text file of the same name (``dog1.png`` ->
    ``dog1.txt``, the folder convention of kohya's and diffusers' scripts), in the
    images' order; refuses a missing or empty one (before any model loads)."""
    captions = []
    for path in image_files(directory):
        text_file = path.with_suffix(".txt")
        if not text_file.is_file():
            raise DitlocError(f"--captions: {path.name} has no caption file {text_file.name} next to it")
        text = " ".join(text_file.read_text(encoding="utf-8", errors="replace").split())
        if not text:
            raise DitlocError(f"--captions: {text_file} is empty; write the image's caption in it")
        captions.append(text)
    return captions


def load_image_folder(directory, size: tuple[int, int]) -> tuple[torch.Tensor, list[dict]]:
    """RGB images of exactly `size` (h, w) -> ([N, 3, h, w] in [-1, 1], records
    with file name and sha256). Every problem is one actionable line."""
    from PIL import Image, UnidentifiedImageError

    files = image_files(directory)
    arrays, records = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                mode, (w, h) = im.mode, im.size
                array = np.asarray(im)
        except (UnidentifiedImageError, OSError) as e:
            raise DitlocError(f"cannot read image {path}: {e}") from None
        if mode != "RGB":
            raise DitlocError(f"{path} is {mode}; convert the images to RGB")
        if (h, w) != tuple(size):
            raise DitlocError(f"{path} is {w}x{h}; the model trains at {size[1]}x{size[0]}, resize the images")
        arrays.append(array)
        records.append({"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, h, w]
    return x, records


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """[N, 3, h, w] in [-1, 1] -> latents [N, C, h/f, w/f] as the pipeline's
    denoiser sees them (posterior mean, shifted and scaled)."""
    vae = pipe.vae
    x = images.to(device=vae.device, dtype=vae.dtype)
    out = vae.encode(x)
    z = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent  # KL / DC autoencoder
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor
