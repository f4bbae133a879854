import numpy as np
import pytest

from pipeline.encode import (
    decode_depth_npz,
    decode_depth_png,
    decode_segmentation_png,
    encode_depth_npz,
    encode_depth_png,
    encode_segmentation_png,
)


def test_depth_png_round_trips_all_16_bits():
    levels = np.arange(0, 65536, 7, dtype=np.uint16)[:9000].reshape(90, 100)
    png = encode_depth_png(levels, compress_level=1)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(decode_depth_png(png), levels)


def test_segmentation_png_stores_class_ids_including_ignore():
    class_ids = np.random.default_rng(0).integers(0, 6, (40, 30), dtype=np.uint8)
    class_ids[0, :5] = 255
    np.testing.assert_array_equal(
        decode_segmentation_png(encode_segmentation_png(class_ids, compress_level=1)), class_ids
    )


def test_float16_depth_round_trips_exactly_through_npz():
    depth = (np.random.default_rng(0).random((37, 53)) * 3000).astype(np.float16)
    data = encode_depth_npz(depth)
    decoded = decode_depth_npz(data)
    assert decoded.dtype == np.float16
    np.testing.assert_array_equal(decoded, depth)
    with pytest.raises(ValueError, match="float16"):
        encode_depth_npz(depth.astype(np.float32))
