"""bench/bench_ceiling.py's verdicts and its sgemm yardstick, on made-up rows and a small product."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_ceiling.py"


@pytest.fixture(scope="module")
def ceiling():
    spec = importlib.util.spec_from_file_location("bench_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(fusedrnn_ms, fusedrnn_gflops, peer_ms, peer_gflops):
    return {"fusedrnn_ms": fusedrnn_ms, "fusedrnn_gflops": fusedrnn_gflops,
            "torch_ms": peer_ms, "torch_gflops": peer_gflops}


@pytest.mark.parametrize("shape, fused, peer, sgemm, expected", [
    ("a", (10.0, 500.0), (12.6, 397.0), 480.0, "pass"),   # 1.26x
    ("a", (10.0, 440.0), (11.0, 400.0), 480.0, "pass"),   # 1.10x, but above 90% of sgemm: no room left
    ("a", (10.0, 300.0), (11.0, 273.0), 480.0, "MISS"),   # 1.10x with room: 1.25x needed
    ("a", (10.0, 440.0), (9.5, 463.0), 480.0, "MISS"),    # slower than the peer: the floor never excuses it
    ("b", (10.0, 277.0), (9.9, 280.0), 241.0, "MISS"),    # a forced, slow sgemm would excuse it otherwise
    ("c", (1.0, 100.0), (1.9, 53.0), 480.0, "MISS"),
    ("c", (1.0, 100.0), (2.1, 48.0), 480.0, "pass"),
    (None, (10.0, 300.0), (10.1, 297.0), 480.0, "pass"),  # DeepBench rows: 1x
    (None, (10.0, 300.0), (9.9, 303.0), 480.0, "MISS"),
])
def test_verdicts(ceiling, shape, fused, peer, sgemm, expected):
    v = ceiling.verdict(row(*fused, *peer), ["torch"], shape, sgemm)
    assert v["verdict"] == expected
    assert v["ratio_to_best"] == pytest.approx(peer[0] / fused[0])


def test_best_peer_is_the_fastest(ceiling):
    r = {"fusedrnn_ms": 1.0, "fusedrnn_gflops": 100.0, "torch_ms": 3.0, "torch_gflops": 33.0,
         "jax_ms": 1.9, "jax_gflops": 52.0}
    v = ceiling.verdict(r, ["torch", "jax"], "e", 480.0)
    assert v["best_peer"] == "jax" and v["verdict"] == "MISS"


def test_yardstick_without_openblas_overrides(ceiling, monkeypatch, capsys):
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    assert ceiling.host_sgemm_gflops(1, size=128) > 0
    assert capsys.readouterr().out == ""


def test_yardstick_measured_again_without_the_overrides(ceiling, monkeypatch, capsys):
    """With OPENBLAS_CORETYPE set, a child process measures OpenBLAS's own choice for this CPU too."""
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")
    monkeypatch.setattr(ceiling.benchmark, "sgemm_gflops", lambda threads, size: 1e-6)
    rate = ceiling.host_sgemm_gflops(1, size=128)
    out = capsys.readouterr().out
    assert "OPENBLAS_CORETYPE=Prescott" in out and "without:" in out
    assert rate > 1e-6  # the child's real rate, not the in-process one


def test_mistakes_are_refused_before_anything_is_timed(ceiling, monkeypatch, tmp_path, capsys):
    """An unknown shape letter (a KeyError after the yardstick), a report of another kind for --render (a
    KeyError) and no peer to judge against (min() of nothing, after the first row) end in one line each."""
    monkeypatch.setattr(ceiling, "host_sgemm_gflops", lambda *a: pytest.fail("timed although a choice was wrong"))
    other = tmp_path / "bench.json"
    other.write_text('{"rows": [{"cell": "GRU", "T": 1, "B": 1, "I": 1, "H": 1, "mode": "training"}]}')
    monkeypatch.setattr(ceiling.benchmark.PEERS["torch"], "available", lambda: False)
    monkeypatch.setattr(ceiling.benchmark.PEERS["torch-1t"], "available", lambda: False)
    monkeypatch.setattr(ceiling.benchmark.PEERS["jax"], "available", lambda: False)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    for argv, message in ((["--shapes", "a,z"], "shapes: z not among a, b, c, d, e"),
                          (["--render", str(other)], "is not a report this script wrote"),
                          (["--render", str(listing)], "is not a report this script wrote"),
                          (["--shapes", "c"], "no peer to judge against"),
                          # the options of every bench/ script (benchmark.script_arguments)
                          (["--rounds", "0"], "argument --rounds: expected an int >= 1, got 0"),
                          (["--threads", "0"], "argument --threads: expected an int in [1, "),
                          (["--repeats", "x"], "argument --repeats: expected an int, got 'x'"),
                          (["--json", str(tmp_path / "no" / "r.json")], "--json: the folder ")):
        monkeypatch.setattr("sys.argv", ["bench_ceiling.py", *argv])
        with pytest.raises(SystemExit) as stop:
            ceiling.main()
        assert stop.value.code == 2 and message in capsys.readouterr().err
