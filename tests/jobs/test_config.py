import re

import pytest

from jobs.config import ConfigError, load_config

MINIMAL = ["input.uri=in", "output.uri=out", "models.depth=some/model"]


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_plus_overrides():
    config = load_config(None, [*MINIMAL, "inference.batch_size=16", "resources.actors.max=4"])
    assert config.inference.batch_size == 16 and config.resources.actors.max == 4
    assert config.models.segmentation is None and config.device == "cpu"


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, "inference:\n  batchsize: 4\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, MINIMAL)
    assert "unknown key 'inference.batchsize'" in str(raised.value)
    assert "did you mean 'inference.batch_size'" in str(raised.value)
    with pytest.raises(ConfigError, match="did you mean 'output'"):
        load_config(None, [*MINIMAL, "outputs.uri=o"])


def test_wrong_type_names_the_key_and_value():
    with pytest.raises(ConfigError, match=r"inference\.batch_size.*'lots'"):
        load_config(None, [*MINIMAL, "inference.batch_size=lots"])


def test_a_missing_section_names_the_key_to_set():
    with pytest.raises(ConfigError, match=r"missing key 'input\.uri': it is required"):
        load_config(None, ["output.uri=out", "models.depth=m"])
    with pytest.raises(ConfigError, match=r"missing key 'output\.uri': it is required"):
        load_config(None, ["input.uri=in", "models.depth=m"])
    with pytest.raises(ConfigError, match=r"missing key 'output\.uri': it is required"):
        load_config(None, ["input.uri=in", "models.depth=m", "output.overwrite=true"])


def test_no_model_at_all_is_refused():
    with pytest.raises(ConfigError, match="set at least one"):
        load_config(None, ["input.uri=in", "output.uri=out"])


def test_cuda_without_gpus_is_refused():
    with pytest.raises(ConfigError, match="gpus_per_actor"):
        load_config(None, [*MINIMAL, "inference.device=cuda"])


def test_actor_bounds_are_checked():
    with pytest.raises(ConfigError, match="must not exceed"):
        load_config(None, [*MINIMAL, "resources.actors.min=3", "resources.actors.max=2"])


def test_null_override_disables_a_task(tmp_path):
    path = write(tmp_path, "models:\n  depth: a\n  segmentation: b\n")
    config = load_config(path, ["input.uri=in", "output.uri=out", "models.segmentation=null"])
    assert config.models.segmentation is None


def test_redacted_config_hides_credentials():
    signed = "https://bucket.example.com/list.txt?X-Amz-Credential=AKIAX&X-Amz-Signature=0ab1"
    config = load_config(None, [f"input.uri={signed}", "output.uri=out", "models.depth=m"])
    assert config.redacted()["input"]["uri"] == "https://bucket.example.com/list.txt"


@pytest.mark.parametrize("key", ["input.uri", "output.uri", "models.depth"])
def test_credentials_before_a_bucket_are_refused_without_being_echoed(key):
    settings = dict(item.split("=", 1) for item in MINIMAL)
    settings[key] = "s3://AKIAFAKE04:S3CR3T-xyz@bucket/prefix"
    with pytest.raises(ConfigError, match=rf"{key}.*credentials in a URI are not read") as raised:
        load_config(None, [f"{name}={value}" for name, value in settings.items()])
    assert "AKIAFAKE04" not in str(raised.value) and "S3CR3T" not in str(raised.value)
    # "@" further on is part of a key; http(s) userinfo is basic auth; a name
    # before "@" without a secret is Azure's container@account.
    for fine in ["s3://bucket/user@example.com/photos", "abfs://data@acct.dfs.core.windows.net/x"]:
        settings[key] = fine
        load_config(None, [f"{name}={value}" for name, value in settings.items()])


def test_credentials_in_the_endpoint_url_are_refused_without_being_echoed():
    endpoint = "storage.endpoint_url=http://AKIAFAKE04:S3CR3T-xyz@127.0.0.1:9000"
    with pytest.raises(ConfigError, match=r"endpoint_url.*user:secret@ before the host") as raised:
        load_config(None, [*MINIMAL, endpoint])
    assert "AKIAFAKE04" not in str(raised.value) and "S3CR3T" not in str(raised.value)
    with pytest.raises(ConfigError, match=r"before the host"):  # without its scheme
        load_config(None, [*MINIMAL, "storage.endpoint_url=AKIAFAKE04:S3CR3T-xyz@minio:9000"])
    load_config(None, [*MINIMAL, "storage.endpoint_url=http://127.0.0.1:9000/"])


def test_example_configs_validate():
    from pathlib import Path

    for path in Path("jobs/configs").glob("*.yaml"):
        load_config(path, ["input.uri=in", "output.uri=out"])


def test_storage_options_carry_endpoint_region_and_retry_budget():
    config = load_config(
        None,
        [
            *MINIMAL,
            "storage.endpoint_url=http://127.0.0.1:9000",
            "storage.region=eu-west-1",
            "storage.max_attempts=4",
        ],
    )
    assert config.storage_options() == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
        "config_kwargs": {
            "retries": {"max_attempts": 4, "mode": "standard"},
            "connect_timeout": 60,
            "read_timeout": 60,
        },
    }


def test_input_format_is_one_of_the_known_ones():
    with pytest.raises(ConfigError, match=r"input\.format.*'tfrecord'"):
        load_config(None, [*MINIMAL, "input.format=tfrecord"])


def test_extensions_are_normalised_to_lower_case_without_dots():
    config = load_config(None, [*MINIMAL, "input.extensions=[.JPG, png]"])
    assert config.input.extensions == ("jpg", "png")


@pytest.mark.parametrize("written", ["jpg,PNG", "jpg png", "jpg, .png"])
def test_extensions_may_be_one_string_of_several(written):
    config = load_config(None, [*MINIMAL, f"input.extensions={written}"])
    assert config.input.extensions == ("jpg", "png")
    assert load_config(None, [*MINIMAL, "input.extensions=tif"]).input.extensions == ("tif",)


def test_pseudo_labels_without_a_segmentation_model_are_refused():
    with pytest.raises(ConfigError, match=r"pseudo_labels\.enabled needs models\.segmentation"):
        load_config(None, [*MINIMAL, "pseudo_labels.enabled=true"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("run_id=../../etc", "run_id"),
        ("run_id=a/b", "run_id"),
        ("inference.segmentation_scales=[.nan]", "inference.segmentation_scales"),
        ("inference.batch_size=true", "inference.batch_size"),
        ("output.rows_per_part=yes", "output.rows_per_part"),
    ],
)
def test_values_that_would_escape_or_crash_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [*MINIMAL, override])


def test_a_key_given_twice_in_the_yaml_is_refused(tmp_path):
    path = write(tmp_path, "inference:\n  batch_size: 8\n  batch_size: 16\n")
    with pytest.raises(ConfigError, match="key 'batch_size' is given twice"):
        load_config(path, MINIMAL)


def test_set_keeps_numbers_and_dates_as_text_where_the_key_takes_text():
    config = load_config(
        None,
        [
            "input.uri=0123",  # YAML 1.1 would read octal 83
            "output.uri=2024-01-01",  # and this a date
            "models.depth=m",
            "run_id=20240101",
            "inference.batch_size=8",
        ],
    )
    assert (config.input.uri, config.output.uri, config.run_id) == (
        "0123",
        "2024-01-01",
        "20240101",
    )
    assert load_config(None, [*MINIMAL, "run_id=yes"]).run_id == "yes"  # YAML 1.1's true
    assert config.inference.batch_size == 8  # a number where the key takes one
    assert load_config(None, [*MINIMAL, "models.segmentation=null"]).models.segmentation is None


def test_a_yaml_error_names_its_line_and_quotes_none(tmp_path):
    path = write(tmp_path, "storage:\n  endpoint_url: http://admin:hunter2@minio:9000 region: x\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: .*\(line 2, column \d+\)") as raised:
        load_config(path, MINIMAL)
    assert "hunter2" not in str(raised.value)


def test_a_value_echoed_back_loses_its_credentials():
    with pytest.raises(ConfigError, match=r"storage\.endpoint_url") as raised:
        load_config(None, [*MINIMAL, "storage.endpoint_url=[http://admin:hunter2@minio:9000]"])
    assert "hunter2" not in str(raised.value) and "http://minio:9000" in str(raised.value)


@pytest.mark.parametrize(
    "data,message",
    [
        ("inference:\n  batch_size: 4\n".encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
        (b"# caf\xe9\ninference:\n  batch_size: 4\n", r"is not UTF-8 text \(byte 5, line 1\)"),
    ],
)
def test_a_config_file_that_is_not_utf8_is_named_not_a_traceback(tmp_path, data, message):
    path = tmp_path / "job.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=message):
        load_config(path, MINIMAL)
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        load_config(tmp_path, MINIMAL)


def test_yaml_merge_keys_merge_and_a_list_as_key_is_named(tmp_path):
    path = write(
        tmp_path,
        "defaults: &shared {batch_size: 4, dtype: float32}\n"
        "inference:\n  <<: *shared\n  batch_size: 2\n",
    )
    with pytest.raises(ConfigError, match="unknown key 'defaults'"):
        load_config(path, MINIMAL)  # the anchor's holder is a key like any other
    path = write(tmp_path, "inference:\n  <<: {batch_size: 4, dtype: float32}\n  batch_size: 2\n")
    config = load_config(path, MINIMAL)
    assert (config.inference.batch_size, config.inference.dtype) == (2, "float32")
    path = write(tmp_path, "inference:\n  ? [a, b]\n  : c\n")
    with pytest.raises(ConfigError, match="a key must be a name, not a list or mapping"):
        load_config(path, MINIMAL)


def test_a_section_left_empty_takes_its_defaults_and_overrides(tmp_path):
    path = write(tmp_path, "inference:\n  # batch_size: 8\nreport:\n")
    config = load_config(path, MINIMAL)
    assert config.inference == load_config(None, MINIMAL).inference
    assert load_config(path, [*MINIMAL, "inference.batch_size=3"]).inference.batch_size == 3
    with pytest.raises(ConfigError, match=r"missing key 'input\.uri'"):
        load_config(write(tmp_path, "input:\n"), ["output.uri=o", "models.depth=m"])


def test_no_extensions_at_all_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"key 'input\.extensions': .*at least one extension"):
        load_config(None, [*MINIMAL, "input.extensions=[]"])
    with pytest.raises(ConfigError, match=r"key 'input\.extensions': .*at least one extension"):
        load_config(None, [*MINIMAL, "input.extensions=' , '"])


def test_an_id_column_that_is_the_image_column_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"key 'input\.id_column': 'image' is input\.image_c"):
        load_config(None, [*MINIMAL, "input.id_column=image"])
    settings = ["input.image_column=jpeg", "input.id_column=jpeg"]
    with pytest.raises(ConfigError, match=r"key 'input\.id_column'"):
        load_config(None, [*MINIMAL, *settings])
