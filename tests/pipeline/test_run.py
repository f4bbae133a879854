"""Pure parts of the job's composition, without Ray."""

from jobs.config import load_config
from pipeline.run import DECODE_BATCH_ROWS, config_hash_for, decode_rows

REQUIRED = ["input.uri=in", "output.uri=out", "models.depth=m"]


def test_config_hash_changes_with_what_shapes_outputs_not_with_speed_settings():
    with_labels = [*REQUIRED, "models.segmentation=s"]
    base = config_hash_for({}, load_config(None, with_labels))
    shaping_settings = (
        "output.depth_resolution=original",
        "decode.jpeg_draft=false",
        "pseudo_labels.enabled=true",
        "inference.flip_tta=true",
        "inference.segmentation_scales=[0.75,1.0]",
        "output.depth_format=npz_float16",
        "models.depth_kind=metric",
    )
    hashes = {config_hash_for({}, load_config(None, [*with_labels, s])) for s in shaping_settings}
    assert base not in hashes and len(hashes) == len(shaping_settings)
    # Later settings at their defaults leave the hash as it was before they existed.
    defaults = ("pseudo_labels.min_confidence=0.9", "inference.segmentation_scales=[1.0]")
    for default in defaults:
        assert config_hash_for({}, load_config(None, [*with_labels, default])) == base, default
    # The coverage bar only sets `kept`: changing it must not redo every image.
    labelled = [*with_labels, "pseudo_labels.enabled=true"]
    assert config_hash_for({}, load_config(None, labelled)) == config_hash_for(
        {}, load_config(None, [*labelled, "pseudo_labels.min_coverage=0.7"])
    )
    for speed in ("inference.batch_size=32", "output.png_compress_level=6"):
        assert config_hash_for({}, load_config(None, [*with_labels, speed])) == base, speed
    for speed in ("inference.cpu_threads=3", "resources.cpus_per_actor=2"):
        assert config_hash_for({}, load_config(None, [*with_labels, speed])) == base, speed


def test_decode_batches_never_exceed_one_inference_batch():
    def rows_for(batch_size):
        return decode_rows(load_config(None, [*REQUIRED, f"inference.batch_size={batch_size}"]))

    expected = [1, 8, DECODE_BATCH_ROWS, DECODE_BATCH_ROWS]
    assert [rows_for(size) for size in (1, 8, 32, "auto")] == expected
