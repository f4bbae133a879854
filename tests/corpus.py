"""Hostile and odd image files, built in code so every case is explicit."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.sample_images import encoded, synthetic_photo
from pipeline.keys import annotation_tag


def png_declaring_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height but holds almost no data (a bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def corrupt_png_chunk() -> bytes:
    data = bytearray(encoded(synthetic_photo(64, 48, seed=5), "PNG"))
    start = data.index(b"IDAT") + 4
    for offset in range(start + 10, start + 40):
        data[offset] ^= 0xFF
    return bytes(data)


def exif_rotated_jpeg(width: int, height: int) -> bytes:
    """Stored width×height, EXIF orientation 6: viewers show it height×width."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(synthetic_photo(width, height, seed=7), "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [synthetic_photo(48, 32, seed=s).convert("P") for s in (1, 2)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def hostile_files() -> dict[str, bytes]:
    """Files that must each become an error row (decode limits at their defaults)."""
    good_jpeg = encoded(synthetic_photo(120, 90, seed=3), "JPEG")
    return {
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "empty.jpg": b"",
        "not-an-image.png": b"\x00\x01 this is not an image at all \xff" * 10,
        "error-page.jpg": b"<!DOCTYPE html><html><body>403 Forbidden</body></html>",
        "bomb.png": png_declaring_size(30_000, 30_000),
        "corrupt-chunk.png": corrupt_png_chunk(),
        "too-wide.png": encoded(Image.new("L", (20_001, 2)), "PNG"),
    }


def odd_files() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Valid but unusual files → (bytes, expected (height, width) after EXIF)."""
    sixteen_bit = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    palette = synthetic_photo(40, 30, seed=4).convert("P")
    palette.info["transparency"] = 0
    return {
        "cmyk.jpg": (encoded(synthetic_photo(50, 40, seed=1).convert("CMYK"), "JPEG"), (40, 50)),
        "gray16.png": (encoded(Image.fromarray(sixteen_bit), "PNG"), (30, 40)),
        "palette-alpha.png": (encoded(palette, "PNG", transparency=0), (30, 40)),
        "rotated.jpg": (exif_rotated_jpeg(80, 40), (80, 40)),
        "one-pixel.png": (encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), (1, 1)),
        "strip.png": (encoded(synthetic_photo(4000, 64, seed=2), "PNG"), (64, 4000)),
        "animated.gif": (animated_gif(), (32, 48)),
    }


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def map_tag(row: dict) -> str:
    """The annotation tag in the names of a prediction row's map files."""
    return annotation_tag(row["image_id"], row["source_version"], row["config_hash"])
