"""The thread team under concurrency: teams larger than the machine, jobs of mixed sizes, Python threads
calling at once while another resizes the team, and one module shared by several threads.

Every result is compared bit for bit with a run of the same call on a quiet team of the size it ran
on (the same inputs and thread count give bit-identical results), so a rank that skipped its share or
ran a job twice shows up as a mismatch. Scenarios that could hang if the team's protocol broke run in a
child process with a time limit, so a hang fails the test instead of stalling the suite."""

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fusedrnn
from fusedrnn import functional as F
from fusedrnn import reference
from helpers import CELLS, PARAM_NAMES, assert_close, has_cell_state, make_module, random_layer

CHILD_TIMEOUT_S = 240

# What every child script starts with: layers whose splits use different numbers of ranks, and a
# function that runs one forward and backward and returns every output as one flat array.
PRELUDE = """
import json, threading, time
import numpy as np
import fusedrnn
from fusedrnn import _core, functional as F

# With directions=2, a bidirectional layer's two directions in one core call (w and dy one per
# direction), which runs them at once where that pays.
def layer(seed, cell, steps, batch, inp, hidden, directions=1):
    rng = np.random.default_rng(seed)
    gates = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[cell]
    w = [[rng.uniform(-0.3, 0.3, s).astype(np.float32)
          for s in ((gates * hidden, inp), (gates * hidden, hidden), (gates * hidden,), (gates * hidden,))]
         for _ in range(directions)]
    x = rng.standard_normal((steps, batch, inp)).astype(np.float32)
    dy = [rng.standard_normal((steps, batch, hidden)).astype(np.float32) for _ in range(directions)]
    return cell, x, w, dy

def flat(parts):
    return np.concatenate([np.ravel(p) for p in parts if p is not None])

def forward(case, training):
    cell, x, w, dy = case
    if len(w) == 1:
        outs = [F.layer_forward(cell, x, *w[0], training=training)]
    else:
        y = [np.empty(d.shape, np.float32) for d in dy]
        outs = F._forward_directions(cell, x, [(*wd, None) for wd in w], [None, None], [None, None], None,
                                     training, y, None)
    return outs, flat([a for o in outs for a in (o.y, o.h_n, o.c_n)])

def backward(case, outs):
    if len(outs) == 1:
        grads = [F.layer_backward(outs[0].tape, case[3][0])]
    else:
        grads = F._backward_directions([o.tape for o in outs], case[3], [None, None], [None, None], [None, None])
    return flat([a for g in grads for a in (g.dx, g.dh0, g.dc0, g.weight_ih, g.weight_hh, g.bias_ih, g.bias_hh,
                                             g.dh_norm.astype(np.float32))])

# One call's outputs: (forward's, backward's or None). The team may be resized between the two.
def run(case, training=True):
    out, got = forward(case, training)
    return got, backward(case, out) if training else None

# Quiet runs: forward's outputs by team size, and backward's by (forward's size, backward's size).
def expected_by_size(cases, sizes, training=True):
    fwd, bwd = {}, {}
    for a in sizes:
        fusedrnn.set_num_threads(a)
        outs = [forward(c, training) for c in cases]
        fwd[a] = [got for _, got in outs]
        for b in sizes if training else ():
            fusedrnn.set_num_threads(b)
            bwd[a, b] = [backward(c, out) for c, (out, _) in zip(cases, outs)]
    return fwd, bwd

# Whether a call's outputs equal, bit for bit, a quiet run's on some team size (backward's on some
# size after a forward on a size whose outputs forward's match).
class Resizer:
    # Cycles the team through `sizes` from a thread of its own, one resize every `pause` seconds,
    # while the with-block runs; `count` is how many resizes it made.
    def __init__(self, sizes, pause):
        self.sizes, self.pause, self.count, self.stop = list(sizes), pause, 0, threading.Event()
        self.thread = threading.Thread(target=self.cycle)

    def cycle(self):
        while not self.stop.is_set():
            fusedrnn.set_num_threads(self.sizes[self.count % len(self.sizes)])
            self.count += 1
            time.sleep(self.pause)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

def matches_some_size(got, want, index):
    (got_fwd, got_bwd), (fwd, bwd) = got, want
    sizes = [a for a, outs in fwd.items() if np.array_equal(got_fwd, outs[index])]
    if got_bwd is None:
        return bool(sizes)
    return any(np.array_equal(got_bwd, outs[index]) for (a, b), outs in bwd.items() if a in sizes)
"""


def run_child(body: str) -> dict:
    """Runs PRELUDE + body in a fresh interpreter; the body prints one JSON line with its counts."""
    code = PRELUDE + textwrap.dedent(body)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the child did not finish within {CHILD_TIMEOUT_S} s (a hang); its output: {e.stdout!r}")
    assert out.returncode == 0, f"the child failed with {out.returncode}: {out.stderr[-3000:]}"
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_resizing_while_a_layer_runs_gives_the_planned_answer():
    """A call plans its split from the team's size and holds the team until it is done, so resizing the
    team from another thread applies to the next call: a 2-rank plan must not run on one rank (the
    other rank's units left unwritten). Here forward-only and forward-and-backward calls run while
    another thread cycles the size through 1, 2, 3 and 5, and each output must match one size's."""
    counts = run_child("""
        sizes = (1, 2, 3, 5)
        cases = [layer(0, "lstm", 10, 1, 16, 128), layer(1, "gru", 6, 3, 8, 192)]
        want_fwd = expected_by_size(cases[:1], sizes, training=False)
        want = expected_by_size(cases, sizes)
        calls = mismatches = 0
        with Resizer(sizes, 0.0002) as resizer:
            for i in range(2000):
                calls += 1
                mismatches += not matches_some_size(run(cases[0], training=False), want_fwd, 0)
            for i in range(400):
                for k, case in enumerate(cases):
                    calls += 1
                    mismatches += not matches_some_size(run(case), want, k)
        print(json.dumps({"calls": calls, "mismatches": mismatches, "resizes": resizer.count}))
    """)
    assert counts["calls"] == 2800 and counts["resizes"] > 100
    assert counts["mismatches"] == 0


@pytest.mark.parametrize("team", [3, 5, 8])
def test_workers_outside_a_job_never_run_it(team):
    """A worker that is not part of a job must not act on it, however late it looks: a worker outside a
    job that read the job's thread count apart from its generation, held up between the two until the
    next, larger job is posted, would run that job, then run it again after it had finished (a freed
    job, ranks left waiting at a barrier). The workers here pause 300 us after every post, and
    jobs alternate between 2, 3 and up to the team's size ranks."""
    counts = run_child(f"""
        team = {team}
        fusedrnn.set_num_threads(team)
        # LSTM by units: 2, 3 and 4 ranks (64 units a rank, capped by the team); RNN by rows: up to 8.
        cases = [layer(0, "lstm", 4, 1, 8, 128), layer(1, "lstm", 4, 1, 8, 192),
                 layer(2, "lstm", 3, 2, 8, 256), layer(3, "rnn_tanh", 3, 16, 8, 256)]
        ranks = sorted({{_core.layer_split(c[0], c[1].shape[1], c[2][0][1].shape[1])[0] for c in cases}})
        want = expected_by_size(cases, [team])
        _core.set_team_worker_delay(300)
        calls = mismatches = 0
        for i in range(60):
            for k in (0, 1, 0, 2, 3, 1):
                calls += 1
                mismatches += not matches_some_size(run(cases[k]), want, k)
        _core.set_team_worker_delay(0)
        print(json.dumps({{"calls": calls, "mismatches": mismatches, "ranks": ranks}}))
    """)
    assert counts["calls"] == 360 and counts["mismatches"] == 0
    assert counts["ranks"] == sorted({2, 3, min(team, 4)})  # recurrences on fewer ranks than the team


def test_concurrent_callers_while_the_team_is_resized():
    """Six Python threads run different cells and shapes at once through the functional API while a
    seventh cycles the team through 1 to 8 threads; every result equals a quiet run's on some size. The
    fifth layer has enough rows (320 a rank on 8) that its weight gradients split by rows, each further
    rank summing into a partial of the calling thread's scratch; the sixth is bidirectional, its
    directions run at once on the two parts of the team (each sharing units among its ranks)."""
    counts = run_child("""
        sizes = range(1, 9)
        cases = [layer(0, "lstm", 5, 1, 8, 128), layer(1, "gru", 4, 9, 7, 129),
                 layer(2, "rnn_relu", 6, 24, 5, 200), layer(3, "lstm", 3, 16, 33, 64),
                 layer(4, "lstm", 64, 40, 8, 32), layer(5, "gru", 6, 1, 8, 256, directions=2)]
        want = expected_by_size(cases, sizes)
        results = [[0, 0] for _ in cases]
        def call(k):
            for i in range(150):
                results[k][0] += 1
                results[k][1] += not matches_some_size(run(cases[k]), want, k)
        callers = [threading.Thread(target=call, args=(k,)) for k in range(len(cases))]
        with Resizer(sizes, 0.0005) as resizer:
            for t in callers:
                t.start()
            for t in callers:
                t.join()
        print(json.dumps({"calls": sum(r[0] for r in results), "mismatches": sum(r[1] for r in results),
                          "resizes": resizer.count}))
    """)
    assert counts["calls"] == 900 and counts["resizes"] > 10
    assert counts["mismatches"] == 0


@pytest.mark.parametrize("ending", ["return", "sys.exit(3)", "raise"])
def test_daemon_threads_computing_at_exit_leave_the_exit_status_alone(ending):
    """Daemon threads still in layer calls (forward and backward) when the program ends: each waits in
    the core for the process to end instead of aborting it (SIGABRT from std::terminate, as Python
    before 3.14 ends such threads through pthread_exit while they take the GIL back), so the process
    exits with the status the program gave: 0, 3, or 1 for an uncaught exception. Three runs a case:
    with three threads taking turns at the GIL, the old behaviour aborted every run."""
    body = f"""
        import sys
        cell, x, w, dy = layer(0, "lstm", 40, 4, 32, 64)
        def loop():
            while True:
                out = F.layer_forward(cell, x, *w[0], training=True)
                F.layer_backward(out.tape, dy[0])
        for _ in range(3):
            threading.Thread(target=loop, daemon=True).start()
        time.sleep(0.3)
        print("main ends", flush=True)
        {"pass" if ending == "return" else "raise RuntimeError('the program failed')" if ending == "raise" else ending}
    """
    want = {"return": 0, "sys.exit(3)": 3, "raise": 1}[ending]
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                             timeout=CHILD_TIMEOUT_S)
        assert (out.returncode, out.stdout) == (want, "main ends\n"), out.stderr[-3000:]
        assert "terminate called" not in out.stderr


def test_exit_waits_for_a_daemon_threads_gemm_before_the_blas_is_torn_down():
    """exit() runs the libraries' destructors; OpenBLAS's unmaps the buffers its GEMMs work in. Daemon
    threads whose calls are in their input projections at exit must not meet that: exit waits for the
    running call's team lease and grants no other, so every run ends with the program's status."""
    body = """
        import sys
        x = np.random.default_rng(0).standard_normal((400, 32, 256)).astype(np.float32)
        def loop(seed):
            m = fusedrnn.LSTM(256, 64, seed=seed)
            while True:
                y, _ = m(x)
                m.backward(np.ones_like(y))
        for seed in range(3):
            threading.Thread(target=loop, args=(seed,), daemon=True).start()
        time.sleep(0.05)
        sys.exit(3)
    """
    codes = [subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True,
                            timeout=CHILD_TIMEOUT_S).returncode for _ in range(30)]
    assert codes == [3] * 30


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork (POSIX)")
def test_fork_while_another_thread_computes():
    """A fork copies the team's locks and its condition variable as they are, but not the threads that
    hold or wait on them. A child forked while another thread is mid-call, or while the workers sleep,
    must compute normally on a fresh team, not wait on a lock nobody will release; also after resizing
    it first, without a second set of workers beside the replaced ones (two per rank running each job:
    a crash, a hang or a wrong answer)."""
    counts = run_child("""
        import os, signal
        cases = [layer(0, "lstm", 6, 1, 8, 192), layer(1, "gru", 4, 12, 8, 96)]
        want = expected_by_size(cases, [5, 3])
        stop = threading.Event()
        def compute():
            while not stop.is_set():
                run(cases[0])
        busy = threading.Thread(target=compute)
        busy.start()
        forks = bad = 0
        for i in range(20):
            if i == 10:  # the rest fork from an idle team, its workers asleep
                stop.set()
                busy.join()
                time.sleep(0.02)
            pid = os.fork()
            if pid == 0:
                signal.alarm(10)  # a hung child ends itself, even if this process is killed first
                if i % 2:
                    fusedrnn.set_num_threads(5)
                ok = all(matches_some_size(run(c), want, k) for k, c in enumerate(cases) for _ in range(3))
                if os.path.isdir("/proc/self/task"):  # the calling thread and a worker per other rank
                    ok = ok and len(os.listdir("/proc/self/task")) == (5 if i % 2 else 3)
                os._exit(0 if ok else 1)
            deadline = time.monotonic() + 10
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    status = -1
                    break
                time.sleep(0.005)
            forks += 1
            bad += status != 0
        print(json.dumps({"forks": forks, "bad": bad}))
    """)
    assert counts == {"forks": 20, "bad": 0}


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork (POSIX)")
def test_fork_while_another_thread_adds_a_modules_gradients():
    """A child forked while another thread holds a module's gradients lock (inside its backward) got
    that lock held by a thread it does not have: its own backward waited forever. Children start with
    every module's lock free."""
    status = run_child("""
        import os, signal
        module = fusedrnn.LSTM(3, 4, seed=0)
        x = np.ones((2, 1, 3), np.float32)
        inside, release = threading.Event(), threading.Event()

        def hold():
            inside.set()
            release.wait()

        holder = threading.Thread(target=module._grads_lock.run, args=(hold,))
        holder.start()
        inside.wait()
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)  # a hung child ends itself
            y, _ = module(x)
            module.backward(np.ones_like(y))
            os._exit(0 if np.isfinite(module.grads["weight_hh_l0"]).all() else 1)
        _, status = os.waitpid(pid, 0)
        release.set()
        holder.join()
        print(json.dumps(status))
    """)
    assert status == 0


@pytest.mark.parametrize("team", [3, 4, 6, 8])
@pytest.mark.parametrize("cell", CELLS)
def test_oversubscribed_teams_match_reference(rng, team, cell):
    """Teams of 3 to 8 on this machine's cores: layers whose splits take 1, 2, 3 and more ranks, run
    one after another, each matches the float64 reference, forward and backward."""
    previous = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(team)
    try:
        for steps, batch, inp, hidden in [(3, 2, 4, 16), (4, 1, 5, 128), (3, 1, 4, 200), (3, 20, 6, 96),
                                          (2, 3, 7, 260)]:
            w = random_layer(rng, cell, inp, hidden, scale=0.3)
            x = rng.standard_normal((steps, batch, inp))
            h0 = rng.standard_normal((batch, hidden))
            c0 = rng.standard_normal((batch, hidden)) if has_cell_state(cell) else None
            out = F.layer_forward(cell, x, *w.values(), h0, c0)
            y, h_n, _, cache = reference.forward(cell, x, *w.values(), h0, c0)
            assert_close(out.y, y, np.float64, "y")
            assert_close(out.h_n, h_n, np.float64, "h_n")
            dy = rng.standard_normal(y.shape)
            got = F.layer_backward(out.tape, dy)
            want = reference.backward(cache, dy, None, None)
            for name in ("dx", "dh0") + PARAM_NAMES:
                assert_close(getattr(got, name), want[name], np.float64, name)
    finally:
        fusedrnn.set_num_threads(previous)


def run_threads(target, count):
    """Runs target(k) on `count` threads at once; re-raises the first failure."""
    errors = []

    def guarded(k):
        try:
            target(k)
        except BaseException as e:  # noqa: BLE001 - reported on the main thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=CHILD_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("cell", CELLS)
def test_one_module_in_eval_serves_several_threads(rng, cell):
    module = make_module(cell, 6, 130, num_layers=2, bidirectional=True, seed=1).eval()
    inputs = [rng.standard_normal((5, 3, 6)).astype(np.float32) for _ in range(4)]
    want = [module(x)[0] for x in inputs]
    got = [None] * len(inputs)

    def call(k):
        for _ in range(20):
            y = module(inputs[k])[0]
            assert np.array_equal(y, want[k])
        got[k] = y

    run_threads(call, len(inputs))
    for y, w in zip(got, want):
        assert np.array_equal(y, w)


@pytest.mark.parametrize("cell", CELLS)
def test_one_training_module_shared_by_threads(rng, cell):
    """Each thread's forward is kept for that thread's backward, and the gradients of all threads add
    up in `grads`: the same as running the threads' steps one after another (up to the order of the
    additions)."""
    module = make_module(cell, 5, 70, num_layers=2, seed=2)
    inputs = [rng.standard_normal((6, 4, 5)).astype(np.float32) for _ in range(4)]
    grads_out = [rng.standard_normal((6, 4, 70)).astype(np.float32) for _ in range(4)]
    want_dx = []
    for x, dy in zip(inputs, grads_out):
        module(x)
        want_dx.append(module.backward(dy)[0])
    want_grads = {name: g.copy() for name, g in module.grads.items()}
    module.zero_grad()
    rounds = 5
    got_dx = [None] * len(inputs)

    def call(k):
        for _ in range(rounds):
            module(inputs[k])
            got_dx[k] = module.backward(grads_out[k])[0]
            assert np.array_equal(got_dx[k], want_dx[k])

    run_threads(call, len(inputs))
    for name, g in module.grads.items():
        assert_close(g, rounds * want_grads[name], np.float32, name)
    with pytest.raises(RuntimeError, match="on the same thread"):
        module.backward(grads_out[0])  # every forward was consumed by its own thread


def test_a_pending_forward_belongs_to_its_thread(rng):
    module = fusedrnn.LSTM(3, 8)
    module(rng.standard_normal((2, 1, 3)).astype(np.float32))
    errors = []

    def other_thread():
        try:
            module.backward()
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert errors and "on the same thread" in errors[0]
    assert module.backward()[0].shape == (2, 1, 3)  # the forward is still there for its own thread


def test_gradients_entered_again_by_their_own_thread_raise_while_other_threads_wait(rng):
    """A signal handler that runs a module's backward while that module's backward runs on the same
    thread finds the gradients' lock held by its own thread: it must get a RuntimeError, not wait for
    itself forever; another thread still waits its turn and then adds its gradients."""
    module = fusedrnn.GRU(3, 8, seed=0)
    x = rng.standard_normal((4, 2, 3)).astype(np.float32)
    dy = rng.standard_normal((4, 2, 8)).astype(np.float32)
    module(x)

    def handler_inside_backward():  # what a handler finds inside backward
        with pytest.raises(RuntimeError, match="^this module's gradients are being changed by this thread"):
            module.backward(dy)

    module._grads_lock.run(handler_inside_backward)
    module.zero_grad()
    module(x)
    module.backward(dy)
    once = {k: v.copy() for k, v in module.grads.items()}

    done = threading.Event()

    def other_thread():
        module(x)
        module.backward(dy)
        done.set()

    def start_other_thread():
        thread = threading.Thread(target=other_thread)
        thread.start()
        assert not done.wait(0.3)  # waiting for the lock, not refused
        return thread

    t = module._grads_lock.run(start_other_thread)
    t.join(CHILD_TIMEOUT_S)
    assert done.is_set()
    for k, v in module.grads.items():
        np.testing.assert_array_equal(v, 2 * once[k])
