"""benchmarks/device_check.py without a GPU: its dry run sets every check up and fits the time budget; a check past
its time limit becomes a failed row and the run goes on; rows reach $OUT as they are measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
try:
    import device_check
finally:
    sys.path.pop(0)


def test_dry_run_sets_every_check_up_within_the_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    env["OUT"] = str(tmp_path)
    command = [sys.executable, "benchmarks/device_check.py", "--dry-run"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    assert "wall clock at most" in result.stdout and ", 0 failed in" in result.stdout
    rows = json.loads((tmp_path / "device_check.json").read_text())["rows"]
    checks = {row["check"] for row in rows}
    assert checks == {"tests", "sanitizer", "engine", "ceilings", "attention", "kernels", "steps"}
    assert all(row["passed"] is not False for row in rows)
    selected = sum(int(row["note"].split()[0]) for row in rows if row["check"] == "tests")
    assert selected >= 100, "the CUDA-only rows of tests/kernels were not selected"
    engine = [row for row in rows if row["check"] == "engine"]
    assert len(engine) == 1 + len(device_check.ENGINE_MODES) and all(row["passed"] for row in engine)
    steps = [row for row in rows if row["check"] == "steps"]
    assert len(steps) == 11  # one per default graph bucket


def test_budgets_fit_five_minutes():
    background = max(device_check.BUDGETS["tests"], device_check.BUDGETS["sanitizer"])
    foreground = sum(device_check.BUDGETS[name] for name in device_check.FOREGROUND)
    timings = sum(device_check.BUDGETS[name] for name in device_check.TIMINGS)
    assert max(background, foreground) + timings <= device_check.WALL_BUDGET <= 300
    assert set(device_check.BUDGETS) == {"tests", "sanitizer", *device_check.FOREGROUND, *device_check.TIMINGS}


def test_a_check_over_its_limit_becomes_a_failed_row_and_rows_reach_out(tmp_path, monkeypatch, capsys):
    def slow(ctx):
        yield device_check.Row("slow", "first row", passed=True)
        time.sleep(5)
        yield device_check.Row("slow", "never reached", passed=True)

    monkeypatch.setitem(device_check.BUDGETS, "slow", 0.3)
    report = device_check.Report(str(tmp_path), {"device": "test"})
    started = time.perf_counter()
    device_check.run_check(report, device_check.Context("cpu", dry_run=True), "slow", slow)
    assert time.perf_counter() - started < 3
    assert [(r.name, r.passed) for r in report.rows] == [("first row", True), ("(the rest of this check)", False)]
    assert "limit" in report.rows[1].note
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert [row["name"] for row in saved["rows"]] == ["first row", "(the rest of this check)"]
    assert "first row" in capsys.readouterr().out


@pytest.mark.parametrize("failures, returncode, passed", [(0, 0, True), (1, 1, False)])
def test_pytest_rows_from_junit_reports(tmp_path, failures, returncode, passed):
    case = '<testcase name="test_a[bf16]"/>' + ('<testcase name="test_b[fp16]"><failure/></testcase>' * failures)
    xml = (f'<testsuites><testsuite tests="{1 + failures + 2}" failures="{failures}" errors="0" skipped="2" '
           f'time="1.5">{case}</testsuite></testsuites>')  # fmt: skip
    (tmp_path / "tests-test_x.py.xml").write_text(xml)
    run = object.__new__(device_check.PytestRun)
    run.check, run.tmp = "tests", tmp_path
    row = run._row("test_x.py", returncode)
    assert row.passed is passed and row.seconds == 1.5
    assert ("test_b[fp16]" in row.note) is (failures > 0) and "2 skipped" in row.note
