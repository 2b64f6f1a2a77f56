"""fusedrnn's jobs on torch's OpenMP threads (fusedrnn.torch.use_torch_threads): on by default once
fusedrnn.torch is imported, the same results bit for bit as on fusedrnn's own workers, whatever the
team size, and safe with several calling threads, a fork, and a runtime that grants fewer threads."""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fusedrnn.torch as frt  # noqa: E402
import fusedrnn  # noqa: E402
from fusedrnn import _core  # noqa: E402
from fusedrnn import functional as F  # noqa: E402
from helpers import CELLS, GRAD_NAMES, random_layer  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torch's OpenMP runtime is found on Linux only")


# The start of every child script: fusedrnn with the drop-in imported, a team of `threads`, and the
# weights (w) and input (x) of one layer of `cell`.
CHILD_SETUP = """
import os
import numpy as np
import fusedrnn, fusedrnn.torch as frt
from fusedrnn import functional as F
def layer(cell, threads):
    fusedrnn.set_num_threads(threads)
    gh = {"lstm": 4, "gru": 3}[cell] * 128
    rng = np.random.default_rng(0)
    w = [rng.uniform(-.5, .5, s).astype(np.float32) for s in ((gh, 8), (gh, 128), (gh,), (gh,))]
    return w, rng.standard_normal((5, 24, 8)).astype(np.float32)
"""


def run_python(code: str, **env) -> str:
    script = CHILD_SETUP + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout


def forward_backward(cell, w, x, dy):
    out = F.layer_forward(cell, x, *w.values())
    grads = F.layer_backward(out.tape, dy)
    return [out.y, out.h_n, out.c_n] + [getattr(grads, n) for n in ("dx", "dh0", "dc0") + GRAD_NAMES]


def test_importing_the_drop_in_moves_jobs_onto_torchs_threads():
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import fusedrnn
        before = fusedrnn.build_info()["openmp_runtime"]
        import fusedrnn.torch as frt
        print(before, fusedrnn.build_info()["openmp_runtime"] == frt.torch_openmp_runtime(),
              fusedrnn.build_info()["openmp_runtime"])
    """)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    found = result.stdout.split()
    assert found[:2] == ["None", "True"]
    assert os.path.basename(found[2]).startswith(("libgomp", "libiomp5", "libomp"))
    assert os.path.exists(found[2])


@pytest.mark.parametrize("split", ["rows", "units"], indirect=True)
@pytest.mark.parametrize("team_size", [1, 2, 3, 5], indirect=True, ids=["t1", "t2", "t3", "t5"])
@pytest.mark.parametrize("cell", CELLS)
def test_results_are_the_same_on_torchs_threads_and_fusedrnns(rng, team_size, split, cell):
    w = random_layer(rng, cell, 9, 129, dtype=np.float32)
    x = rng.standard_normal((6, 13, 9)).astype(np.float32)
    dy = rng.standard_normal((6, 13, 129)).astype(np.float32)
    try:
        assert frt.use_torch_threads(True)
        on_torch = forward_backward(cell, w, x, dy)
    finally:
        frt.use_torch_threads(False)
    assert fusedrnn.build_info()["openmp_runtime"] is None
    on_own = forward_backward(cell, w, x, dy)
    for got, expected in zip(on_torch, on_own):
        assert (got is None and expected is None) or np.array_equal(got, expected)


def test_a_runtime_granting_fewer_threads_leaves_the_job_to_fusedrnns_workers():
    # OMP_THREAD_LIMIT=1 gives every parallel region one thread: a team of 3 cannot run its plan there.
    out = run_python("""
        w, x = layer("lstm", threads=3)
        runs = []
        for on_torch in (True, False):
            assert frt.use_torch_threads(on_torch) == on_torch
            out = F.layer_forward("lstm", x, *w)
            runs.append((out.y, F.layer_backward(out.tape, np.ones_like(out.y)).weight_hh))
        print(all(np.array_equal(a, b) for a, b in zip(*runs)))
    """, OMP_THREAD_LIMIT="1")
    assert out.split() == ["True"]


@pytest.mark.parametrize("team_size", [2, 3], indirect=True)
def test_several_python_threads_share_torchs_threads(rng, team_size):
    cell = "gru"
    cases = [(random_layer(rng, cell, 7, 64 + 9 * i, dtype=np.float32),
              rng.standard_normal((5, 11, 7)).astype(np.float32)) for i in range(4)]
    expected = [forward_backward(cell, w, x, np.ones((5, 11, w["weight_hh"].shape[1]), np.float32))
                for w, x in cases]
    results, errors = [None] * len(cases), []

    def work(i):
        try:
            w, x = cases[i]
            for _ in range(5):
                results[i] = forward_backward(cell, w, x, np.ones((5, 11, w["weight_hh"].shape[1]), np.float32))
        except Exception as err:  # noqa: BLE001  (reported by the assertion below)
            errors.append(err)

    try:
        assert frt.use_torch_threads(True)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
    finally:
        frt.use_torch_threads(False)
    assert errors == []
    for got, want in zip(results, expected):
        for a, b in zip(got, want):
            assert (a is None and b is None) or np.array_equal(a, b)


def test_calls_from_other_python_threads_add_no_openmp_pools():
    # libgomp starts a pool of threads for each thread that opens a parallel region (and ends the
    # process when the system refuses one): only the first thread to call runs its jobs on torch's
    # threads, the others on fusedrnn's own workers, so a server's long-lived callers add only themselves.
    out = run_python("""
        import threading
        w, x = layer("gru", threads=4)
        first = F.layer_forward("gru", x, *w).y
        before = len(os.listdir("/proc/self/task"))
        results, release = [], threading.Event()
        def serve(called):
            results.append(F.layer_forward("gru", x, *w).y)
            called.set()
            release.wait()
        callers = []
        for _ in range(3):
            called = threading.Event()
            callers.append(threading.Thread(target=serve, args=(called,)))
            callers[-1].start()
            assert called.wait(60)
        added = len(os.listdir("/proc/self/task")) - before
        release.set()
        for t in callers:
            t.join()
        print(added, all(np.array_equal(y, first) for y in results), fusedrnn.build_info()["openmp_runtime"] is not None)
    """)
    assert out.split() == ["3", "True", "True"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_forked_child_computes_on_fusedrnns_own_workers():
    # An OpenMP runtime's threads do not survive a fork; the child's jobs go back to fusedrnn's workers.
    out = run_python("""
        w, x = layer("gru", threads=2)
        parent = F.layer_forward("gru", x, *w).y
        pid = os.fork()
        if pid == 0:
            ok = (fusedrnn.build_info()["openmp_runtime"] is None
                  and np.array_equal(F.layer_forward("gru", x, *w).y, parent))
            # Asked again, it stays on fusedrnn's workers: the parent's pool is gone.
            ok = ok and frt.use_torch_threads(True) is False and fusedrnn.build_info()["openmp_runtime"] is None
            ok = ok and np.array_equal(F.layer_forward("gru", x, *w).y, parent)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(fusedrnn.build_info()["openmp_runtime"] is not None, os.waitstatus_to_exitcode(status))
    """)
    assert out.split() == ["True", "0"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
@pytest.mark.parametrize("parent_loaded_fusedrnn", [False, True])
def test_a_forked_worker_that_imports_the_drop_in_computes(parent_loaded_fusedrnn):
    # The parent ran torch's OpenMP threads; its forked child imports fusedrnn.torch and calls. The
    # runtime still counts the parent's pool, whose threads the fork did not copy: a job on them would
    # wait for them forever. A child of a parent that never loaded fusedrnn is safe where torch runs
    # one thread there (a DataLoader worker); one whose parent had loaded it (without calling) always,
    # though torch's own parallel operators would hang there, as they do without fusedrnn.
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, time
        import torch
        if {parent_loaded_fusedrnn}:
            import fusedrnn
        a = torch.randn(300, 300)
        (a @ a).sum()
        pid = os.fork()
        if pid == 0:
            if not {parent_loaded_fusedrnn}:
                torch.set_num_threads(1)
            import numpy as np
            import fusedrnn, fusedrnn.torch as frt
            fusedrnn.set_num_threads(2)
            gru, x = fusedrnn.GRU(8, 256), np.ones((10, 16, 8), np.float32)
            gru.eval()
            on_runtime = gru(x)[0]
            frt.use_torch_threads(False)
            os._exit(0 if np.array_equal(on_runtime, gru(x)[0]) else 4)
        for _ in range(600):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print(os.waitstatus_to_exitcode(status))
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
            print("hung")
    """)], capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0"]


def test_bad_runtimes_are_refused_by_name():
    with pytest.raises(TypeError, match="enabled"):
        frt.use_torch_threads("yes")
    with pytest.raises(ValueError, match="library: 'libnot-an-openmp-runtime.so' is not loaded"):
        _core.use_openmp_runtime("libnot-an-openmp-runtime.so")
    with pytest.raises(ValueError, match="no GNU OpenMP entry points"):
        _core.use_openmp_runtime("libc.so.6")
    assert fusedrnn.build_info()["openmp_runtime"] is None
