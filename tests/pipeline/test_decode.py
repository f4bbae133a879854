import numpy as np
import pytest

from dpt_model.processing import PreprocessSpec
from jobs.sample_images import encoded, synthetic_photo
from pipeline.decode import DecodeError, decode_batch, decode_image
from tests.corpus import hostile_files, odd_files

LIMITS = {"max_image_pixels": 89_478_485, "max_side_px": 16_384}


@pytest.mark.parametrize("name,data", sorted(hostile_files().items()))
def test_hostile_file_raises_decode_error_with_reason(name, data):
    with pytest.raises(DecodeError) as raised:
        decode_image(data, **LIMITS)
    assert str(raised.value)


@pytest.mark.parametrize("name", sorted(odd_files()))
def test_odd_valid_image_decodes_to_rgb(name):
    data, expected_hw = odd_files()[name]
    rgb = decode_image(data, **LIMITS)
    assert rgb.dtype == np.uint8 and rgb.shape == (*expected_hw, 3)


def test_sixteen_bit_gray_is_scaled_not_clipped():
    data, _ = odd_files()["gray16.png"]
    rgb = decode_image(data, **LIMITS)
    assert rgb.min() == 0 and rgb.max() == 255
    assert len(np.unique(rgb)) > 100


def test_exif_orientation_is_applied():
    data, _ = odd_files()["rotated.jpg"]
    assert decode_image(data, **LIMITS).shape[:2] == (80, 40)  # stored as 40×80


def test_bomb_is_refused_from_the_header():
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(hostile_files()["bomb.png"], **LIMITS)


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
        assert status == "error" and reason.startswith("decode: ") and model_input.size == 0
    assert "image_bytes" not in out
    assert list(out["height"][:1]) == [48] and list(out["width"][:1]) == [64]
