"""What the commands that read an output share: the check that it can be read."""

from jobs.arguments import output_problem
from tests.s3_server import free_port


def test_an_unreachable_endpoint_names_the_flag_that_sets_it(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, message = output_problem("s3://bucket/out", {"client_kwargs": {"endpoint_url": endpoint}})
    assert code == 1
    assert message.startswith("cannot reach output s3://bucket/out: ")
    assert message.endswith("(check --endpoint-url and the network)")


def test_an_output_in_a_bucket_that_does_not_exist_says_so(s3_endpoint):
    from pipeline.storage import filesystem_for

    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    code, message = output_problem("s3://no-such-bucket/annotations", options)
    assert code == 2
    assert message == (
        "no predictions under s3://no-such-bucket/annotations (bucket no-such-bucket does "
        "not exist, or these credentials cannot see it)"
    )
    fs, _ = filesystem_for("s3://empty-output", options)
    fs.mkdir("empty-output")
    assert output_problem("s3://empty-output/annotations", options) == (
        2,
        "no predictions under s3://empty-output/annotations",
    )
