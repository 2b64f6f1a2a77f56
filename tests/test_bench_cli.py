"""`fusedrnn bench` beyond the table: per-call times and host facts in the JSON, --sweep, --plot,
--compare and --memory, on tiny shapes with one or two rounds."""

import json
import os
import statistics
import sys

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _bench_memory, _bench_report, _core, benchmark, cli

row_key = _bench_report.row_key
TINY = ["--rounds", "2", "--repeats", "2", "--no-progress"]


def run_json(capsys, argv):
    """The report of a tiny run, and what it printed beside it (to stderr)."""
    assert cli.main(["bench", *TINY, *argv, "--json", "-"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


@pytest.fixture
def figures(monkeypatch):
    """The figures `fusedrnn bench --plot` draws, caught on their way out."""
    caught = []
    plot_rows = _bench_report.plot_rows

    def keep(*args, **kwargs):
        caught.append(plot_rows(*args, **kwargs))
        return caught[-1]

    monkeypatch.setattr(_bench_report, "plot_rows", keep)
    return caught


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def series(ax):
    """{label: (x data, y data)} of the errorbar series drawn on ax."""
    return {c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())) for c in ax.containers}


# ---- the JSON ------------------------------------------------------------------------------------------


def test_json_keeps_every_call_and_the_host(capsys):
    report, _ = run_json(capsys, ["--cell", "gru", "--shape", "3,2,5,4", "--peers", "fusedrnn", "numpy",
                                  "--rounds", "3"])
    meta = report["meta"]
    assert meta["peers"] == ["fusedrnn", "numpy"] and meta["threads"] == 2 and meta["rounds"] == 3
    assert meta["cpu"] == benchmark.cpu_model() and meta["cpu"]
    info = fusedrnn.build_info()
    assert meta["simd"] == info["simd"] and meta["blas"] == info["blas"] and meta["blas"].startswith("OpenBLAS ")
    assert meta["openblas_overrides"] == {k: v for k, v in os.environ.items() if k in benchmark.OPENBLAS_OVERRIDES}
    assert meta["numpy"] == np.__version__ and meta["python"].count(".") == 2
    for row in report["rows"]:
        for peer in ("fusedrnn", "numpy"):
            times = row[f"{peer}_times_ms"]
            assert len(times) == 3 and all(len(t) == 2 and min(t) > 0 for t in times)
            medians = [statistics.median(t) for t in times]
            assert row[f"{peer}_ms"] == pytest.approx(statistics.median(medians))
            spread = (max(medians) - min(medians)) / statistics.median(medians) * 100
            assert row[f"{peer}_spread_pct"] == pytest.approx(spread)


def test_cpu_model_is_the_one_proc_cpuinfo_names():
    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/cpuinfo is Linux's")
    with open("/proc/cpuinfo") as f:
        fields = [line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()]
    fields = {key.strip(): value.strip() for key, value in fields}
    expected = f"{fields['model name']} ({fields['vendor_id']} family {fields['cpu family']} model {fields['model']})"
    assert benchmark.cpu_model() == expected


def test_sgemm_ceiling_counts_the_product_and_leaves_the_blas_on_one_thread(monkeypatch):
    import ctypes

    from fusedrnn import _core

    lib = ctypes.CDLL(_core.blas_library())
    timed = benchmark.time_calls
    seen = []

    def time_calls(fn, repeats):
        seen.append(lib.scipy_openblas_get_num_threads())
        return [0.002, 0.001, 0.004][:repeats] if timed(fn, repeats) else []

    monkeypatch.setattr(benchmark, "time_calls", time_calls)
    assert benchmark.sgemm_gflops(2, size=128, repeats=3) == pytest.approx(2 * 128**3 / 0.001 / 1e9)
    assert seen == [2]
    assert lib.scipy_openblas_get_num_threads() == 1


# ---- --sweep ---------------------------------------------------------------------------------------------


def test_sweep_varies_only_its_axis(capsys, tmp_path, figures):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "sweep.png"
    report, err = run_json(capsys, ["--cell", "rnn_tanh", "--shape", "3,2,5,4", "--sweep", "hidden=2,6,3",
                                    "--peers", "fusedrnn", "numpy", "--plot", str(plot)])
    assert "Sweep of hidden (H) = 2, 6, 3 at T=3, B=2, I=5" in err
    rows = report["rows"]
    assert [(r["T"], r["B"], r["I"], r["H"], r["mode"]) for r in rows] == [
        (3, 2, 5, h, mode) for h in (2, 6, 3) for mode in ("inference", "training")]
    assert report["meta"]["sweep"] == {"axis": "H", "values": [2, 6, 3]}
    assert_png(plot)
    (fig,) = figures
    time_ax, ratio_ax, train_time_ax, train_ratio_ax = fig.axes   # one pair of panels per cell and mode
    assert "inference" in time_ax.get_title() and "training" in train_time_ax.get_title()
    drawn = series(time_ax)
    assert set(drawn) == {"fusedrnn", "numpy"}
    inference = sorted((r for r in rows if r["mode"] == "inference"), key=lambda r: r["H"])
    for peer, (xs, ys) in drawn.items():
        assert xs == [2, 3, 6] and ys == pytest.approx([r[f"{peer}_ms"] for r in inference])
    (ratio_peer, (xs, ys)), = series(ratio_ax).items()
    assert ratio_peer == "numpy" and ys == pytest.approx([r["numpy_ms"] / r["fusedrnn_ms"] for r in inference])
    assert time_ax.get_xlabel() == "hidden (H)"
    # Compared with, the run is rerun as the same sweep.
    old = tmp_path / "sweep.json"
    old.write_text(json.dumps(report))
    again, err = run_json(capsys, ["--compare", str(old)])
    assert again["meta"]["sweep"] == report["meta"]["sweep"] and again["meta"]["peers"] == ["fusedrnn", "numpy"]
    assert [row_key(r) for r in again["rows"]] == [row_key(r) for r in rows]
    assert f"Against {old}:" in err and "Sweep of hidden (H)" in err


@pytest.mark.parametrize("text, axis, values", [
    ("batch=1,8,32", "B", (1, 8, 32)), ("T=4, 2", "T", (4, 2)), ("Hidden=3,5", "H", (3, 5)),
    ("input=7,9", "I", (7, 9))])
def test_parse_sweep(text, axis, values):
    sweep = _bench_report.parse_sweep(text)
    assert (sweep.axis, sweep.values) == (axis, values)
    assert sweep.shapes((10, 20, 30, 40))[1][["T", "B", "I", "H"].index(axis)] == values[1]


# ---- --plot ----------------------------------------------------------------------------------------------


def test_plot_draws_each_peer_with_its_spread(tmp_path):
    pytest.importorskip("matplotlib")
    cases = benchmark.cases_for(["gru", "lstm"], [(3, 2, 5, 4)])
    rows = [row for case in cases for row in benchmark.run_case(case, ["fusedrnn", "numpy"], rounds=3, repeats=1)]
    path = tmp_path / "cases.png"
    fig = _bench_report.plot_rows(rows, ["fusedrnn", "numpy"], str(path))
    assert_png(path)
    time_ax, ratio_ax = fig.axes
    assert [t.get_text() for t in time_ax.get_yticklabels()] == [
        "GRU (3,2,5,4) inference", "GRU (3,2,5,4) training", "LSTM (3,2,5,4) inference", "LSTM (3,2,5,4) training"]
    drawn = series(time_ax)
    assert list(drawn) == ["fusedrnn", "numpy"]
    for peer, (xs, _) in drawn.items():
        assert xs == pytest.approx([r[f"{peer}_ms"] for r in rows])
    # The whiskers reach the fastest and slowest round of each row.
    whiskers = time_ax.containers[1].lines[2][0].get_segments()
    for segment, row in zip(whiskers, rows):
        medians = _bench_report.round_medians(row, "numpy")
        assert [segment[0][0], segment[1][0]] == pytest.approx([min(medians), max(medians)])
    assert list(series(ratio_ax)) == ["numpy"]
    assert series(ratio_ax)["numpy"][0] == pytest.approx([r["speedup_vs_numpy"] for r in rows])


def test_plot_without_matplotlib_fails_before_measuring(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # makes `import matplotlib` raise ImportError

    def never(*args, **kwargs):
        raise AssertionError("measured although the plot could not be drawn")

    monkeypatch.setattr(benchmark, "run_case", never)
    assert cli.main(["bench", "--cell", "gru", "--shape", "2,1,2,2", "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install 'fusedrnn[plot]'" in capsys.readouterr().err


# ---- --compare -------------------------------------------------------------------------------------------


def test_judge_needs_both_medians_outside_and_the_threshold():
    old = [1.0, 1.1, 0.9]
    assert _bench_report.judge(old, [1.5, 1.6, 1.4], 0.05) == "slower"
    assert _bench_report.judge(old, [0.5, 0.6, 0.4], 0.05) == "faster"
    assert _bench_report.judge(old, [1.05, 1.08, 1.02], 0.05) == "same"     # new median inside the old range
    assert _bench_report.judge(old, [1.2, 3.0, 0.95], 0.05) == "same"      # old median inside the new range
    assert _bench_report.judge([1.0], [1.03], 0.05) == "same"              # outside, but under the threshold
    assert _bench_report.judge([1.0], [1.03], 0.0) == "slower"
    # The threshold is a change of the median as printed, new / old - 1, both ways: -4.8% is under 5%.
    assert _bench_report.judge([100.0, 100.5, 99.5], [95.2, 95.3, 95.1], 0.05) == "same"
    assert _bench_report.judge([100.0, 100.5, 99.5], [94.9, 95.0, 94.8], 0.05) == "faster"
    assert _bench_report.judge([100.0, 100.5, 99.5], [66.6, 66.7, 66.5], 0.5) == "same"


def test_compare_flags_a_row_made_slower_and_not_one_within_spread(capsys, tmp_path):
    argv = ["--cell", "rnn_tanh", "gru", "--shape", "3,2,5,4", "--mode", "training", "--peers", "fusedrnn",
            "numpy"]
    old, _ = run_json(capsys, argv)
    rnn, gru = old["rows"]
    # The earlier run, as it would have been had the RNN's fused kernels been 1000x faster then (so
    # they are slower now) and its NumPy times spread from almost nothing to a second; the GRU's
    # NumPy times made 1000x slower (so it is faster now).
    rnn["fusedrnn_times_ms"] = [[t / 1000 for t in times] for times in rnn["fusedrnn_times_ms"]]
    rnn["numpy_times_ms"] = [[1e-6, 1e-6], [1e3, 1e3]]
    gru["numpy_times_ms"] = [[t * 1000 for t in times] for times in gru["numpy_times_ms"]]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))

    assert cli.main(["bench", "--compare", str(path), *TINY]) == 0    # reruns the old cases and peers
    out = capsys.readouterr().out
    verdicts = {tuple(line.split()[i] for i in (0, 6)): line.split()[-1] for line in out.splitlines()
                if line.split()[-1:] in (["slower"], ["faster"], ["same"])}
    assert verdicts[("RNN_TANH", "fusedrnn")] == "slower"
    assert verdicts[("RNN_TANH", "numpy")] == "same"
    assert verdicts[("GRU", "numpy")] == "faster"
    assert len(verdicts) == 4
    assert cli.main(["bench", "--compare", str(path), "--fail-on-slower", *TINY]) == 1
    capsys.readouterr()
    # Nothing in common to judge: a gate that compared nothing fails rather than passes.
    assert cli.main(["bench", "--compare", str(path), "--fail-on-slower", "--cell", "lstm", "--shape", "2,1,3,3",
                     "--peers", "fusedrnn", *TINY]) == 2
    assert "fail-on-slower: nothing to judge, so this run fails" in capsys.readouterr().out


def test_compare_reports_matches_rows_and_peers_by_name():
    def row(cell, h, times):
        return {"cell": cell, "T": 1, "B": 1, "I": 1, "H": h, "mode": "training", "a_times_ms": times}

    old = {"meta": {"peers": ["a"], "cpu": "X", "blas": "OpenBLAS Haswell", "rounds": 3, "repeats": 5,
                    "peer_threads": {"a": 2}},
           "rows": [row("GRU", 4, [[1.0], [1.0]]), row("GRU", 8, [[1.0]])]}
    new = {"meta": {"peers": ["a"], "cpu": "Y", "blas": "OpenBLAS SkylakeX", "rounds": 3, "repeats": 1,
                    "peer_threads": {"a": 1}},
           "rows": [row("GRU", 8, [[2.0]]), row("LSTM", 4, [[9.0]])]}
    (change,) = _bench_report.compare_reports(old, new, 0.05)
    assert change.key == ("GRU", 1, 1, 1, 8, "training") and change.verdict == "slower"
    text = _bench_report.format_comparison([change], old, new, 0.05)
    assert "note: the runs differ in cpu: X then, Y now" in text
    assert "note: the runs differ in blas: OpenBLAS Haswell then, OpenBLAS SkylakeX now" in text
    assert "note: the runs differ in repeats: 5 then, 1 now" in text and "differ in rounds" not in text
    assert "note: the runs differ in a's threads: 2 then, 1 now" in text
    # A peer on the run's --threads is said once, by the threads note.
    old["meta"]["threads"], new["meta"]["threads"] = 2, 1
    text = _bench_report.format_comparison([change], old, new, 0.05)
    assert "note: the runs differ in threads: 2 then, 1 now" in text and "a's threads" not in text
    assert "1 slower, 0 faster, 0 within spread or under 5%" in text


# ---- --memory --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell, states, saved", [("lstm", 2, 4), ("gru", 1, 4), ("rnn_tanh", 1, 0)])
def test_memory_kept_for_backward_is_the_tape(cell, states, saved):
    steps, batch, inp, hidden = 3, 2, 5, 4
    rows = benchmark.run_case(benchmark.Case(cell, steps, batch, inp, hidden), ["fusedrnn"], rounds=1, repeats=1,
                              memory=True)
    inference, training = rows
    # The tape: h (and c) for the T+1 slots of the sequence, and `saved` gate values per unit and step,
    # float32.
    tape = 4 * (states * (steps + 1) * batch * hidden + steps * batch * saved * hidden)
    assert training["fusedrnn_saved_bytes"] == tape
    assert "fusedrnn_saved_bytes" not in inference
    assert "fusedrnn_peak_rss_bytes" in inference and "fusedrnn_peak_rss_bytes" in training


def test_memory_table_and_meta(capsys):
    report, err = run_json(capsys, ["--cell", "rnn_tanh", "--shape", "2,1,3,3", "--peers", "fusedrnn", "numpy",
                                    "--memory"])
    training = report["rows"][1]
    assert training["fusedrnn_saved_bytes"] == 4 * 3 * 1 * 3      # h for T+1 = 3 slots
    assert "numpy_saved_bytes" not in training
    assert set(report["meta"]["memory"]) == {"saved_bytes", "peak_rss_bytes"}
    line = next(line for line in err.splitlines() if line.split()[:1] == ["RNN_TANH"] and "training" in line)
    assert line.split()[6:8] == ["36", "B"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resident-set method reads Linux's /proc")
def test_peak_rss_growth_sees_what_a_call_touches():
    size = 32 << 20
    grown = _bench_memory.peak_rss_growth(lambda: np.ones(size, np.uint8).sum())
    assert size * 0.95 <= grown <= size * 1.5
    assert _bench_memory.peak_rss_growth(lambda: None) < 1 << 20
    # A training call of fusedrnn's module holds at least its tape at its peak.
    case = benchmark.Case("lstm", 50, 16, 128, 128)
    training = benchmark.run_case(case, ["fusedrnn"], rounds=1, repeats=1, memory=True)[1]
    assert training["fusedrnn_peak_rss_bytes"] >= training["fusedrnn_saved_bytes"] > 2 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resident-set method reads Linux's /proc")
def test_peak_of_a_warm_call_counts_fusedrnns_own_scratch():
    # Other peers' per-call buffers are counted at every call; fusedrnn's scratch, kept between calls,
    # must be too, or a warmed-up call would read as needing only its outputs.
    m = fusedrnn.LSTM(512, 512)
    m.eval()
    x = np.ones((200, 8, 512), np.float32)
    m(x)
    peak = _bench_memory.peak_rss_growth(lambda: m(x))
    m(x)
    assert peak >= fusedrnn.release_scratch() > 0


# ---- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sweep", ["batch", "batch=", "batch=0,2", "depth=1,2", "batch=4", "batch=2,2",
                                   "batch=1.5,2", "=1,2"])
def test_bad_sweep_names_the_option(capsys, sweep):
    assert cli.main(["bench", "--sweep", sweep]) == 2
    assert "sweep: expected AXIS=V1,V2,..." in capsys.readouterr().err


VALID_ROW = '{"cell": "GRU", "T": 1, "B": 1, "I": 1, "H": 1, "mode": "training", "fusedrnn_times_ms": [[1.0]]}'
VALID_REPORT = '{"meta": {"peers": ["fusedrnn"]}, "rows": [' + VALID_ROW + ']}'


def write(tmp_path, text):
    path = tmp_path / "old.json"
    path.write_text(text)
    return str(path)


def test_output_paths_are_tried_where_the_file_would_be_written(capsys, tmp_path, monkeypatch):
    """A link to a folder that does not exist, and a file system no file can be made in (access() says
    yes there to root), are refused before anything is timed; a path that can be written is left as it was."""
    def never(*args, **kwargs):
        raise AssertionError("measured although an option was wrong")

    monkeypatch.setattr(benchmark, "run_case", never)
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "missing" / "out.json")
    for path, message in ((str(dangling), "json: the folder"), ("/proc/fusedrnn-out.json", "cannot be written")):
        assert cli.main(["bench", "--cell", "gru", "--json", path]) == 2
        assert message in capsys.readouterr().err
    from fusedrnn import _bench_report
    fresh, kept = tmp_path / "fresh.json", tmp_path / "kept.json"
    kept.write_text("old")
    for path in (fresh, kept):
        _bench_report.check_output_path(str(path), "json")
    assert not fresh.exists() and kept.read_text() == "old"


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "batch=1,2", "--shape", "1,1,1,1", "2,2,2,2"], "sweep: give one base --shape to vary, got 2"),
    (["--set", "default", "--sweep", "batch=1,2"], "set: give either --set or --cell/--shape/--sweep"),
    (["--compare", "/nonexistent/old.json"], "compare: cannot read '/nonexistent/old.json'"),
    (["--compare", "{not json"], "is not JSON"),
    (["--compare", '{"rows": []}'], "has no rows; expected what `fusedrnn bench --json` writes"),
    (["--compare", '{"rows": [{"cell": "GRU"}]}'], "lacks T, B, I, H, mode"),
    (["--compare", '{"meta": {"peers": ["fusedrnn"]}, "rows": [{"cell": "GRU", "T": 1, "B": 1, "I": 1, "H": 1, '
                   '"mode": "training", "fusedrnn_ms": 1.0}]}'], "has no per-call times"),
    (["--compare", VALID_REPORT, "--threshold", "-1"], "threshold: expected a percentage >= 0"),
    (["--compare", VALID_REPORT.replace('[[1.0]]', '[[1' + "0" * 400 + ']]')], "is not a list of rounds"),
    (["--cell", "gru", "--threshold", "5"], "threshold, fail-on-slower: they judge a --compare"),
    (["--cell", "gru", "--fail-on-slower"], "threshold, fail-on-slower: they judge a --compare"),
    (["--cell", "gru", "--plot", "/nonexistent/plot.png"], "plot: the folder '/nonexistent' does not exist"),
    (["--cell", "gru", "--plot", "plot.xyz"], "plot: expected a file name ending in one of"),
    (["--cell", "gru", "--plot", "/"], "plot: '/' is a folder, not a file name"),
    (["--cell", "gru", "--json", "/nonexistent/out.json"], "json: the folder '/nonexistent' does not exist"),
    (["--cell", "gru", "--json", "/"], "json: '/' is a folder, not a file name"),
    (["--cell", "gru", "--peers", "fusedrnn", "numpy", "fusedrnn"], "peers: 'fusedrnn' given more than once"),
    (["--cell", "gru", "--mode", "training", "training"], "mode: 'training' given more than once"),
    (["--cell", "gru", "lstm", "gru"], "cell: 'gru' given more than once"),
    (["--cell", "gru", "--shape", "5,2,3,4", "5, 2,3,4"], "shape: (5, 2, 3, 4) given more than once"),
    (["--cell", "gru", "--plot", ""], "plot: expected a file name, got an empty one"),
    (["--compare", "/dev/zero"], "compare: '/dev/zero' is not a regular file"),
    (["--cell", "gru", "--shape", "\u00b2,1,2,2"], "shape: expected T,B,I,H as four integers in [1, 2147483647]"),
    (["--cell", "gru", "--shape", "99999999999999999999,1,1,1"], "shape: expected T,B,I,H as four integers in"),
    (["--cell", "gru", "--sweep", "B=1,99999999999999999999"], "sweep: expected AXIS=V1,V2,..."),
    (["--compare", VALID_REPORT.replace('"GRU"', "5")], "row 0: cell 5 is none of"),
    (["--compare", VALID_REPORT.replace('"T": 1', '"T": 2.5')], "row 0: T = 2.5, expected an int in [1, 2147483647]"),
    (["--compare", VALID_REPORT.replace('"T": 1', '"T": 1' + "0" * 30)], "row 0: T = 1" + "0" * 30),
    (["--compare", VALID_REPORT.replace('"GRU"', '"LSTMP8"').replace('"H": 1', '"H": 4')],
     "row 0: cell 'LSTMP8' projects to 8 features, expected fewer than H = 4"),
    (["--compare", VALID_REPORT.replace('"GRU"', '"LSTMP0"')], "row 0: cell 'LSTMP0' is none of"),
    (["--compare", VALID_REPORT.replace('"GRU"', '"LSTMP02"')], "row 0: cell 'LSTMP02' is none of"),
    (["--compare", "[" * 100000 + "]" * 100000], "is not JSON that `fusedrnn bench --json` writes"),
    (["--compare", '{"rows": [' + "1" * 5000 + "]}"], "is not JSON that `fusedrnn bench --json` writes"),
    (["--compare", VALID_REPORT.replace('{"peers"', '{"sweep": {"axis": "B", "values": [2, 2]}, "peers"')],
     "meta.sweep: expected"),
    (["--compare", VALID_REPORT.replace('{"peers"', '{"sweep": {"axis": "B", "values": [1, 2]}, "peers"')],
     "meta.sweep: values [1, 2] are not the rows' B values [1]"),
    (["--cell", "gru", "--json", ""], "json: expected a file name, got an empty one"),
    (["--compare", VALID_REPORT.replace('"training"', '"bogus"')], "row 0: mode 'bogus' is neither of"),
    (["--compare", VALID_REPORT.replace("[[1.0]]", "[[0]]")], "row 0: fusedrnn_times_ms is not a list of rounds"),
    (["--compare", VALID_REPORT.replace("[[1.0]]", "[1.0]")], "row 0: fusedrnn_times_ms is not a list of rounds"),
    (["--compare", VALID_REPORT.replace('["fusedrnn"]', '["fusedrnn", "bogus"]')],
     "row 0: bogus_times_ms is not a list of rounds"),
    (["--compare", VALID_REPORT.replace('{"peers"', '{"sweep": {"axis": "Q", "values": [1, 2]}, "peers"')],
     "meta.sweep: expected"),
    (["--compare", VALID_REPORT.replace('{"peers"', '{"sweep": {"axis": "B"}, "peers"')], "meta.sweep: expected"),
    (["--compare", '{"meta": [], "rows": [{"cell": "GRU", "T": 1, "B": 1, "I": 1, "H": 1, "mode": "training"}]}'],
     "'meta' is not an object"),
    (["--compare", VALID_REPORT.replace('"GRU"', '"gru"')], "row 0: cell 'gru', expected the label as `fusedrnn bench` "
                                                             "writes it ('GRU')"),
    (["--compare", VALID_REPORT.replace('"rows": [', '"rows": [' + VALID_ROW + ", ")],
     "row 1: the same case and mode as row 0"),
    (["--set", ""], "set: expected 'default', 'projection' or one of"),
    (["--set", "", "--cell", "gru"], "set: give either --set or --cell/--shape/--sweep"),
])
def test_bad_bench_options_name_the_option(capsys, tmp_path, monkeypatch, argv, message):
    def never(*args, **kwargs):
        raise AssertionError("measured although an option was wrong")

    monkeypatch.setattr(benchmark, "run_case", never)
    if argv[0] == "--compare" and not argv[1].startswith("/"):
        argv = ["--compare", write(tmp_path, argv[1]), *argv[2:]]
    assert cli.main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_compare_refuses_a_file_far_larger_than_any_report(capsys, tmp_path):
    path = tmp_path / "big.json"
    with open(path, "wb") as f:  # sparse: the size without the disk
        f.truncate(_bench_report._MAX_REPORT_BYTES + 1)
    assert cli.main(["bench", "--compare", str(path)]) == 2
    assert f"compare: {str(path)!r} is larger than 64 MiB" in capsys.readouterr().err


def test_a_file_that_cannot_be_written_is_one_line_and_exit_1(capsys, monkeypatch):
    """A disk that fills while the rows are timed: the rows already printed stay, the error is one line."""
    monkeypatch.setattr(benchmark, "run_case", lambda case, *args, **kwargs: [])
    assert cli.main(["bench", "--cell", "gru", "--shape", "1,1,1,1", "--json", "/dev/full"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fusedrnn bench: '/dev/full': cannot be written (No space left on device)")


def test_compare_names_a_file_that_is_not_utf8(capsys, tmp_path):
    path = tmp_path / "old.json"
    path.write_bytes(b'{"rows": "\xff\xfe"}')
    assert cli.main(["bench", "--compare", str(path)]) == 2
    assert f"compare: {str(path)!r} is not JSON that `fusedrnn bench --json` writes" in capsys.readouterr().err


def test_compare_reruns_projected_lstm_rows_as_such():
    # A report's LSTMP rows name their projection ("LSTMP2"); rerunning them rebuilds the projected case.
    rows = [{"cell": label, "T": 1, "B": 1, "I": 3, "H": 4, "mode": "training"} for label in ("LSTMP2", "LSTM")]
    assert _bench_report.report_cases({"rows": rows}) == [
        benchmark.Case("lstm", 1, 1, 3, 4, modes=("training",), proj_size=2),
        benchmark.Case("lstm", 1, 1, 3, 4, modes=("training",))]


def test_numeric_options_refuse_what_is_not_an_int_in_range(capsys):
    too_many = str(_core.max_threads + 1)
    for argv in (["--rounds", "abc"], ["--rounds", "0"], ["--threads", too_many], ["--repeats", "\u00b2"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["bench", *argv])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {argv[0]}: " in err and "_positive_int" not in err


def test_projection_cases_leave_out_peers_without_one(monkeypatch):
    projection = benchmark.named_cases("projection")
    assert all(benchmark.PEERS[p].projection for p in benchmark.available_peers("cpu", projection))
    monkeypatch.setitem(benchmark.PEERS, "plain", benchmark.Peer("plain", lambda problem: None, projection=False))
    assert "plain" in benchmark.available_peers("cpu") and "plain" not in benchmark.available_peers("cpu", projection)
    with pytest.raises(ValueError, match="peers: 'plain' has no LSTM with a projection"):
        benchmark.check_peers(["fusedrnn", "plain"], "cpu", projection)


def test_mode_applies_to_sets_and_compared_reports(monkeypatch, tmp_path):
    timed = []

    def record(case, peers, **kwargs):
        timed.append(case)
        return []

    monkeypatch.setattr(benchmark, "run_case", record)
    assert cli.main(["bench", "--set", "projection", "--mode", "training", "--peers", "fusedrnn"]) == 0
    assert timed and all(c.modes == ("training",) for c in timed)
    timed.clear()
    report = write(tmp_path, VALID_REPORT)
    assert cli.main(["bench", "--compare", report, "--mode", "inference"]) == 2  # its one row is training only
    assert not timed


def test_memory_counts_torch_only_where_torch_is_a_peer(monkeypatch):
    """--memory times what the run's peers keep: a fusedrnn-only run never imports torch (a broken torch
    install aborted it)."""
    problem = benchmark.make_problem(benchmark.Case("lstm", 3, 2, 4, 5))
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch would raise ImportError
    assert set(benchmark.saved_for_backward_nbytes(problem, {"fusedrnn"})) == {"fusedrnn"}
    rows = benchmark.run_case(problem.case, ["fusedrnn"], rounds=1, repeats=1, memory=True)
    assert rows[-1]["fusedrnn_saved_bytes"] > 0
