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


def test_a_url_in_backticks_keeps_its_closing_quote():
    # As botocore quotes an endpoint it refuses.
    message = "Custom endpoint `http://127.0.0.1:9/?X-Amz-Signature=0ab1` was not a valid URI"
    assert strip_url_secrets(message) == "Custom endpoint `http://127.0.0.1:9/` was not a valid URI"
    assert strip_url_secrets("`https://u:pw@host/x`") == "`https://host/x`"


def test_source_uris_drop_a_urls_whole_query_but_keep_question_marks_in_s3_keys():
    signed = "https://host/my file.jpg?AWSAccessKeyId=AKIA&Signature=abc&x-amz-security-token=t"
    assert source_uri_of(signed) == "https://host/my file.jpg"
    assert source_uri_of("HTTPS://u:pw@host/a.jpg#frag") == "HTTPS://host/a.jpg"
    assert source_uri_of("s3://bucket/q?a.jpg") != source_uri_of("s3://bucket/q?b.jpg")
    assert source_uri_of("s3://bucket/q?a.jpg") == "s3://bucket/q?a.jpg"


def test_signatures_go_also_from_urls_whose_paths_hold_spaces_or_quotes():
    query = "X-Amz-Credential=AKIAFAKE01%2F20261204&X-Amz-Signature=f00d&X-Amz-Security-Token=tok9"
    for text in [
        f"read: FileNotFoundError: http://127.0.0.1:9000/b/missing one.jpg?{query}",
        f"read: cannot open 'http://host/it's.jpg?{query}'",
        f'GET "/b/a b.jpg?{query}" 403',
        f"https://host/a.jpg?a=b c&{query}",
        "https://host/a.jpg?Signature=s3cr3t&AWSAccessKeyId=AKIAFAKE02 and more",
    ]:
        stripped = strip_url_secrets(text)
        for secret in ("AKIAFAKE", "f00d", "tok9", "s3cr3t"):
            assert secret not in stripped, stripped
    # What is not a credential stays: names, and S3 keys holding "?" or "key=".
    assert strip_url_secrets("s3://b/key=3/x.jpg") == "s3://b/key=3/x.jpg"
    assert strip_url_secrets("decode: missing one.jpg?") == "decode: missing one.jpg?"


def test_a_storage_problem_never_quotes_credentials_given_in_the_uri():
    from pipeline.schema import storage_problem

    uri = "s3://AKIAFAKE03:S3CR3T-xyz@bucket/images"
    error = ValueError('Invalid bucket name "AKIAFAKE03:S3CR3T-xyz@bucket": Bucket name must match')
    message = storage_problem("input.uri", uri, error)
    assert "AKIAFAKE03" not in message and "S3CR3T" not in message
    assert 'Invalid bucket name "bucket"' in message
