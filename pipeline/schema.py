"""The output contract: one Parquet row per input file, and error reasons."""

from __future__ import annotations

import re

import pyarrow as pa

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),  # after EXIF orientation
        pa.field("height", pa.int32()),
        pa.field("depth_uri", pa.string()),
        pa.field("depth_min", pa.float64()),
        pa.field("depth_max", pa.float64()),
        # "relative_inverse" (larger is nearer, scale and shift unknown) or "metric" (metres).
        pa.field("depth_kind", pa.string()),
        pa.field("segmentation_uri", pa.string()),
        pa.field("seg_labels", pa.list_(pa.int32())),
        pa.field("seg_confidence_mean", pa.float64()),
        # pseudo_labels.enabled only (null otherwise): share of pixels labelled at
        # pseudo_labels.min_confidence, mean normalised entropy, and whether the
        # image passes pseudo_labels.min_coverage.
        pa.field("label_coverage", pa.float64()),
        pa.field("entropy_mean", pa.float64()),
        pa.field("kept", pa.bool_()),
        pa.field("model_depth", pa.string()),
        pa.field("model_segmentation", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        # JSON object of a webdataset sample's side members ({"json": "...", "cls": "3"}).
        pa.field("source_metadata", pa.string()),
        # Provenance: what the row was computed from, so reruns know what changed.
        pa.field("source_version", pa.string()),  # ETag, or size+mtime; "" if unknown
        pa.field("config_hash", pa.string()),  # models' versions + settings that shape outputs
        pa.field("written_at", pa.timestamp("us", tz="UTC")),
    ]
)

# URLs end at white space or a quote: ' " and ` (botocore quotes with backticks).
_URL_QUERY = re.compile(r"(\w+://[^\s?'\"`]*)\?[^\s'\"`]*")
# Up to the last "@" before the host's "/": a password may hold "@".
_URL_USERINFO = re.compile(r"(\w+://)[^/\s'\"`]*@")
# Query parameters that carry a credential or a signature (S3's SigV4 and V2,
# Google Cloud Storage, Azure SAS, API keys), wherever they are: a URL whose path
# holds a space or a quote is not matched whole by _URL_QUERY.
_SECRET_PARAM = re.compile(
    r"(?i)([?&;](?:x-amz-signature|x-amz-credential|x-amz-security-token|awsaccesskeyid"
    r"|signature|x-goog-signature|x-goog-credential|googleaccessid|sig|token|access_token"
    r"|api_key|apikey|key|password|secret|client_secret)=)[^&\s'\"`#]*"
)
_MAX_REASON_CHARS = 300


def schema_for(columns: list[str]) -> pa.Schema:
    """The part of :data:`PREDICTION_SCHEMA` that ``columns`` name, in their order."""
    return pa.schema([PREDICTION_SCHEMA.field(name) for name in columns])


def uri_userinfo(uri: str) -> str:
    """What stands before the last "@" of a URI's authority ("user:secret" of
    ``s3://user:secret@bucket/k``); "" where there is none."""
    authority = uri.partition("//")[2].split("/", 1)[0]
    return authority.rpartition("@")[0]


def strip_url_secrets(text: str) -> str:
    """Remove URL query strings (presigned signatures), userinfo (user:password@), and
    the values of credential parameters wherever they stand."""
    text = _SECRET_PARAM.sub(r"\1…", text)
    return _URL_USERINFO.sub(r"\1", _URL_QUERY.sub(r"\1", text))


def source_uri_of(uri: str) -> str:
    """The URI to record for an object fetched from ``uri``: without credentials.

    An HTTP(S) URL loses its whole query (a presigned URL's signature, which
    also changes at every signing), spaces or not; other URIs keep theirs, as
    ``?`` is an ordinary character of an S3 key.
    """
    if uri[:8].lower().startswith(("http://", "https://")):
        uri = uri.split("?", 1)[0].split("#", 1)[0]
    return _URL_USERINFO.sub(r"\1", uri)


def error_reason(stage: str, error: BaseException | str) -> str:
    """``"<stage>: <Type>: <message>"``, with URL secrets removed, at most 300 characters."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return f"{stage}: {strip_url_secrets(text)}"[:_MAX_REASON_CHARS]


def reason_group(reason: str) -> str:
    """'decode: truncated or corrupt image data: …' → 'decode: truncated or corrupt image data'.

    The stage and the kind of failure, without the per-image detail: what error
    counts are grouped by in the run summary, the report and metrics. Quoted
    names and numbers inside it become '…' and N ("read: id 'a7' repeats row 3's"
    → "read: id '…' repeats row N's"), so one kind of failure is one group,
    whatever the ids, sizes or addresses it names.
    """
    # Quotes first: a quoted id may hold a ":" (column 'a:b').
    general = _QUOTED.sub(lambda quoted: f"{quoted[0][0]}…{quoted[0][0]}", reason)
    group = ":".join(general.split(":")[:2]).strip()
    if group.count("(") > group.count(")"):  # cut inside "(extensions found: json)"
        group = group[: group.rindex("(")].rstrip()
    return _NUMBER.sub("N", group)


# Quotes, not apostrophes: a quote mark that follows a letter or digit (image's,
# can't, row 3's) opens nothing, nor closes where one follows.
_QUOTED = re.compile(r"(?<!\w)'[^']*'(?!\w)|\"[^\"]*\"")
_NUMBER = re.compile(r"\b0x[0-9a-fA-F]+|\d+")


_STORAGE_HINTS = (
    ("credentials", "set AWS credentials (environment variables, a profile or an instance role)"),
    ("NoSuchBucket", "check the bucket name"),
    ("AccessDenied", "the credentials in use may not read or write there"),
    ("Forbidden", "the credentials in use may not read or write there"),
    ("Could not connect", "check {endpoint} and the network"),
    ("Connect timeout", "check {endpoint} and the network"),
)
# Where a job's user sets the S3 endpoint; the commands that read an output take a flag.
ENDPOINT_SETTING = "storage.endpoint_url"


def storage_problem(
    key: str, uri: str, error: BaseException, endpoint_setting: str = ENDPOINT_SETTING
) -> str:
    """One message for a storage failure before the job starts: what, where, likely fix."""
    reason = error_reason(key, error).removeprefix(f"{key}: ")  # the key leads already
    # A client may quote the URI's bucket without its scheme ("Invalid bucket
    # name \"KEY:SECRET@bucket\""), out of reach of strip_url_secrets.
    if userinfo := uri_userinfo(uri):
        reason = reason.replace(f"{userinfo}@", "")
    hint = next((fix for marker, fix in _STORAGE_HINTS if marker in reason), None)
    hint = hint and hint.format(endpoint=endpoint_setting)
    where = strip_url_secrets(uri)
    return f"cannot reach {key} {where}: {reason}" + (f" ({hint})" if hint else "")
