from pipeline.schema import error_reason


def test_error_reasons_drop_signatures_and_credentials():
    problem = PermissionError(
        "denied for https://bucket.s3.amazonaws.com/a.jpg?X-Amz-Signature=abc123&X-Amz-Credential=AKIA"
        " via s3://user:hunter2@bucket/a.jpg"
    )
    reason = error_reason("read", problem)
    assert reason.startswith(
        "read: PermissionError: denied for https://bucket.s3.amazonaws.com/a.jpg"
    )
    for secret in ("abc123", "AKIA", "hunter2", "Signature"):
        assert secret not in reason


def test_error_reasons_are_bounded():
    assert len(error_reason("decode", "x" * 10_000)) <= 300
