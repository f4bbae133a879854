"""`python -m jobs.run` when the job is stopped: Ctrl-C, or SIGTERM from `ray job stop`."""

import os
import signal

import pytest

import jobs.run
import pipeline.run


def _main_raising(monkeypatch, tmp_path, stop: BaseException) -> int:
    def stopped(config):
        raise stop

    monkeypatch.setattr(pipeline.run, "run_annotation", stopped)
    settings = [f"input.uri={tmp_path}", f"output.uri={tmp_path}/out", "models.depth=org/dpt"]
    return jobs.run.main([f"--set={setting}" for setting in settings])


# Ctrl-C; and SIGTERM once ray.init has replaced our handler with its own.
@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(15)], ids=repr)
def test_a_stopped_job_says_how_to_go_on_and_exits_130(monkeypatch, tmp_path, capsys, stop):
    code = _main_raising(monkeypatch, tmp_path, stop)
    assert code == jobs.run.EXIT_STOPPED == 130
    message = capsys.readouterr().err.strip()
    assert message.startswith("stopped:") and "run the same command again" in message
    assert "Traceback" not in message


def test_an_exit_that_is_not_a_stop_goes_on_up(monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as raised:
        _main_raising(monkeypatch, tmp_path, SystemExit(3))
    assert raised.value.code == 3


def test_sigterm_stops_the_job_as_ctrl_c_does():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        jobs.run.stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)  # a point where the handler runs
    finally:
        signal.signal(signal.SIGTERM, previous)
