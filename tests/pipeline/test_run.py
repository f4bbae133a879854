"""Pure parts of the job's composition, without Ray."""

from jobs.config import load_config
from pipeline.run import DECODE_BATCH_ROWS, config_hash_for, decode_rows

REQUIRED = ["input.uri=in", "output.uri=out", "models.depth=m"]


def test_config_hash_changes_with_what_shapes_outputs_not_with_speed_settings():
    base = config_hash_for({}, load_config(None, REQUIRED))
    for shaping in ("output.depth_resolution=original", "decode.jpeg_draft=false"):
        assert config_hash_for({}, load_config(None, [*REQUIRED, shaping])) != base, shaping
    for speed in ("inference.batch_size=32", "output.png_compress_level=6"):
        assert config_hash_for({}, load_config(None, [*REQUIRED, speed])) == base, speed
    for speed in ("inference.cpu_threads=3", "resources.cpus_per_actor=2"):
        assert config_hash_for({}, load_config(None, [*REQUIRED, speed])) == base, speed


def test_decode_batches_never_exceed_one_inference_batch():
    def rows_for(batch_size):
        return decode_rows(load_config(None, [*REQUIRED, f"inference.batch_size={batch_size}"]))

    expected = [1, 8, DECODE_BATCH_ROWS, DECODE_BATCH_ROWS]
    assert [rows_for(size) for size in (1, 8, 32, "auto")] == expected
