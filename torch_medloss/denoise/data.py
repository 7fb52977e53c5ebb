"""The data of the denoising study: scikit-image's shipped photographs (no download), as grey images in [0, 1].

Training draws random patches (with a random flip/rotation) from TRAIN_IMAGES; the test set is TEST_IMAGES, the
two lists are disjoint. Noise is additive white Gaussian noise of standard deviation sigma / 255 (sigma given on
the [0, 255] scale), not clipped, as in DnCNN's protocol. All randomness comes from seeded generators: the same
seed gives the same patches and noise, whatever the model being trained.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Photographs and scans shipped inside scikit-image (skimage/data/*.png, *.jpg): texture, text, natural scenes.
TRAIN_IMAGES = ("brick", "grass", "gravel", "text", "page", "coffee", "chelsea", "rocket", "hubble_deep_field",
                "immunohistochemistry", "cell")
# Held out: the classic test images (astronaut converted to grey).
TEST_IMAGES = ("camera", "moon", "coins", "astronaut")


def load_image(name: str) -> np.ndarray:
    """skimage.data.<name>() as a float32 (H, W) array in [0, 1] (colour converted with rgb2gray)."""
    from skimage import color, data

    image = getattr(data, name)()
    if image.ndim == 3:
        image = color.rgb2gray(image[..., :3])
    elif image.dtype == np.uint8:
        image = image / 255.0
    return np.ascontiguousarray(image, dtype=np.float32)


def smallest_side(images: tuple[str, ...] = TRAIN_IMAGES) -> int:
    """The shortest side, in pixels, among images: the largest training patch side PatchSampler accepts."""
    return min(min(load_image(name).shape) for name in images)


def add_noise(clean: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """clean + N(0, (sigma / 255)^2), drawn from generator (on clean's device is not required: drawn on the CPU)."""
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float32) * (sigma / 255.0)
    return clean + noise.to(clean.device, clean.dtype)


class PatchSampler:
    """Batches of (noisy, clean) training patches, each (batch_size, 1, patch, patch), reproducible from seed.

    Each patch comes from an image chosen uniformly, at a uniform position, under one of the 8 flips/rotations of
    the square; its noise is drawn from the same generator.
    """

    def __init__(self, sigma: float, patch: int, batch_size: int, seed: int,
                 images: tuple[str, ...] = TRAIN_IMAGES) -> None:
        self.images = [torch.from_numpy(load_image(name)) for name in images]
        smallest = min(min(image.shape) for image in self.images)
        if patch > smallest:
            raise ValueError(f"patch must be <= {smallest} (the smallest training image side), got {patch}.")
        self.sigma = float(sigma)
        self.patch = int(patch)
        self.batch_size = int(batch_size)
        self.generator = torch.Generator().manual_seed(int(seed))

    def _draw(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def clean_batch(self) -> Tensor:
        patches = []
        for _ in range(self.batch_size):
            image = self.images[self._draw(len(self.images))]
            top = self._draw(image.shape[0] - self.patch + 1)
            left = self._draw(image.shape[1] - self.patch + 1)
            patch = image[top:top + self.patch, left:left + self.patch]
            mode = self._draw(8)
            patch = torch.rot90(patch, mode % 4)
            patches.append(patch.flip(1) if mode >= 4 else patch)
        return torch.stack(patches)[:, None].contiguous()

    def batch(self) -> tuple[Tensor, Tensor]:
        """(noisy, clean), float32 on the CPU; clean in [0, 1]."""
        clean = self.clean_batch()
        return add_noise(clean, self.sigma, self.generator), clean


@dataclass
class TestImage:
    name: str
    clean: Tensor  # (1, 1, H, W) in [0, 1]
    noisy: Tensor  # (1, 1, H, W), clean + fixed noise


def center_crop(image: np.ndarray, size: int | None) -> np.ndarray:
    if not size:
        return image
    top = max((image.shape[0] - size) // 2, 0)
    left = max((image.shape[1] - size) // 2, 0)
    return image[top:top + size, left:left + size]


def test_set(sigma: float, seed: int, crop: int | None = None,
             images: tuple[str, ...] = TEST_IMAGES) -> list[TestImage]:
    """The held-out images with their noise: fixed per (image, seed), the same for every model and run.

    The noise field is a standard normal drawn from a generator seeded with a hash of (seed, crc32(name)), scaled by
    sigma / 255, so a larger sigma scales the same field. crop: a centred square of that side (None: whole image).
    """
    out = []
    for name in images:
        clean = torch.from_numpy(np.ascontiguousarray(center_crop(load_image(name), crop)))[None, None]
        # SeedSequence mixes both into the 32 bits that torch's CPU generator (mt19937) actually uses.
        mixed = np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(mixed))
        out.append(TestImage(name, clean, add_noise(clean, sigma, generator)))
    return out
