"""Generated sample images for the demo, the tests and the benchmark.

Photo-like content (smooth gradients, shapes, noise) so JPEG and PNG sizes and
decode times resemble real photos, plus a few files that must become error rows.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def synthetic_photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / (width / rng.uniform(1, 4)) + rng.uniform(0, 6)),
            128 + 100 * np.cos(y / (height / rng.uniform(1, 4)) + rng.uniform(0, 6)),
            128 + 60 * np.sin((x + y) / (max(width, height) / rng.uniform(1, 3))),
        ],
        axis=2,
    )
    base += rng.normal(0, 6, size=base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(8, max(9, width // 2)), y0 + rng.integers(8, max(9, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    return image


def encoded(image: Image.Image, format_name: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, **save_args)
    return buffer.getvalue()


# (relative key, width, height, format) for the demo's good images.
DEMO_IMAGES = (
    ("street/0001.jpg", 640, 480, "JPEG"),
    ("street/0002.jpg", 480, 640, "JPEG"),
    ("street/0003.png", 512, 512, "PNG"),
    ("park/0001.jpg", 800, 450, "JPEG"),
    ("park/0002.webp", 400, 300, "WEBP"),
    ("park/0003.jpg", 1024, 768, "JPEG"),
    ("indoor/room one.jpg", 600, 400, "JPEG"),
    ("indoor/kitchen.bmp", 320, 240, "BMP"),
)


def write_demo_images(folder: str | Path) -> Path:
    """Write the demo corpus: good images of several formats and sizes, and two bad files."""
    folder = Path(folder)
    for index, (key, width, height, format_name) in enumerate(DEMO_IMAGES):
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded(synthetic_photo(width, height, seed=index), format_name))
    good_jpeg = encoded(synthetic_photo(320, 240, seed=99), "JPEG")
    (folder / "broken").mkdir(exist_ok=True)
    (folder / "broken/truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (folder / "broken/error-page.jpg").write_bytes(
        b"<html><body><h1>503 Service Unavailable</h1></body></html>"
    )
    return folder
