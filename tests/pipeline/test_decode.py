import io
import re

import numpy as np
import pytest
from PIL import ExifTags, Image

from dpt_model.processing import PreprocessSpec, resize_for_model
from jobs.sample_images import encoded, synthetic_photo
from pipeline.decode import (
    DecodeError,
    decode_batch,
    decode_image,
    decode_in_slices,
    draft_side_px,
)
from tests.corpus import hostile_files, odd_files, png_declaring_size

LIMITS = {"max_image_pixels": 89_478_485, "max_side_px": 16_384}


# Each hostile file's reason, from its start: a decoder that gave every bad file
# the same reason would leave users unable to tell a truncated upload from an
# HTML error page saved as .jpg.
HOSTILE_REASONS = {
    "truncated.jpg": r"truncated or corrupt image data: image file is truncated",
    "empty.jpg": r"empty file$",
    "not-an-image.png": r"not an image: unrecognised format$",
    "error-page.jpg": r"not an image: unrecognised format$",
    # 900 MP: over twice Pillow's own limit, refused by Pillow from the header.
    "bomb.png": r"decompression bomb: Image size \(900000000 pixels\) exceeds limit",
    "corrupt-chunk.png": r"truncated or corrupt image data: broken data stream",
    "too-wide.png": r"image is 20001×2; a side exceeds decode\.max_side_px=16384$",
}


def test_every_hostile_file_has_an_expected_reason():
    assert set(HOSTILE_REASONS) == set(hostile_files())


@pytest.mark.parametrize("name,data", sorted(hostile_files().items()))
def test_hostile_file_raises_decode_error_with_its_own_reason(name, data):
    with pytest.raises(DecodeError) as raised:
        decode_image(data, **LIMITS)
    assert re.match(HOSTILE_REASONS[name], str(raised.value)), str(raised.value)


def test_image_over_max_image_pixels_is_refused_naming_the_setting():
    # 5000×5000 is under Pillow's own limit: our header check refuses it.
    with pytest.raises(DecodeError) as raised:
        decode_image(
            png_declaring_size(5_000, 5_000), max_image_pixels=10_000_000, max_side_px=16_384
        )
    assert str(raised.value) == (
        "decompression bomb: 5000×5000 = 25000000 pixels exceeds decode.max_image_pixels=10000000"
    )


def test_side_limit_applies_to_the_longer_side_of_a_tall_image():
    tall = encoded(Image.new("L", (3, 300)), "PNG")
    with pytest.raises(
        DecodeError, match=r"^image is 3×300; a side exceeds decode\.max_side_px=299$"
    ):
        decode_image(tall, max_image_pixels=10**6, max_side_px=299)
    assert decode_image(tall, max_image_pixels=10**6, max_side_px=300).rgb.shape == (300, 3, 3)


@pytest.mark.parametrize("name", sorted(odd_files()))
def test_odd_valid_image_decodes_to_rgb(name):
    data, expected_hw = odd_files()[name]
    rgb = decode_image(data, **LIMITS).rgb
    assert rgb.dtype == np.uint8 and rgb.shape == (*expected_hw, 3)


def test_sixteen_bit_gray_is_scaled_not_clipped():
    data, _ = odd_files()["gray16.png"]
    rgb = decode_image(data, **LIMITS).rgb
    assert rgb.min() == 0 and rgb.max() == 255
    assert len(np.unique(rgb)) > 100


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [("float32", 0, 1000), ("float32", -1, 1), ("int32", 0, 1_000_000), ("float32", 0, 1)],
)
def test_wide_range_and_float_images_are_spread_over_the_gray_levels(dtype, low, high):
    ramp = np.linspace(low, high, 40 * 60).reshape(40, 60).astype(dtype)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "TIFF")
    gray = decode_image(buffer.getvalue(), **LIMITS).rgb[:, :, 0].ravel()
    assert gray.min() == 0 and gray.max() == 255  # not darkened
    # Not clipped: a ramp spread over 256 levels leaves few pixels at either end.
    assert max(np.count_nonzero(gray == 0), np.count_nonzero(gray == 255)) < 0.01 * gray.size
    assert np.all(np.diff(gray.astype(int)) >= 0)  # the ramp's order kept


def test_postscript_is_never_handed_to_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    def ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto showpage\n"
    with pytest.raises(DecodeError, match=r"not an image: EPS is refused \(Pillow would run"):
        decode_image(eps, **LIMITS)


def test_exif_orientation_is_applied():
    data, _ = odd_files()["rotated.jpg"]
    assert decode_image(data, **LIMITS).rgb.shape[:2] == (80, 40)  # stored as 40×80


# EXIF orientation → the turn that shows the picture upright (1: none).
TURNS = {
    3: Image.Transpose.ROTATE_180,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "TIFF", "WEBP"])
@pytest.mark.parametrize("orientation", [1, 3, 5, 6, 7, 8])
def test_the_size_of_a_turned_image_is_its_turned_size_in_every_format(image_format, orientation):
    # Pillow turns TIFFs itself as it loads them; the others are turned here.
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :30] = 255  # a left half that shows which way it turned
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, image_format, exif=exif, quality=95)
    decoded = decode_image(buffer.getvalue(), **LIMITS)
    upright = Image.fromarray(stored)
    expected = np.asarray(
        upright.transpose(TURNS[orientation]) if orientation in TURNS else upright
    )
    assert decoded.original_hw == expected.shape[:2] == ((60, 40) if orientation > 4 else (40, 60))
    assert decoded.rgb.shape == expected.shape
    assert np.abs(decoded.rgb.astype(int) - expected).mean() < 8  # JPEG and WebP are lossy


def test_bomb_is_refused_from_the_header(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(hostile_files()["bomb.png"], **LIMITS)
    # Between Pillow's limit and twice it, where Pillow only warns.
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(png_declaring_size(10_000, 10_000), **LIMITS)


def test_a_raised_pixel_limit_lets_larger_images_past_pillows_own(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    # Declares 100 MP, over Pillow's default limit, and holds no pixels: past
    # the size checks, decoding finds the data missing.
    with pytest.raises(DecodeError) as raised:
        decode_image(
            png_declaring_size(10_000, 10_000), max_image_pixels=200_000_000, max_side_px=20_000
        )
    assert "bomb" not in str(raised.value) and "truncated" in str(raised.value)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own, for the rest of the process


def object_array(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def test_truncated_jpeg_becomes_error_row_and_good_rows_complete():
    good = encoded(synthetic_photo(64, 48, seed=1), "JPEG")
    files = {"good.jpg": good, **hostile_files(), "good-too.jpg": good}
    batch = {
        "source_uri": np.array(list(files), dtype=object),
        "image_bytes": object_array(list(files.values())),
        "status": np.array(["ok"] * len(files), dtype=object),
        "error": np.array([""] * len(files), dtype=object),
    }
    spec = PreprocessSpec()
    out = decode_batch(batch, {"depth": spec}, **LIMITS)
    columns = zip(out["status"], out["error"], out["depth_input"], strict=True)
    by_name = dict(zip(files, columns, strict=True))
    for name in ("good.jpg", "good-too.jpg"):
        status, reason, model_input = by_name[name]
        assert status == "ok" and reason == "" and model_input.shape == (384, 384, 3)
    for name in hostile_files():
        status, reason, model_input = by_name[name]
        assert status == "error" and model_input.size == 0
        assert re.match("decode: " + HOSTILE_REASONS[name], reason), (name, reason)
    assert "image_bytes" not in out
    assert list(out["height"][:1]) == [48] and list(out["width"][:1]) == [64]


def test_a_block_of_any_size_is_decoded_a_slice_at_a_time_to_the_same_rows():
    """A shard's block reaches decode whole (hundreds of thumbnails): its model
    inputs leave a slice at a time, equal to decoding it in one go."""
    files = [encoded(synthetic_photo(64, 48, seed=i), "JPEG") for i in range(4)] + [b"junk"]
    batch = {
        "source_uri": np.array([f"s#{i}" for i in range(5)], dtype=object),
        "image_bytes": object_array(files),
        "status": np.array(["ok"] * 5, dtype=object),
        "error": np.array([""] * 5, dtype=object),
    }
    specs = {"depth": PreprocessSpec()}
    slices = list(decode_in_slices(batch, 2, specs=specs, **LIMITS))
    assert [len(part["status"]) for part in slices] == [2, 2, 1]
    whole = decode_batch(batch, specs, **LIMITS)
    for key, column in whole.items():
        joined = [value for part in slices for value in part[key]]
        if key == "depth_input":
            assert all(np.array_equal(a, b) for a, b in zip(joined, column, strict=True))
        else:
            assert joined == list(column), key
    assert slices[-1]["status"].tolist() == ["error"]


KEEP_ASPECT_518 = PreprocessSpec(
    height_px=518, width_px=518, keep_aspect_ratio=True, ensure_multiple_of=14
)


def test_draft_side_is_the_largest_model_input_side():
    assert draft_side_px((3000, 4000), [PreprocessSpec()]) == 384
    # Keep-aspect inputs fit one side and exceed the target on the other.
    assert draft_side_px((3000, 4000), [PreprocessSpec(), KEEP_ASPECT_518]) == 686
    assert draft_side_px((3000, 4000), []) is None
    assert draft_side_px((3000, 4000), [PreprocessSpec(do_resize=False)]) is None


@pytest.mark.parametrize("spec", [PreprocessSpec(), KEEP_ASPECT_518], ids=["384", "keep-aspect"])
def test_large_jpeg_is_drafted_and_model_input_stays_within_tolerance(spec):
    data = encoded(synthetic_photo(3264, 2448, seed=3), "JPEG")
    full = decode_image(data, **LIMITS)
    drafted = decode_image(data, **LIMITS, reduce_for=[spec])
    assert drafted.original_hw == full.original_hw == (2448, 3264)
    needed = draft_side_px(drafted.original_hw, [spec])
    assert needed <= min(drafted.rgb.shape[:2]) < min(full.rgb.shape[:2])

    reference = resize_for_model(full.rgb, spec).astype(np.int16)
    ours = resize_for_model(drafted.rgb, spec, drafted.original_hw).astype(np.int16)
    assert ours.shape == reference.shape
    # The documented tolerance (README, decode.jpeg_draft): mean absolute
    # difference under half a level, 99 % of values within 3 levels.
    difference = np.abs(ours - reference)
    assert difference.mean() < 0.5
    assert np.percentile(difference, 99) <= 3


def test_draft_keeps_exif_orientation_and_original_size():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 2000×1200, shown 1200×2000
    data = encoded(synthetic_photo(2000, 1200, seed=4), "JPEG", exif=exif.tobytes())
    full = decode_image(data, **LIMITS)
    drafted = decode_image(data, **LIMITS, reduce_for=[PreprocessSpec()])
    assert full.original_hw == drafted.original_hw == (2000, 1200) == full.rgb.shape[:2]
    assert drafted.rgb.shape[:2] == (1000, 600)


def test_small_and_non_jpeg_images_are_not_drafted():
    for data, size in (
        (encoded(synthetic_photo(700, 500, seed=5), "JPEG"), (500, 700)),
        (encoded(synthetic_photo(1600, 1200, seed=5), "PNG"), (1200, 1600)),
    ):
        decoded = decode_image(data, **LIMITS, reduce_for=[PreprocessSpec()])
        assert decoded.rgb.shape[:2] == decoded.original_hw == size


def test_decode_batch_reports_original_size_of_drafted_images():
    data = encoded(synthetic_photo(1920, 1080, seed=6), "JPEG")
    batch = {
        "image_bytes": object_array([data]),
        "status": np.array(["ok"], dtype=object),
        "error": np.array([""], dtype=object),
    }
    for jpeg_draft in (True, False):
        out = decode_batch(batch, {"depth": PreprocessSpec()}, **LIMITS, jpeg_draft=jpeg_draft)
        assert (out["height"][0], out["width"][0]) == (1080, 1920)
        assert out["depth_input"][0].shape == (384, 384, 3)


def test_reduce_to_px_decodes_a_large_jpeg_at_the_smallest_scale_that_keeps_the_side():
    data = encoded(synthetic_photo(800, 600, seed=1), "JPEG")
    # 1/4 scale keeps both sides at least 100 px (200×150); 1/8 would not (100×75).
    assert decode_image(data, 2**31, 1 << 16, reduce_to_px=100).rgb.shape == (150, 200, 3)
    assert decode_image(data, 2**31, 1 << 16).rgb.shape == (600, 800, 3)


def test_a_file_that_breaks_in_its_header_is_corrupt_data_and_a_text_bomb_a_bomb():
    import struct
    import zlib

    jpeg = encoded(synthetic_photo(120, 90, seed=3), "JPEG")
    with pytest.raises(DecodeError, match=r"^truncated or corrupt image data: Truncated File"):
        decode_image(jpeg[:100], **LIMITS)  # cut before its frame header

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    png = encoded(Image.new("RGB", (4, 4)), "PNG")
    text_bomb = chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * (64 << 20)))  # 64 MiB of text
    with pytest.raises(DecodeError, match=r"^decompression bomb: Decompressed data too large"):
        decode_image(png[:33] + text_bomb + png[33:], **LIMITS)
    with pytest.raises(DecodeError, match=r"\(decode\.max_image_pixels=89478485\)$"):
        decode_image(png_declaring_size(30_000, 30_000), **LIMITS)  # Pillow's own refusal
