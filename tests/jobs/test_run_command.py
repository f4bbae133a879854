"""`python -m jobs.run` when the job is stopped: Ctrl-C, or SIGTERM from `ray job stop`."""

import os
import signal

import pytest

import jobs.run
import pipeline.run


def test_a_stopped_job_says_how_to_go_on_and_exits_130(monkeypatch, tmp_path, capsys):
    def stopped(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.run, "run_annotation", stopped)
    settings = [f"input.uri={tmp_path}", f"output.uri={tmp_path}/out", "models.depth=org/dpt"]
    code = jobs.run.main([f"--set={setting}" for setting in settings])
    assert code == jobs.run.EXIT_STOPPED == 130
    message = capsys.readouterr().err.strip()
    assert message.startswith("stopped:") and "run the same command again" in message
    assert "Traceback" not in message


def test_sigterm_stops_the_job_as_ctrl_c_does():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        jobs.run.stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)  # a point where the handler runs
    finally:
        signal.signal(signal.SIGTERM, previous)
