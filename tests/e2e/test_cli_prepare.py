"""The `st` command line as a user runs it."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys


def test_sample_data_then_prepare_prints_buckets_and_reruns_up_to_date(cli, tmp_path):
    result = cli("sample-data", tmp_path / "data", "--images", "12")
    assert result.exit_code == 0, result.output
    first = cli("prepare", "--config", tmp_path / "data" / "config.json", "--output", tmp_path / "prepare")
    assert first.exit_code == 0, first.output
    assert "128x128" in first.stdout and "total" in first.stdout and "wrote" in first.stdout
    manifest = json.loads((tmp_path / "prepare" / "manifest.json").read_text())
    assert sum(manifest["buckets"].values()) == 12
    second = cli("prepare", "--config", tmp_path / "data" / "config.json", "--output", tmp_path / "prepare")
    assert second.exit_code == 0
    assert "up to date" in second.stdout


def test_config_error_exits_2_with_one_clear_line(cli, tmp_path):
    cli("sample-data", tmp_path / "data", "--images", "4")
    result = cli("prepare", "-c", tmp_path / "data" / "config.json", "-o", tmp_path / "out", "--set", "resolutoin=512")
    assert result.exit_code == 2
    assert "unknown option 'resolutoin'; did you mean 'resolution'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_stage_without_its_input_exits_2_naming_it(cli, tmp_path):
    cli("sample-data", tmp_path / "data", "--images", "4")
    result = cli("publish", "-c", tmp_path / "data" / "config.json", "-i", tmp_path / "missing", "-o", tmp_path / "o")
    assert result.exit_code == 2
    assert "missing" in result.stderr and "Traceback" not in result.stderr


def test_console_script_runs_without_traceback_on_bad_input(tmp_path):
    """A real process: exit code 2 and a one-line message for a missing config file."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "prepare", "-c", str(tmp_path / "missing.json"), "-o", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "missing.json does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_log_lines_print_above_the_progress_bar_and_an_empty_bar_is_not_shown(monkeypatch):
    """On a terminal a log line clears the bar, takes a line of its own, and the bar is drawn again below it."""
    from pipeline.log import configure, get_logger
    from pipeline.progress import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    configure()
    assert progress_bar(total=0, desc="nothing").disable
    with progress_bar(total=2, desc="cache") as bar:
        bar.update(1)
        get_logger("cache").info("a log line")
        bar.update(1)
    text = terminal.getvalue()
    assert re.search(r"\r +\ra log line\n", text), repr(text)
    assert text.index("a log line") < text.rindex("\rcache: ") and "nothing" not in text
