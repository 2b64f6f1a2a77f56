"""The packaged data sets, the benchmark harness and its peer registry, the demo's pieces, and the
`fusedrnn` command (demo, bench, info) run in-process on tiny settings."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _bench_report, benchmark, cli, datasets, demo


# ---- data ---------------------------------------------------------------------------------------------


def test_sunspots():
    years, activity = datasets.sunspots()
    assert years.tolist() == list(range(1700, 2009)) and activity.shape == (309,)
    assert activity[:3].tolist() == [5.0, 11.0, 16.0] and np.all(activity >= 0)


def test_co2_gaps_are_filled_on_the_weekly_grid():
    co2 = datasets.co2_weekly()
    assert len(co2.dates) == 2284 and np.all(np.diff(co2.dates).astype(int) == 7)
    assert int((~co2.measured).sum()) == 59 and np.all(np.isfinite(co2.ppm))
    # Each filled run lies on the straight line between the measured weeks either side.
    gap = int(np.flatnonzero(~co2.measured)[0])
    end = gap + int(np.argmax(co2.measured[gap:]))
    before, after = co2.ppm[gap - 1], co2.ppm[end]
    expected = before + (after - before) * np.arange(1, end - gap + 1) / (end - gap + 1)
    np.testing.assert_allclose(co2.ppm[gap:end], expected, rtol=1e-12)
    assert 310 < co2.ppm.min() and co2.ppm.max() < 380


def test_deepbench_shapes():
    shapes = datasets.deepbench_shapes()
    assert len(shapes) == 125
    assert {s.cell for s in shapes} == {"rnn_relu", "gru", "lstm"}
    assert shapes[0] == datasets.DeepBenchShape("training_set", 1760, 16, 50, "rnn_relu")


# ---- benchmark harness ---------------------------------------------------------------------------------


TINY = benchmark.Case("gru", 3, 2, 5, 4)


def test_run_case_rows_and_ratios():
    rows = benchmark.run_case(TINY, ["fusedrnn", "numpy"], rounds=2, repeats=1)
    assert [r["mode"] for r in rows] == ["inference", "training"]
    for row in rows:
        assert (row["cell"], row["T"], row["B"], row["I"], row["H"]) == ("GRU", 3, 2, 5, 4)
        assert row["speedup_vs_numpy"] == pytest.approx(row["numpy_ms"] / row["fusedrnn_ms"])
        work = TINY.flops(row["mode"])
        assert row["fusedrnn_gflops"] == pytest.approx(work / (row["fusedrnn_ms"] / 1e3) / 1e9)
        assert row["fusedrnn_spread_pct"] >= 0
    assert TINY.flops("training") == 3 * TINY.flops("inference") == 3 * 2.0 * 3 * 2 * (5 + 4) * 3 * 4


def test_projected_lstm_case_runs_on_every_peer():
    # An LSTMP row: every installed peer runs the same projected LSTM (torch.nn's proj_size) and counts
    # its flops with the projection.
    case = benchmark.Case("lstm", 3, 2, 5, 6, proj_size=2)
    assert case.flops("inference") == 2.0 * 3 * 2 * (4 * 6 * (5 + 2) + 2 * 6)
    problem = benchmark.make_problem(case)
    assert problem.state_dict["weight_hr_l0"].shape == (2, 6) and problem.dy.shape == (3, 2, 2)
    peers = ["fusedrnn", "numpy"] + [p for p in ("torch", "fusedrnn.torch", "jax") if p in benchmark.available_peers()]
    rows = benchmark.run_case(case, peers, rounds=1, repeats=1)
    assert [(r["cell"], r["mode"]) for r in rows] == [("LSTMP2", "inference"), ("LSTMP2", "training")]
    assert all(r[f"{p}_ms"] > 0 for r in rows for p in peers)
    assert [c.proj_size for c in benchmark.named_cases("projection")] == [128, 64]
    assert benchmark.parse_label("LSTMP2") == ("lstm", 2) and benchmark.parse_label("GRU") == ("gru", 0)


def test_peers_are_pluggable(monkeypatch):
    calls = []

    def factory(problem):
        # Every peer gets the same problem: fusedrnn's weights under torch.nn's names.
        assert set(problem.state_dict) == {"weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"}
        assert problem.x.shape == (3, 2, 5) and problem.dy.shape == (3, 2, 4)
        return benchmark.Runners(lambda: calls.append("infer"), lambda: calls.append("train"))

    monkeypatch.setitem(benchmark.PEERS, "counting", benchmark.PEERS["numpy"])
    benchmark.register_peer("counting", factory)
    rows = benchmark.run_case(TINY, ["fusedrnn", "counting"], rounds=3, repeats=2)
    assert calls.count("infer") == calls.count("train") == 2 + 3 * (1 + 2)  # warm-up; per round a wake-up + repeats
    assert "speedup_vs_counting" in rows[0]
    assert "counting" in benchmark.available_peers()


def test_named_cases_and_errors():
    default = benchmark.named_cases("default")
    assert len(default) == 6 and {c.cell for c in default} == {"lstm", "gru", "rnn_tanh"}
    training = benchmark.named_cases("training_set")
    assert len(training) == 53 and all(c.modes == ("training",) and c.input_size == c.hidden for c in training)
    assert all(c.modes == ("inference",) for c in benchmark.named_cases("inference_device_set"))
    with pytest.raises(ValueError, match="set: expected 'default', 'projection' or one of"):
        benchmark.named_cases("nope")
    with pytest.raises(ValueError, match="cells: expected names from"):
        benchmark.cases_for(["lstn"], [(1, 1, 1, 1)])
    with pytest.raises(ValueError, match="peers: unknown peer 'nope'"):
        benchmark.check_peers(["nope"])


def test_table_lines_line_up():
    table = benchmark.Table(["fusedrnn", "numpy"], show_input_size=True)
    row = {"cell": "GRU", "T": 3, "B": 2, "I": 5, "H": 4, "mode": "training", "fusedrnn_ms": 1.5,
           "fusedrnn_spread_pct": 3.0, "fusedrnn_gflops": 7.25, "numpy_ms": 6.0, "numpy_spread_pct": 1.0,
           "numpy_gflops": 1.8, "speedup_vs_numpy": 4.0}
    header, line = table.header(), table.line(row)
    assert len(header) == len(line)
    assert line.split() == ["GRU", "3", "2", "5", "4", "training", "1.500", "3%", "7.2", "6.000", "1%", "1.8",
                            "4.00x"]


# ---- the demo's pieces ---------------------------------------------------------------------------------


def test_linear_window_forecast_is_exact_on_a_linear_recursion():
    y = np.zeros(80)
    y[:2] = [1.0, 0.5]
    for t in range(2, 80):
        y[t] = 1.6 * y[t - 1] - 0.8 * y[t - 2] + 0.3
    np.testing.assert_allclose(demo.linear_window_forecast(y, 60, 2), y[60:], rtol=1e-9, atol=1e-9)
    assert 1 <= demo.choose_linear_window(y, 60, validation=20, longest=5) <= 5


def test_forecaster_short_run(rng):
    config = demo.ForecastConfig(hidden=8, epochs=2, held_out_years=30, batch=64, members=2)
    seen = []
    result = demo.train_forecaster(config, lambda epoch, loss: seen.append((epoch, loss)))
    assert [e for e, _ in seen] == [0, 1, 2, 3] and all(np.isfinite(loss) for _, loss in seen)
    assert result.losses == [loss for _, loss in seen]
    years, series = datasets.sunspots()
    assert result.years.tolist() == list(range(1979, 2009))
    np.testing.assert_array_equal(result.truth, series[-30:])
    persistence = result.baselines["repeat last value"]
    np.testing.assert_array_equal(persistence, series[-31:-1])
    assert result.rmse["repeat last value"] == pytest.approx(np.sqrt(np.mean((series[-31:-1] - series[-30:]) ** 2)))
    assert result.forecast.shape == (30,) and np.all(np.isfinite(result.forecast))
    assert result.rmse["model"] == pytest.approx(demo.rmse(result.forecast, result.truth))
    with pytest.raises(ValueError, match="cell: expected one of"):
        demo.train_forecaster(demo.ForecastConfig(cell="transformer"))


@pytest.mark.parametrize("field, value, error", [
    ("members", 0, "members: expected an int >= 1"), ("epochs", 0, "epochs: expected an int >= 1"),
    ("hidden", -3, "hidden: expected an int >= 1"), ("seed", -1, "seed: expected an int >= 0"),
    ("hidden", 2.0, "hidden: expected an int, got float"), ("warmup", 64, r"warmup: expected fewer steps than window"),
    ("lr", float("nan"), "lr: expected a positive finite number"), ("average_last", 0, "average_last: expected")])
def test_forecast_config_refuses_what_would_train_nothing(field, value, error):
    """members=0 averaged no forecast (an RMSE of nan), epochs=0 scored an untrained model."""
    with pytest.raises((TypeError, ValueError), match=f"^{error}"):
        demo.ForecastConfig(**{field: value})


def test_forecaster_refuses_a_split_that_leaves_no_window_to_train_on():
    with pytest.raises(ValueError, match=r"^held_out_years: 299 of the series' \d+ years leave \d+ to train on, "
                                         r"fewer than window \+ 1 = 65"):
        demo.train_forecaster(demo.ForecastConfig(held_out_years=299, epochs=1, members=1, hidden=2))


def test_forecast_is_the_members_average():
    small = dict(hidden=4, epochs=2, held_out_years=20, batch=64)
    both = demo.train_forecaster(demo.ForecastConfig(seed=0, members=2, **small))
    alone = [demo.train_forecaster(demo.ForecastConfig(seed=s, members=1, **small)).forecast for s in (0, 1)]
    np.testing.assert_allclose(both.forecast, np.mean(alone, axis=0), rtol=1e-6)
    assert not np.allclose(alone[0], alone[1])


# ---- the command ----------------------------------------------------------------------------------------


def test_cli_demo_prints_model_and_baselines(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "forecast.png"
    assert cli.main(["demo", "--epochs", "1", "--hidden", "4", "--no-progress", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    for name in ("LSTM", "repeat last value", "linear, last"):
        assert name in out
    assert "32.90" in out   # repeating the last value, on the 60 held-out years
    assert plot.stat().st_size > 1000


def test_cli_demo_gradients(capsys):
    assert cli.main(["demo", "--gradients"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["RNN_TANH"], ["GRU"], ["LSTM"])}
    assert set(rows) == {"RNN_TANH", "GRU", "LSTM"}
    factors = {cell: float(r[1]) for cell, r in rows.items()}
    assert factors["RNN_TANH"] < factors["LSTM"]   # the plain RNN loses the gradient fastest
    assert all(r[3] in ("vanishing", "healthy", "exploding") for r in rows.values())
    # The training's options do not apply to it: refused, not ignored.
    assert cli.main(["demo", "--gradients", "--cell", "gru", "--epochs", "3", "--device", "cuda"]) == 2
    assert "cell, epochs, device: not taken with --gradients" in capsys.readouterr().err


def test_cli_bench_json(capsys):
    argv = ["bench", "--cell", "rnn_tanh", "--shape", "3,2,5,4", "--peers", "fusedrnn", "numpy", "--rounds",
            "1", "--repeats", "1", "--json", "-", "--no-progress"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in report["rows"]] == ["inference", "training"]
    assert report["meta"]["threads"] == 2 and report["meta"]["numpy"] == np.__version__


def test_cli_bench_table_and_file(capsys, tmp_path):
    out_file = tmp_path / "rows.json"
    argv = ["bench", "--cell", "gru", "--shape", "2,1,3,3", "--peers", "fusedrnn", "--mode", "inference",
            "--rounds", "1", "--repeats", "1", "--json", str(out_file), "--no-progress"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == benchmark.describe_run(json.loads(out_file.read_text())["meta"])
    assert lines[0].endswith("; 2 threads for fusedrnn; 1 round of 1 call, alternating peers")
    assert lines[1].split()[:5] == ["cell", "T", "B", "H", "mode"]
    assert lines[2].split()[:5] == ["GRU", "2", "1", "3", "inference"]
    assert lines[2].split()[6] == "-"  # one round: no spread to show
    assert len(json.loads(out_file.read_text())["rows"]) == 1


def test_cli_bench_says_which_peers_keep_their_own_threads_and_which_way_ratios_go(capsys):
    argv = ["bench", "--cell", "gru", "--cell", "rnn_tanh", "--shape", "2,1,3,3", "--peers", "fusedrnn",
            "--peers", "numpy", "--mode", "inference", "--rounds", "2", "--repeats", "1", "--threads", "1",
            "--json", "-", "--no-progress"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert [r["cell"] for r in report["rows"]] == ["GRU", "RNN_TANH"]  # a repeated option adds to the first
    assert report["meta"]["peer_threads"] == {"fusedrnn": 1, "numpy": "own"}
    assert "1 thread for fusedrnn; numpy on its own thread pool" in captured.err
    assert benchmark.peer_threads(["fusedrnn", "torch", "torch-1t", "jax"], 4) == {
        "fusedrnn": 4, "torch": 4, "torch-1t": 1, "jax": "own"}
    header = benchmark.Table(["fusedrnn", "numpy"], show_input_size=False).header()
    assert header.split()[-1] == "numpy/fusedrnn"
    assert cli.main(["bench", "--cell", "gru", "--cell", "gru", "--shape", "2,1,3,3"]) == 2
    assert "cell: 'gru' given more than once" in capsys.readouterr().err


def _second_case_raises(monkeypatch, error):
    """benchmark.run_case as it is, but for the second case, which raises `error`."""
    real, calls = benchmark.run_case, []

    def run_case(case, *args, **kwargs):
        calls.append(case)
        if len(calls) == 2:
            raise error
        return real(case, *args, **kwargs)

    monkeypatch.setattr(benchmark, "run_case", run_case)


@pytest.mark.parametrize("error, status, said", [
    (KeyboardInterrupt(), 130, "Interrupted"),
    (MemoryError(), 2, "Not enough memory for LSTM 2,1,3,3"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory"), 2,
     "Not enough memory for LSTM 2,1,3,3"),  # torch's
], ids=["ctrl-c", "out-of-memory", "torch-out-of-memory"])
def test_cli_bench_stopped_early_writes_the_rows_so_far(capsys, tmp_path, monkeypatch, error, status, said):
    _second_case_raises(monkeypatch, error)
    out_file = tmp_path / "partial.json"
    argv = ["bench", "--cell", "gru", "lstm", "--shape", "2,1,3,3", "--peers", "fusedrnn", "--mode", "inference",
            "--rounds", "1", "--repeats", "1", "--json", str(out_file), "--no-progress"]
    assert cli.main(argv) == status
    report = json.loads(out_file.read_text())
    assert [r["cell"] for r in report["rows"]] == ["GRU"] and report["meta"]["interrupted_after_rows"] == 1
    assert f"{said}: 1 of 2 rows timed; writing those" in capsys.readouterr().out


def test_cli_bench_stopped_early_keeps_a_sweep_comparable_and_other_errors_as_they_are(capsys, tmp_path,
                                                                                       monkeypatch):
    # A sweep's partial report names only the values timed (here one: no sweep), so it serves as
    # --compare's OLD.
    _second_case_raises(monkeypatch, KeyboardInterrupt())
    out_file = tmp_path / "partial.json"
    argv = ["bench", "--cell", "gru", "--shape", "2,1,3,3", "--sweep", "batch=1,2,4", "--peers", "fusedrnn",
            "--mode", "inference", "--rounds", "1", "--repeats", "1", "--json", str(out_file), "--no-progress"]
    assert cli.main(argv) == 130
    assert "sweep" not in json.loads(out_file.read_text())["meta"]
    assert len(_bench_report.report_cases(_bench_report.load_report(str(out_file)))) == 1
    _second_case_raises(monkeypatch, RuntimeError("other"))
    with pytest.raises(RuntimeError, match="other"):  # not an out-of-memory error: as it is
        cli.main(argv)
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["bench", "--peers", "nope"], "peers: unknown peer 'nope'"),
    (["bench", "--shape", "1,2,3"], "shape: expected T,B,I,H"),
    (["bench", "--set", "default", "--cell", "gru"], "set: give either --set or --cell/--shape"),
    (["bench", "--peers", "torch-cudnn"], "peers: 'torch-cudnn' runs on cuda, not cpu (--device)"),
])
def test_cli_errors_name_the_option(capsys, argv, message):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(benchmark._cuda_ready(), reason="this machine can run the CUDA peers")
def test_cli_bench_on_cuda_without_a_gpu_says_so(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert "device: 'cuda' needs fusedrnn's CUDA module, torch and a visible GPU" in capsys.readouterr().err


def test_info_via_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "fusedrnn", "info"], capture_output=True, text=True, check=True).stdout
    info = fusedrnn.build_info()
    assert f"fusedrnn {info['version']}" in out and f"SIMD: {info['simd']}" in out
    cuda = info["cuda"]
    cuda_line = ("CUDA: none (fusedrnn " if not cuda["installed"] else
                 f"CUDA: {cuda['source']}, does not load" if not cuda["loaded"] else
                 f"CUDA: {cuda['source']}, built for sm {cuda['architectures']}")
    assert cuda_line in out and info["blas"] in out
    assert f"(default {info['default_num_threads']}: the CPUs this process may run on" in out
    assert "Benchmark peers available: fusedrnn, numpy" in out
    assert "set in the environment" not in out or "OPENBLAS_CORETYPE" in os.environ or "OPENBLAS_L2_SIZE" in os.environ


def test_a_package_that_is_installed_but_fails_to_import_is_named_as_such(tmp_path):
    # A flax whose own dependency is missing: found on the path, yet no peer or module can use it.
    (tmp_path / "flax").mkdir()
    (tmp_path / "flax" / "__init__.py").write_text("import a_dependency_flax_lost\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def run(*args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)

    info = run("-m", "fusedrnn", "info")
    assert info.returncode == 0, info.stderr
    assert ("flax       installed, but fails to import (fusedrnn.jax.nnx, bench peer; the flax extra): "
            "ModuleNotFoundError: No module named 'a_dependency_flax_lost'") in info.stdout
    peers = info.stdout.split("Benchmark peers available: ", 1)[1].split("\n", 1)[0].split(", ")
    assert "fusedrnn" in peers and "flax" not in peers
    bench = run("-m", "fusedrnn", "bench", "--peers", "flax", "--shape", "2,1,2,2", "--rounds", "1")
    assert bench.returncode == 2 and ("peers: 'flax' is not available: the flax package fails to import: "
                                      "ModuleNotFoundError: No module named 'a_dependency_flax_lost'") in bench.stderr
    module = run("-c", "import fusedrnn.jax.nnx")
    assert ("ImportError: this needs flax, which is installed but fails to import: "
            "ModuleNotFoundError: No module named 'a_dependency_flax_lost'") in module.stderr


def test_info_names_openblas_kernels_forced_by_the_environment():
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    plain = subprocess.run([sys.executable, "-m", "fusedrnn", "info"], capture_output=True, text=True, check=True,
                           env=env).stdout
    assert "set in the environment" not in plain
    forced = subprocess.run([sys.executable, "-m", "fusedrnn", "info"], capture_output=True, text=True, check=True,
                            env={**env, "OPENBLAS_CORETYPE": "Prescott"}).stdout
    assert "set in the environment: OPENBLAS_CORETYPE=Prescott (OpenBLAS reads them as it loads" in forced
    def blas_line(out):
        return out.split("BLAS: ", 1)[1].split("\n", 1)[0]
    assert blas_line(forced) != blas_line(plain)  # the build string names the kernels in use


def test_cli_demo_checks_its_plot_path_before_training(capsys, monkeypatch):
    pytest.importorskip("matplotlib")  # without it, --plot is refused for that first
    from fusedrnn import demo

    def never(*args, **kwargs):
        raise AssertionError("trained although --plot was wrong")

    monkeypatch.setattr(demo, "train_forecaster", never)
    monkeypatch.setattr(demo, "gradient_profiles", never)
    for argv in (["--plot", "/nonexistent/d.png"], ["--plot", "noext"], ["--gradients", "--plot", "/"]):
        assert cli.main(["demo", "--no-progress", *argv]) == 2
        assert "plot: " in capsys.readouterr().err
