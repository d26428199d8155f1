"""Command-line input the simulator and the benches must refuse with one usage line before they
start anything: NaN, infinite, zero or negative numbers, logs that cannot give a result, unknown
model names and output paths that cannot be written. Each was accepted and then failed with a
traceback after a stack had started, or printed an empty or meaningless result with exit 0.

The commands run through the real CLI (click's runner) with the test broker and Redis in their
environment; a refusal must come from the option or the input itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from streamrec.app import freshness
from streamrec.app.cli import cli
from streamrec.app.probe import probe_freshness
from streamrec.app.query_load import Queries
from tests.conftest import settings_env

T0 = 1_700_000_000


def invoke(settings, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=settings_env(settings))


def assert_usage_error(result: Result, *fragments: str) -> None:
    """Exit 2 (click's usage error) with one `Error:` line naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


@pytest.fixture
def timed_log(tmp_path: Path) -> Path:
    """A csv log of 40 events of 8 users on 6 items, with times."""
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"u{n % 8},i{n % 6},{T0 + n}\n" for n in range(40)))
    return path


@pytest.fixture
def untimed_log(tmp_path: Path) -> Path:
    path = tmp_path / "plays.csv"
    path.write_text("user_id,item_id\n" + "".join(f"u{n % 8},i{n % 6}\n" for n in range(40)))
    return path


# ---------------------------------------------------------------- simulate
@pytest.mark.parametrize("args", [["--limit", "10"], ["--limit", "5"], ["--chunk", "40"], ["--chunk", "100"]])
def test_simulate_refuses_a_log_of_one_chunk(settings, timed_log, args) -> None:
    """Users are asked before every chunk but the first: `--limit 10` (chunks of 10) started the
    stack, asked nothing, then failed reading serving's counters (ConnectError)."""
    result = invoke(settings, "simulate", "--data", str(timed_log), "--format", "csv", *args, "--json")
    assert_usage_error(result, "needs more than one chunk")


def test_simulate_refuses_a_log_without_timestamps(settings, untimed_log) -> None:
    """Row positions became times (0, 1, 2: 1970), every event was refused 11 s after the stack started."""
    result = invoke(settings, "simulate", "--data", str(untimed_log), "--format", "csv", "--json")
    assert_usage_error(result, f"cannot read {untimed_log} as csv", "no timestamp column")


def test_simulate_refuses_a_folder_without_its_log(settings, tmp_path) -> None:
    """An ml-100k folder without u.data was a FileNotFoundError traceback."""
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.item").write_text("1|Toy Story|01-Jan-1995||x|0|0\n")
    result = invoke(settings, "simulate", "--data", str(folder), "--json")
    assert_usage_error(result, f"cannot read {folder} as ml-100k")


# ---------------------------------------------------------------- bench freshness
@pytest.mark.parametrize(("args", "fragment"), [
    (["--trials", "-3"], "--trials"),
    (["--trials", "0"], "--trials"),
    (["--replay-rate", "nan"], "--replay-rate"),
    (["--replay-rate", "inf"], "--replay-rate"),
    (["--replay-rate", "-100"], "--replay-rate"),
    (["--replay-rate", "0.001"], "plans no event"),  # 0.06 events in 60 s: no replay, reported as a rate
    (["--replay-seconds", "0"], "--replay-seconds"),
    (["--replay-seconds", "nan"], "--replay-seconds"),
    (["--spread", "-5"], "--spread"),
    (["--spread", "inf"], "--spread"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--poll", "0"], "--poll"),
    (["--poll", "nan"], "--poll"),
])
def test_bench_freshness_refuses_numbers_before_any_stack(settings, timed_log, args, fragment) -> None:
    result = invoke(settings, "bench", "freshness", "--data", str(timed_log), "--format", "csv", *args, "--json")
    assert_usage_error(result, fragment)


def test_bench_freshness_refuses_a_log_without_timestamps(settings, untimed_log) -> None:
    result = invoke(settings, "bench", "freshness", "--data", str(untimed_log), "--format", "csv", "--json")
    assert_usage_error(result, "no timestamp column")


def test_a_replay_plan_is_events_or_an_error() -> None:
    assert freshness.planned_events(0.0, 60.0) == 0 and freshness.planned_events(20_000, 60.0) == 1_200_000
    for rate, seconds in ((0.001, 60.0), (float("nan"), 60.0), (-1.0, 60.0), (float("inf"), 60.0), (10.0, 0.0)):
        with pytest.raises(ValueError):
            freshness.planned_events(rate, seconds)


@pytest.mark.parametrize(("options", "fragment"), [
    ({"trials": -3}, "trials"), ({"trials": 0}, "trials"), ({"timeout_s": -1.0}, "timeout"),
    ({"timeout_s": float("nan")}, "timeout"), ({"spread_s": -5.0}, "spread"), ({"burst": 0}, "burst"),
    ({"min_hits": 11}, "min_hits"),
])
def test_the_probe_refuses_numbers_before_it_connects(settings, options, fragment) -> None:
    """-3 trials ran none and reported -3 requested, -3 errors; the check comes before any connection."""
    with pytest.raises(ValueError, match=fragment):
        probe_freshness(settings, "http://127.0.0.1:9", **options)


# ---------------------------------------------------------------- bench soak
@pytest.mark.parametrize(("args", "fragment"), [
    (["--query-rate", "0"], "--query-rate"),  # the query thread died on 1 / 0: 0 queries, 0 errors reported
    (["--query-rate", "-1"], "--query-rate"),  # a negative wait: queries back to back
    (["--query-rate", "nan"], "--query-rate"),
    (["--query-rate", "inf"], "--query-rate"),
    (["--poll", "0"], "--poll"),
    (["--poll", "nan"], "--poll"),
])
def test_bench_soak_refuses_rates_before_any_stack(settings, args, fragment) -> None:
    result = invoke(settings, "bench", "soak", "--events", "200", "--users", "20", "--items", "10", *args, "--json")
    assert_usage_error(result, fragment)


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), float("inf")])
def test_queries_refuse_a_rate_that_is_not_finite_and_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="query rate"):
        Queries("http://127.0.0.1:9", rate, np.array(["u1"]))


# ---------------------------------------------------------------- bench serving
SMALL_SERVING = ["--items", "50", "--users", "20", "--dim", "4", "--workers", "1", "--no-auth-run"]


@pytest.mark.parametrize(("args", "fragment"), [
    (["--rate", "nan", "--filter-rate", "0"], "--rate"),
    (["--rate", "inf", "--filter-rate", "0"], "--rate"),
    (["--rate", "50", "--duration", "nan", "--filter-rate", "0"], "--duration"),
    (["--rate", "50", "--duration", "inf", "--filter-rate", "0"], "--duration"),
    (["--rate", "50", "--duration", "1", "--filter-rate", "nan"], "--filter-rate"),
    (["--rate", "50", "--duration", "1", "--filter-rate", "inf"], "--filter-rate"),
])
def test_bench_serving_refuses_numbers_that_are_not_finite(settings, args, fragment) -> None:
    result = invoke(settings, "bench", "serving", *SMALL_SERVING, *args, "--json")
    assert_usage_error(result, fragment, "is not a finite number")


# ---------------------------------------------------------------- bench param-server, bench stream
@pytest.mark.parametrize("args", [["--ids", "0"], ["--ids", "-5"], ["--batch", "0"], ["--batch", "-1"], ["--dim", "0"]])
def test_bench_param_server_refuses_sizes_below_one(settings, args) -> None:
    result = invoke(settings, "bench", "param-server", "--ids", "100", "--dim", "4", *args, "--json")
    assert_usage_error(result, args[0], "x>=1")


@pytest.mark.parametrize("args", [["--partitions", "0"], ["--events", "-5"], ["--events", "0"]])
def test_bench_stream_refuses_sizes_below_one(settings, args) -> None:
    result = invoke(settings, "bench", "stream", "--events", "10", *args, "--json")
    assert_usage_error(result, args[0], "x>=1")


# ---------------------------------------------------------------- bench models
def test_bench_models_refuses_an_unknown_model(settings, timed_log) -> None:
    """`--only nosuchmodel` printed an empty table and exited 0."""
    result = invoke(settings, "bench", "models", "--data", str(timed_log), "--format", "csv", "--only", "nosuchmodel")
    assert_usage_error(result, "--only", "nosuchmodel", "popularity")


@pytest.mark.parametrize("where", ["missing folder", "a folder"])
def test_bench_models_refuses_a_markdown_path_it_cannot_write_before_the_run(settings, ml100k, tmp_path,
                                                                               where) -> None:
    """The file was written after the whole evaluation, and a bad path lost every result to a traceback."""
    target = tmp_path / "no" / "such" / "table.md" if where == "missing folder" else tmp_path
    result = invoke(settings, "bench", "models", "--data", str(ml100k), "--only", "popularity",
                    "--markdown", str(target))
    assert_usage_error(result, "--markdown")
    assert result.stdout == ""  # refused before the evaluation, which prints its JSON


def test_bench_models_prints_the_json_and_writes_the_table(settings, ml100k, tmp_path) -> None:
    target = tmp_path / "table.md"
    result = invoke(settings, "bench", "models", "--data", str(ml100k), "--only", "popularity",
                    "--markdown", str(target))
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert [row["model"] for row in printed["rows"]] == ["popularity"]
    assert target.read_text() == printed["markdown"] + "\n"


@pytest.mark.parametrize("args", [["--trials", "0"], ["--burst", "-1"], ["--min-hits", "11"], ["--spread", "nan"],
                                  ["--timeout", "0"], ["--timeout", "inf"]])
def test_probe_freshness_refuses_numbers_before_it_connects(args: list[str]) -> None:
    """They raised ValueError deep inside the probe, a traceback, once the checks moved there."""
    result = CliRunner().invoke(cli, ["probe", "freshness", "--url", "http://127.0.0.1:9", *args])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def test_experiments_watch_refuses_a_window_of_no_time() -> None:
    result = CliRunner().invoke(cli, ["experiments", "watch", "--window", "0", "--metrics-port", "9"])
    assert result.exit_code == 2 and "--window" in result.output, result.output
