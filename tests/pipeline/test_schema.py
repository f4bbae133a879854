from pipeline.schema import error_reason, source_uri_of, strip_url_secrets


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


def test_a_password_holding_at_signs_is_removed_whole():
    assert strip_url_secrets("see https://user:p@ss@host/x.jpg") == "see https://host/x.jpg"


def test_source_uris_drop_a_urls_whole_query_but_keep_question_marks_in_s3_keys():
    signed = "https://host/my file.jpg?AWSAccessKeyId=AKIA&Signature=abc&x-amz-security-token=t"
    assert source_uri_of(signed) == "https://host/my file.jpg"
    assert source_uri_of("HTTPS://u:pw@host/a.jpg#frag") == "HTTPS://host/a.jpg"
    assert source_uri_of("s3://bucket/q?a.jpg") != source_uri_of("s3://bucket/q?b.jpg")
    assert source_uri_of("s3://bucket/q?a.jpg") == "s3://bucket/q?a.jpg"
