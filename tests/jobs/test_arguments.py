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
