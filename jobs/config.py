"""The job config: one declared, validated object.

Layers, lowest first: defaults declared here, a YAML file holding only what
differs, then ``--set dotted.key=value`` overrides. Validation runs before Ray
starts; every problem is reported once, naming the key and the fix.
"""

from __future__ import annotations

import argparse
import codecs
import datetime
import difflib
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.decode import LARGEST_IMAGE_PIXELS, LARGEST_SIDE_PX
from pipeline.schema import uri_userinfo

# Keys whose values are never written to logs or run reports.
_SECRET_KEY_PATTERN = re.compile(r"(secret|token|password|credential|access_key|session)", re.I)
DEFAULT_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


class ConfigError(ValueError):
    """A config problem, phrased for the person who wrote the config.

    A value echoed back loses its URL credentials (``user:password@``, a query):
    the message goes to the job's log.
    """

    def __init__(self, message: str) -> None:
        from pipeline.schema import strip_url_secrets  # imported here: pipeline imports us

        super().__init__(strip_url_secrets(message))


def _no_credentials_in_bucket(uri: str | None) -> str | None:
    """Refuse ``s3://KEY:SECRET@bucket/…``: no such bucket exists, and the client's
    error would quote the whole "bucket", credentials and all, without its
    ``s3://`` (which the redaction of messages looks for). ``user@`` alone is
    a name, not a secret: ``abfs://container@account.dfs.core.windows.net``."""
    if uri is None:
        return uri
    scheme, separator, _ = uri.partition("://")
    if separator and scheme.lower() not in ("http", "https") and ":" in uri_userinfo(uri):
        raise _credentials_refused("bucket")
    return uri


def _credentials_refused(before: str) -> ValueError:
    return ValueError(
        f"credentials in a URI are not read (user:secret@ before the {before}); "
        "give them through the environment, a profile or an instance role"
    )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads true/yes as a boolean, which pydantic would take as 1.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation is not bool and bool not in get_args(annotation):
            raise ValueError("a number or name is expected, not true/false")
        return value


InputFormat = Literal["auto", "files", "webdataset", "parquet", "manifest"]


class InputConfig(_Section):
    uri: str = Field(description="Folder, bucket prefix or single shard/manifest file.")
    _uri_without_credentials = field_validator("uri")(_no_credentials_in_bucket)
    format: InputFormat = Field(
        default="auto",
        description="files: image objects; webdataset: .tar shards; parquet: image-bytes "
        "column; manifest: text or Parquet list of URIs; auto: picked from what uri holds.",
    )
    extensions: tuple[str, ...] = DEFAULT_IMAGE_EXTENSIONS

    @field_validator("extensions", mode="before")
    @classmethod
    def _words_of_a_string(cls, extensions: Any) -> Any:
        # `--set input.extensions=jpg,png` (or "jpg png", or one "jpg") as a list.
        if isinstance(extensions, str):
            return tuple(extensions.replace(",", " ").split())
        return extensions

    @field_validator("extensions")
    @classmethod
    def _lower_case_without_dots(cls, extensions: tuple[str, ...]) -> tuple[str, ...]:
        if not extensions:
            raise ValueError("give at least one extension: with none, nothing is annotated")
        return tuple(extension.lower().lstrip(".") for extension in extensions)

    limit: int | None = Field(
        default=None, ge=1, description="Annotate only the first N images (smoke runs)."
    )
    image_column: str = Field(
        default="image", description="parquet: column of encoded image bytes."
    )
    id_column: str | None = Field(
        default=None, description="parquet: column of per-row ids; None uses the row number."
    )
    uri_column: str = Field(default="uri", description="Parquet manifest: column of URIs.")
    version_column: str | None = Field(
        default=None,
        description="Parquet manifest: column whose value changes when the image does (an "
        "ETag, checksum or modification time); an image whose value changed is annotated "
        "again. None: entries are taken as immutable.",
    )

    @field_validator("version_column")
    @classmethod
    def _not_the_uri_column(cls, version_column: str | None, info: ValidationInfo) -> str | None:
        if version_column is not None and version_column == info.data.get("uri_column"):
            raise ValueError(
                f"{version_column!r} is input.uri_column too: a version changes with the "
                "image, not with its URI"
            )
        return version_column

    @field_validator("id_column")
    @classmethod
    def _not_the_image_column(cls, id_column: str | None, info: ValidationInfo) -> str | None:
        if id_column is not None and id_column == info.data.get("image_column"):
            raise ValueError(
                f"{id_column!r} is input.image_column too: ids come from a column of their own"
            )
        return id_column

    # Measured (docs/benchmarks.md, listing): a million keys behind 100 ms a
    # page list 2.8x faster with 8 requests at once, what one core parses.
    # botocore's pool holds 10 connections.
    list_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=10,
        description="S3 list requests at once on a large prefix (its key ranges, handed on "
        "in key order); 1 lists page after page; null: 8 on AWS S3, 1 on other endpoints "
        "(set it only where the store lists keys in UTF-8 byte order).",
    )


class OutputConfig(_Section):
    uri: str = Field(description="Folder or bucket prefix that receives the results.")
    _uri_without_credentials = field_validator("uri")(_no_credentials_in_bucket)
    # Measured on 2 cores: level 1 encodes several times faster than Pillow's
    # default 6 for a few percent more bytes on depth maps.
    png_compress_level: int = Field(default=1, ge=0, le=9)
    # Measured (docs/benchmarks.md): at the image's size a 16-bit depth PNG of
    # an 8 MP photo takes ~0.3 s to encode and ~9 MB; at the model's it is ~10 ms.
    depth_resolution: Literal["model", "original"] = Field(
        default="model",
        description="model: depth maps at the network's output size (the image's size is "
        "in the Parquet's width/height); original: upsampled to the image's size.",
    )
    depth_format: Literal["png16", "npz_float16"] = Field(
        default="png16",
        description="png16: 16-bit PNG quantised over each map's range (viewable); "
        "npz_float16: the model's values rounded to float16 in a numpy .npz.",
    )
    overwrite: bool = Field(
        default=False, description="Delete results earlier runs left at output.uri first."
    )
    # A crash loses at most the rows not yet in a part (their map files are
    # rewritten on resume); 1000 rows is a part every few seconds on a GPU node.
    rows_per_part: int = Field(default=1000, ge=1, description="Rows per Parquet part file.")


class ModelsConfig(_Section):
    depth: str | None = Field(default=None, description="Hub id, local dir or fsspec URI.")
    segmentation: str | None = None
    _uris_without_credentials = field_validator("depth", "segmentation")(_no_credentials_in_bucket)
    depth_kind: Literal["auto", "relative_inverse", "metric"] = Field(
        default="auto",
        description="What the depth model predicts, recorded per row: auto reads it from "
        "the checkpoint (metric only where its config says depth_estimation_type: metric).",
    )
    cache_dir: str | None = Field(
        default=None, description="Local cache for checkpoints fetched from object storage."
    )


class InferenceConfig(_Section):
    batch_size: int | Literal["auto"] = Field(
        default=8,
        description="Images per forward pass, or auto: the largest power of two up to "
        "max_batch_size that fits in 80 % of GPU memory (CUDA) or batch_time_budget_s (CPU), "
        "found by each actor at start.",
    )
    max_batch_size: int = Field(
        default=64, ge=1, description="batch_size auto: the largest batch tried."
    )
    batch_time_budget_s: float = Field(
        default=2.0, gt=0, description="batch_size auto on CPU: longest forward pass allowed."
    )

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, batch_size: int | str) -> int | str:
        if isinstance(batch_size, int) and batch_size < 1:
            raise ValueError("must be a positive number of images or 'auto'")
        return batch_size

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    flip_tta: bool = Field(
        default=False,
        description="Test-time augmentation: average depth and segmentation logits with "
        "those of the mirrored image (two forward passes per batch).",
    )
    segmentation_scales: tuple[float, ...] = Field(
        default=(1.0,),
        min_length=1,
        description="Multi-scale test-time augmentation for segmentation: logits at each "
        "scale of the model input (e.g. [0.75, 1.0, 1.25]) averaged; one pass per scale.",
    )

    @field_validator("segmentation_scales")
    @classmethod
    def _positive_scales(cls, scales: tuple[float, ...]) -> tuple[float, ...]:
        if not all(0 < scale < float("inf") for scale in scales):  # NaN fails too
            raise ValueError("scales must be positive numbers")
        return scales

    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int | Literal["all"] | None = Field(
        default=None,
        description="CPU inference only: torch threads per actor; all: the node's cores "
        "(one machine, one actor). Default: resources.cpus_per_actor rounded up (Ray "
        "would otherwise give an actor one).",
    )

    @field_validator("cpu_threads")
    @classmethod
    def _positive_threads(cls, threads: int | str | None) -> int | str | None:
        if isinstance(threads, int) and threads < 1:
            raise ValueError("must be a positive number of threads, 'all' or null")
        return threads


class ActorsConfig(_Section):
    min: int = Field(default=1, ge=1)
    max: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _min_not_above_max(self) -> ActorsConfig:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class ResourcesConfig(_Section):
    actors: ActorsConfig = ActorsConfig()
    gpus_per_actor: float = Field(default=0, ge=0)
    cpus_per_actor: float = Field(default=1, gt=0)
    cpus_per_decode_task: float = Field(default=1, gt=0)
    memory_per_actor_gb: float | None = Field(
        default=None,
        gt=0,
        description="Memory (GiB) Ray reserves for each inference actor (weights, a batch's "
        "activations and maps); actors are then placed, and the cluster checked, by it "
        "too. Default: no reservation.",
    )


class DecodeConfig(_Section):
    # Pillow's own decompression-bomb limit; larger images become error rows
    # after reading only their header.
    max_image_pixels: int = Field(default=89_478_485, ge=1, le=LARGEST_IMAGE_PIXELS)
    max_side_px: int = Field(default=16_384, ge=1, le=LARGEST_SIDE_PX)
    max_image_bytes: int = Field(
        default=256 * 2**20,
        ge=1,
        description="Larger files (and shard members) are error rows, fetched no further "
        "than the limit where the store honours ranged reads (S3, most HTTP servers): a "
        "stray video or archive named .jpg cannot exhaust a read task's memory.",
    )
    jpeg_draft: bool = Field(
        default=True,
        description="Decode JPEGs much larger than the model input at 1/2-1/8 scale "
        "(several times faster; model inputs within a mean of 0.5 levels of a full decode).",
    )


class PseudoLabelsConfig(_Section):
    """Segmentation maps as training targets: uncertain pixels ignored, weak images flagged."""

    enabled: bool = Field(
        default=False,
        description="Add label_coverage, entropy_mean and kept to every row, and mark "
        "uncertain pixels 255 (ignore) in segmentation maps.",
    )
    min_confidence: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Pixels whose max softmax probability is below this get class 255 (ignore).",
    )
    min_coverage: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Images with a smaller share of labelled pixels are kept=false "
        "(written, not dropped).",
    )


class ReportConfig(_Section):
    """``<output>/report/index.html``, rebuilt after every run."""

    enabled: bool = Field(default=True, description="Write the quality report after each run.")
    samples: int = Field(
        default=24, ge=0, le=500, description="Images shown with their maps in the report's grid."
    )
    thumbnail_px: int = Field(
        default=192, ge=32, le=1024, description="Longest side of each thumbnail, in pixels."
    )


class StorageConfig(_Section):
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, Ceph, R2); None for AWS."
    )
    region: str | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_without_credentials(cls, url: str | None) -> str | None:
        # botocore refuses it with a message about an AUTHORIZATION header, and
        # the URL would reach the run record: keys go by the credential chain.
        if url is not None and uri_userinfo(url if "://" in url else f"//{url}"):
            raise _credentials_refused("host")
        return url

    anon: bool = Field(default=False, description="Anonymous access for public buckets.")
    # botocore's standard retry mode, per request, before our own retries of
    # reads and writes: throttling and 5xx on a busy bucket are routine.
    max_attempts: int = Field(default=10, ge=1, description="S3 attempts per request.")
    # Without a read timeout a request to a wedged endpoint can wait forever.
    timeout_s: float = Field(default=60, gt=0, description="S3 connect/read timeout per request.")


class JobConfig(_Section):
    input: InputConfig
    output: OutputConfig
    models: ModelsConfig = ModelsConfig()
    inference: InferenceConfig = InferenceConfig()
    resources: ResourcesConfig = ResourcesConfig()
    decode: DecodeConfig = DecodeConfig()
    pseudo_labels: PseudoLabelsConfig = PseudoLabelsConfig()
    report: ReportConfig = ReportConfig()
    storage: StorageConfig = StorageConfig()
    run_id: str | None = Field(
        default=None,
        # It names files under _runs/: nothing that could leave that folder.
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Letters, digits, '.', '_' and '-'. Defaults to a timestamped id.",
    )
    stall_timeout_s: float | None = Field(
        default=1800,
        gt=0,
        description="Stop the run when no batch finishes for this long (a hung actor); "
        "null waits forever. Covers the first batch too, weights download included.",
    )
    mode: Literal["incremental", "force"] = Field(
        default="incremental",
        description="incremental: skip images already annotated with the same models and "
        "settings (resumes a crashed run; annotates only new or changed objects); "
        "force: annotate everything again.",
    )

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_take_defaults(cls, data: Any) -> Any:
        # A section whose keys are all commented out is null in YAML: it means
        # "the defaults", as an empty section does.
        if isinstance(data, dict):
            return {
                key: value
                for key, value in data.items()
                if value is not None or _section(JobConfig, str(key)) is None
            }
        return data

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.models.depth is None and self.models.segmentation is None:
            raise ValueError("models.depth and models.segmentation are both null; set at least one")
        if self.pseudo_labels.enabled and self.models.segmentation is None:
            raise ValueError(
                "pseudo_labels.enabled needs models.segmentation: pseudo-labels are "
                "segmentation maps with uncertain pixels left out"
            )
        if self.inference.device == "cuda" and self.resources.gpus_per_actor == 0:
            raise ValueError(
                "inference.device is 'cuda' but resources.gpus_per_actor is 0; "
                "set resources.gpus_per_actor (e.g. 1) or inference.device: auto"
            )
        if self.inference.device == "cpu" and self.resources.gpus_per_actor > 0:
            raise ValueError(
                "inference.device is 'cpu' but resources.gpus_per_actor > 0 would hold GPUs "
                "idle; set resources.gpus_per_actor: 0 or inference.device: auto"
            )
        return self

    @property
    def device(self) -> str:
        if self.inference.device != "auto":
            return self.inference.device
        return "cuda" if self.resources.gpus_per_actor > 0 else "cpu"

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for s3:// URIs (other protocols ignore them)."""
        options: dict[str, Any] = {}
        if self.storage.anon:
            options["anon"] = True
        options["config_kwargs"] = {
            "retries": {"max_attempts": self.storage.max_attempts, "mode": "standard"},
            "connect_timeout": self.storage.timeout_s,
            "read_timeout": self.storage.timeout_s,
        }
        client_kwargs = {}
        if self.storage.endpoint_url:
            client_kwargs["endpoint_url"] = self.storage.endpoint_url
        if self.storage.region:
            client_kwargs["region_name"] = self.storage.region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return options

    def redacted(self) -> dict[str, Any]:
        """The resolved config as plain data, with any secret-looking value removed."""
        return _redact(self.model_dump(mode="json"))


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: "<redacted>" if _SECRET_KEY_PATTERN.search(key) and item else _redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_redact(item) for item in value]
    if isinstance(value, str):
        # A URI's userinfo (https://user:pass@host) and query (a presigned
        # URL's signature) are credentials too. Imported here: pipeline imports
        # this module.
        from pipeline.schema import strip_url_secrets

        return strip_url_secrets(value)
    return value


def add_override_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``, for :func:`load_config`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one config key, e.g. --set {example} (repeatable)",
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value parsed as YAML, so 8 is an int and null is None)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw_value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: {key!r} is not a dotted key")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        value = raw_value
    # run_id=20240101 or output.uri=2024-01-01 mean text where the key takes
    # text; YAML would make them a number or a date (and 0123 octal 83).
    # (bool is an int: yes/on/off, YAML 1.1's booleans, are names too.)
    if isinstance(value, (int, float, datetime.date)) and _takes_text(parts):
        value = raw_value.strip()
    return parts, value


def _takes_text(parts: list[str]) -> bool:
    """Whether the config key at ``parts`` is a string (or optional string) field."""
    model: type[BaseModel] = JobConfig
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if depth == len(parts) - 1:
            return field.annotation in (str, str | None)
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return False
        model = field.annotation
    return False


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:  # absent, or a section left empty in the YAML
            child = node[part] = {}
        if not isinstance(child, dict):
            dotted = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {'.'.join(parts)}: {dotted} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read YAML (optional), apply ``--set`` overrides and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.load(_config_text(path), Loader=_UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as error:
            message = f"config file {path} is not valid YAML: {_yaml_problem(error)}"
            raise ConfigError(message) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    for override in overrides or []:
        apply_override(data, *parse_override(override))
    return validate_config(data)


def _config_text(path: Path) -> str:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror}") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # What PowerShell's ">" writes.
        raise ConfigError(f"config file {path} is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {error.start}, line {line}); "
            "save it as UTF-8"
        ) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong and where, without PyYAML's quote of the line: it may hold a
    secret (an endpoint URL with a password), and the line number finds it."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return str(error)
    mark = error.problem_mark or error.context_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    problem = error.problem or error.context or "cannot be read"
    context = f"{error.context}: " if error.context and error.problem else ""
    return f"{context}{problem}{where}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *defaults": keys given here override the merged ones
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a name, not a list or mapping", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def validate_config(data: dict[str, Any]) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def _describe(error: ValidationError) -> str:
    lines = []
    # A value that fits no member of a union (int or "auto") fails once per
    # member, each under the member's name: one line per key, reasons joined.
    unfit: dict[str, tuple[list[str], Any]] = {}
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"])
        kind = problem["type"]
        if kind == "extra_forbidden":
            lines.append(f"unknown key '{location}'{_suggestion(problem['loc'])}")
        elif kind == "missing":
            lines.append(f"missing key '{_required_key(problem['loc'])}': it is required")
        else:
            reasons, _ = unfit.setdefault(_key_of(problem["loc"]), ([], problem.get("input")))
            # Our own validators' messages, without pydantic's "Value error, ".
            reason = problem["msg"].removeprefix("Value error, ")
            if reason not in reasons:
                reasons.append(reason)
    for key, (reasons, given) in unfit.items():
        where = f"key '{key}'" if key else "config"
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"{where}: {'; or '.join(reasons)}{shown}")
    return "invalid job config:\n  " + "\n  ".join(lines)


def _key_of(location: tuple[Any, ...]) -> str:
    """The config key a validation error is about, without pydantic's union member names."""
    model: Any = JobConfig
    parts = []
    for part in location:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            if isinstance(part, int) and parts:  # an item of a list
                parts[-1] = f"{parts[-1]}[{part}]"
                continue
            break
        parts.append(str(part))
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) else None
    return ".".join(parts)


def _section(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The model of section ``key`` of ``model``; None where ``key`` holds a value."""
    field = model.model_fields.get(key) if model else None
    annotation = getattr(field, "annotation", None)
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _required_key(location: tuple[Any, ...]) -> str:
    """The dotted key a user must set: a missing section names its first required
    key (``output`` → ``output.uri``), which is what a ``--set`` gives."""
    parts = [str(part) for part in location]
    model: type[BaseModel] | None = JobConfig
    for part in parts:
        model = _section(model, part)
    while model is not None:
        required = [name for name, field in model.model_fields.items() if field.is_required()]
        if not required:
            break
        parts.append(required[0])
        model = _section(model, required[0])
    return ".".join(parts)


def _suggestion(location: tuple[Any, ...]) -> str:
    model: type[BaseModel] | None = JobConfig
    for part in location[:-1]:
        model = _section(model, str(part))
        if model is None:
            return ""
    known = sorted(model.model_fields)
    close = difflib.get_close_matches(str(location[-1]), known, n=1)
    # The whole key, as the user would write it in --set.
    section = "".join(f"{part}." for part in location[:-1])
    hint = f"; did you mean '{section}{close[0]}'?" if close else ""
    return f"{hint} (known keys here: {', '.join(known)})"
