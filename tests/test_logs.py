"""Console logging: bare lines, warnings and errors on stderr with their prefix, rank 0 only under DDP."""

import logging

from pipeline import distributed

log = logging.getLogger("pipeline.test_logs")


def test_console_lines_are_bare_and_warnings_and_errors_go_to_stderr_with_their_prefix(capsys):
    log.info("plan from 8 training cases")
    log.warning("careful")
    log.error("/data/x.nii.gz: unreadable")
    out, err = capsys.readouterr()
    assert out == "plan from 8 training cases\n"
    assert err == "warning: careful\nerror: /data/x.nii.gz: unreadable\n"


def test_ranks_other_than_zero_log_errors_only(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    log.info("epoch   1  loss 0.5")
    log.warning("careful")
    log.error("rank 1 failed")
    out, err = capsys.readouterr()
    assert out == "" and err == "error: rank 1 failed\n"
