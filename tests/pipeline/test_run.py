"""Pure parts of the job's composition, without Ray."""

from jobs.config import load_config
from pipeline.run import config_hash_for

REQUIRED = ["input.uri=in", "output.uri=out", "models.depth=m"]


def test_config_hash_changes_with_what_shapes_outputs_not_with_speed_settings():
    base = config_hash_for({}, load_config(None, REQUIRED))
    for shaping in ("output.depth_resolution=original", "decode.jpeg_draft=false"):
        assert config_hash_for({}, load_config(None, [*REQUIRED, shaping])) != base, shaping
    for speed in ("inference.batch_size=32", "output.png_compress_level=6"):
        assert config_hash_for({}, load_config(None, [*REQUIRED, speed])) == base, speed
    for speed in ("inference.cpu_threads=3", "resources.cpus_per_actor=2"):
        assert config_hash_for({}, load_config(None, [*REQUIRED, speed])) == base, speed
