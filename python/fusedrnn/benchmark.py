"""The microbenchmark harness: fusedrnn against its peers on the same shapes, weights and inputs, in one
process, alternating round by round so drift on a shared machine hits all alike.

Each case times inference (forward) and/or training (forward + backward). A row reports, per peer, the
median over rounds of the per-round median time, the spread (max - min of the round medians, as % of
the median), GFLOP/s from the standard count (forward 2*T*B*(I+R)*G*H, R = H or, with a projection P,
2*T*B*((I+P)*4H + P*H); training 3x that), and beside every peer but the first the ratio of times
peer / first peer (column "peer/first", JSON speedup_vs_{peer}; > 1: the first peer, fusedrnn unless
--peers names another first, is faster).

A row also keeps every timed call ({peer}_times_ms: per round, the repeats' times in ms), and the JSON's
meta the peers, threads, host CPU (/proc/cpuinfo's model name) and versions, so a later run can be
judged against it (`fusedrnn bench --compare`).

Peers are pluggable: `register_peer(name, factory, requires=...)` where the factory builds, for one
case, the two callables to time (see `Runners`). A peer runs on the CPU or, `device="cuda"`, on the
current CUDA device; its callables then wait for the device before returning, so the time is the
device's.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np

from . import _checks, _core
from ._optional import NOT_INSTALLED, import_problem
from .datasets import deepbench_shapes
from .functional import CELLS, GATES

MODES = ("inference", "training")


@dataclass(frozen=True)
class Case:
    cell: str                       # "lstm", "gru", "rnn_tanh" or "rnn_relu"
    steps: int                      # T
    batch: int                      # B
    input_size: int                 # I
    hidden: int                     # H
    modes: tuple = MODES
    proj_size: int = 0              # P: an LSTM with a projection (torch.nn's proj_size), 0: none

    @property
    def state_size(self) -> int:
        """R, the width of h and y: P with a projection, else H."""
        return self.proj_size or self.hidden

    @property
    def label(self) -> str:
        """The row's cell: "LSTM", "GRU", ... and "LSTMP{P}" for an LSTM with a projection."""
        return self.cell.upper() + (f"P{self.proj_size}" if self.proj_size else "")

    def module_kwargs(self) -> dict:
        return {"proj_size": self.proj_size} if self.proj_size else {}

    def flops(self, mode: str) -> float:
        per_row = GATES[self.cell] * self.hidden * (self.input_size + self.state_size) + self.proj_size * self.hidden
        forward = 2.0 * self.steps * self.batch * per_row
        return forward * (3.0 if mode == "training" else 1.0)


class Runners(NamedTuple):
    """What a peer times for one case: `infer()` runs the forward pass, `train()` forward + backward."""
    infer: Callable[[], None]
    train: Callable[[], None]


class Problem(NamedTuple):
    """The shared inputs of one case: every peer gets the same weights (torch.nn names) and data."""
    case: Case
    state_dict: dict                # name -> float32 array
    x: np.ndarray                   # (T, B, I) float32
    dy: np.ndarray                  # (T, B, R) float32


@dataclass
class Peer:
    name: str
    factory: Callable[[Problem], Runners]
    requires: str | None = None                       # a module that must be importable
    set_threads: Callable[[int], None] | None = None  # called once before timing
    version: Callable[[], str] | None = None
    device: str = "cpu"                               # or "cuda"
    projection: bool = True                           # runs an LSTM with a projection (proj_size)
    threads: int | None = None                        # the threads it always runs on, where fixed

    def available(self) -> bool:
        if self.requires is not None and import_problem(self.requires) is not None:
            return False
        return self.device == "cpu" or _cuda_ready()


PEERS: dict[str, Peer] = {}


def register_peer(name: str, factory: Callable[[Problem], Runners], *, requires: str | None = None,
                  set_threads: Callable[[int], None] | None = None,
                  version: Callable[[], str] | None = None, device: str = "cpu", projection: bool = True,
                  threads: int | None = None) -> None:
    """Adds a peer (replacing one of the same name)."""
    PEERS[name] = Peer(name, factory, requires, set_threads, version, device, projection, threads)


def available_peers(device: str = "cpu", cases: Sequence[Case] = ()) -> list[str]:
    """The installed peers for `device` that can run every one of `cases`."""
    projected = any(c.proj_size for c in cases)
    return [name for name, peer in PEERS.items()
            if peer.device == device and peer.available() and (peer.projection or not projected)]


def _cuda_ready() -> bool:
    """fusedrnn's CUDA module loads, and torch (which the CUDA peers' tensors come from) sees a GPU."""
    from . import cuda_info

    if not cuda_info()["loaded"] or import_problem("torch") is not None:
        return False
    import torch
    return torch.cuda.is_available()


# ---- the built-in peers -----------------------------------------------------------------------------


def _fusedrnn_runners(problem: Problem) -> Runners:
    from .modules import make_module

    c = problem.case
    m = make_module(c.cell, c.input_size, c.hidden, **c.module_kwargs())
    m.load_state_dict(problem.state_dict)

    def infer():
        m.eval()
        m(problem.x)

    def train():
        m.train()
        m(problem.x)
        m.backward(problem.dy)

    return Runners(infer, train)


def _numpy_runners(problem: Problem) -> Runners:
    from . import reference

    c = problem.case
    w = [problem.state_dict.get(f"{n}_l0") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    w_hr = problem.state_dict.get("weight_hr_l0")

    def infer():
        reference.forward(c.cell, problem.x, *w, weight_hr=w_hr)

    def train():
        *_, cache = reference.forward(c.cell, problem.x, *w, weight_hr=w_hr)
        reference.backward(cache, problem.dy)

    return Runners(infer, train)


def _torch_module(c: Case):
    import torch

    if c.cell == "lstm":
        return torch.nn.LSTM(c.input_size, c.hidden, **c.module_kwargs())
    if c.cell == "gru":
        return torch.nn.GRU(c.input_size, c.hidden)
    return torch.nn.RNN(c.input_size, c.hidden, nonlinearity=c.cell[len("rnn_"):])


def torch_module_runners(module, x, dy) -> Runners:
    """Inference (under no_grad) and a training step (zero_grad, forward with a gradient for x,
    backward of dy) of a torch recurrent module on tensors x (T, B, I) and dy (T, B, H)."""
    import torch

    def infer():
        with torch.no_grad():
            module(x)

    def train():
        module.zero_grad()
        y, _ = module(x.detach().requires_grad_())
        y.backward(dy)

    return Runners(infer, train)


def _torch_problem_module(problem: Problem):
    """torch.nn's module for the case, loaded with the problem's weights, and the problem's tensors."""
    import torch

    m = _torch_module(problem.case)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in problem.state_dict.items()})
    return m, torch.from_numpy(problem.x), torch.from_numpy(problem.dy)


def _torch_runners(problem: Problem) -> Runners:
    return torch_module_runners(*_torch_problem_module(problem))


def _set_fusedrnn_threads(n: int) -> None:
    from . import set_num_threads
    set_num_threads(n)


def _set_torch_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)


def _fusedrnn_version() -> str:
    from . import __version__
    return __version__


def _torch_version() -> str:
    import torch
    return torch.__version__


register_peer("fusedrnn", _fusedrnn_runners, set_threads=_set_fusedrnn_threads, version=_fusedrnn_version)
# The plain float64 reference: a loop over time in NumPy, for scale (it computes in float64).
register_peer("numpy", _numpy_runners, version=lambda: np.__version__)
register_peer("torch", _torch_runners, requires="torch", set_threads=_set_torch_threads, version=_torch_version)


def _torch_single_thread_runners(problem: Problem) -> Runners:
    """torch.nn on one thread, whatever the others use: at small batch torch is faster that way."""
    import torch

    runners = _torch_runners(problem)

    def on_one_thread(fn):
        def run():
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                fn()
            finally:
                torch.set_num_threads(threads)
        return run

    return Runners(on_one_thread(runners.infer), on_one_thread(runners.train))


def jax_cell_step(cell: str, x_proj, h, c, w_hh, b_hh, w_hr=None):
    """One step of `cell` in plain JAX, written from torch.nn's equations: x_proj is the step's input
    projection x W_ih^T + b_ih; returns (h, c), c passed through for the cells without a cell state."""
    import jax
    import jax.numpy as jnp

    hh = h @ w_hh.T + b_hh
    if cell == "lstm":
        i, f, g, o = jnp.split(x_proj + hh, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h if w_hr is None else h @ w_hr.T), c
    if cell == "gru":
        xr, xz, xn = jnp.split(x_proj, 3, axis=-1)
        hr, hz, hn = jnp.split(hh, 3, axis=-1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        return (1 - z) * jnp.tanh(xn + r * hn) + z * h, c
    pre = x_proj + hh
    return (jnp.tanh(pre) if cell == "rnn_tanh" else jax.nn.relu(pre)), c


def jax_scan_forward(problem: Problem):
    """(forward, params): the problem's layer in plain JAX, forward(params, x) -> y (T, B, H), a
    `lax.scan` over the steps with the input projection of all steps hoisted out of it, as the fused
    kernels do; params the problem's weights as a tuple."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    c = problem.case
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") + (("weight_hr",) if c.proj_size else ())
    params = tuple(jnp.asarray(problem.state_dict[f"{n}_l0"]) for n in names)

    def step(carry, xg_t, w_hh, b_hh, w_hr):
        h, cs = jax_cell_step(c.cell, xg_t, *carry, w_hh, b_hh, w_hr)
        return (h, cs), h

    def forward(params, x):
        w_ih, w_hh, b_ih, b_hh, w_hr = params + (None,) * (5 - len(params))
        xg = x @ w_ih.T + b_ih
        h0 = jnp.zeros((x.shape[1], w_hh.shape[1]), x.dtype)
        c0 = jnp.zeros((x.shape[1], c.hidden), x.dtype)
        _, ys = lax.scan(lambda carry, xg_t: step(carry, xg_t, w_hh, b_hh, w_hr), (h0, c0), xg)
        return ys

    return forward, params


def _jax_runners(problem: Problem) -> Runners:
    """The same cell as `jax.jit` over `lax.scan` (jax_scan_forward); training is `jax.grad` of
    sum(y * dy) for the weights and x."""
    import jax.numpy as jnp

    forward, params = jax_scan_forward(problem)
    return jax_runners(forward, params, jnp.asarray(problem.x), jnp.asarray(problem.dy))


def _jax_version() -> str:
    import jax
    return jax.__version__


def _fusedrnn_torch_runners(problem: Problem) -> Runners:
    """fusedrnn.torch's drop-in module, called exactly as torch.nn's is."""
    from .torch import modules as frt

    m, x, dy = _torch_problem_module(problem)
    return torch_module_runners(frt.convert(m), x, dy)


def jax_runners(forward, params, x, dy) -> Runners:
    """Inference (`jax.jit` of forward(params, x)) and training (`jax.jit` of `jax.grad` of
    sum(forward(params, x) * dy) for params and x) of a JAX forward function returning y (T, B, H)."""
    import jax
    import jax.numpy as jnp

    infer_fn = jax.jit(forward)
    train_fn = jax.jit(jax.grad(lambda p, x, dy: jnp.sum(forward(p, x) * dy), argnums=(0, 1)))

    def infer():
        jax.block_until_ready(infer_fn(params, x))

    def train():
        jax.block_until_ready(train_fn(params, x, dy))

    return Runners(infer, train)


def _fusedrnn_jax_runners(problem: Problem) -> Runners:
    """fusedrnn.jax's fused layer (XLA FFI calls) under jax.jit and jax.grad."""
    import jax.numpy as jnp

    from . import jax as fj

    params = {k: jnp.asarray(v) for k, v in problem.state_dict.items()}
    cell = problem.case.cell
    return jax_runners(lambda p, x: fj.forward(cell, p, x)[0], params, jnp.asarray(problem.x),
                       jnp.asarray(problem.dy))


def _flax_runners(problem: Problem) -> Runners:
    """Flax's nn.RNN (a lax.scan) over OptimizedLSTMCell, GRUCell or SimpleCell, with the problem's
    weights converted to Flax's layout (SimpleCell: its own initialisation; the time does not depend
    on the values)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from .jax import flax_params

    c = problem.case
    x, dy = jnp.asarray(problem.x), jnp.asarray(problem.dy)
    if c.cell in ("lstm", "gru"):
        cell = nn.OptimizedLSTMCell(c.hidden) if c.cell == "lstm" else nn.GRUCell(c.hidden)
        tree = flax_params.to_flax(c.cell, problem.state_dict)
    else:
        cell = nn.SimpleCell(c.hidden, activation_fn=jnp.tanh if c.cell == "rnn_tanh" else jax.nn.relu)
        tree = nn.RNN(cell, time_major=True).init(jax.random.key(0), x)["params"]["cell"]
    model = nn.RNN(cell, time_major=True)
    return jax_runners(lambda p, x: model.apply({"params": {"cell": p}}, x), tree, x, dy)


def _flax_version() -> str:
    import flax
    return flax.__version__


register_peer("torch-1t", _torch_single_thread_runners, requires="torch", version=_torch_version, threads=1)
register_peer("fusedrnn.torch", _fusedrnn_torch_runners, requires="torch", set_threads=_set_fusedrnn_threads,
              version=_fusedrnn_version)
register_peer("jax", _jax_runners, requires="jax", version=_jax_version)
if hasattr(_core, "jax_ffi_targets"):  # a build with fusedrnn.jax's handlers
    register_peer("fusedrnn.jax", _fusedrnn_jax_runners, requires="jax", set_threads=_set_fusedrnn_threads,
                  version=_jax_version)
register_peer("flax", _flax_runners, requires="flax", version=_flax_version, projection=False)


# ---- CUDA peers: torch CUDA tensors on the current device --------------------------------------------


def _synchronized(fn):
    import torch

    def run():
        fn()
        torch.cuda.synchronize()
    return run


def _fusedrnn_cuda_runners(problem: Problem, recurrence: str = "auto", graphs: bool = False) -> Runners:
    """fusedrnn's CUDA backend through the layer-stack driver on torch CUDA tensors (no autograd), its
    recurrence chosen as `recurrence` (_cuda_layer.set_recurrence) and per-step loops replayed as CUDA
    Graphs or not (the CUDA module's set_graphs) during each call."""
    import torch

    from . import _cuda_layer, _stack

    cuda = _cuda_layer.cuda_module()

    c = problem.case
    on_gpu = {k: torch.from_numpy(v).cuda() for k, v in problem.state_dict.items()}
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") + (("weight_hr",) if c.proj_size else ())
    weights = [[tuple(on_gpu.get(f"{n}_l0") for n in names)]]
    x, dy = torch.from_numpy(problem.x).cuda(), torch.from_numpy(problem.dy).cuda()

    def infer():
        _stack.forward(c.cell, x, weights, training=False)

    def train():
        out = _stack.forward(c.cell, x, weights, training=True)
        grads = [[tuple(None if w is None else torch.zeros_like(w) for w in weights[0][0])]]
        _stack.backward(out.tapes, dy, dropout_masks=out.dropout_masks, grads=grads)

    def choosing(fn):
        def run():
            previous, previous_graphs = _cuda_layer.set_recurrence(recurrence), cuda.graphs()
            cuda.set_graphs(graphs)
            try:
                fn()
            finally:
                _cuda_layer.set_recurrence(previous)
                cuda.set_graphs(previous_graphs)
        return _synchronized(run)

    return Runners(choosing(infer), choosing(train))


def _torch_cuda_runners(problem: Problem, tf32: bool) -> Runners:
    """torch.nn (cuDNN) on the GPU, with TF32 tensor cores allowed or not (set around each call)."""
    import torch

    m, x, dy = _torch_problem_module(problem)
    runners = torch_module_runners(m.cuda(), x.cuda(), dy.cuda())

    def with_tf32(fn):
        def run():
            previous = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = tf32
            try:
                fn()
            finally:
                torch.backends.cudnn.allow_tf32 = previous
        return _synchronized(run)

    return Runners(with_tf32(runners.infer), with_tf32(runners.train))


def _fusedrnn_torch_cuda_runners(problem: Problem) -> Runners:
    """fusedrnn.torch's drop-in module on the GPU, called exactly as torch.nn's is."""
    from .torch import modules as frt

    m, x, dy = _torch_problem_module(problem)
    runners = torch_module_runners(frt.convert(m).cuda(), x.cuda(), dy.cuda())
    return Runners(_synchronized(runners.infer), _synchronized(runners.train))


register_peer("fusedrnn-cuda", _fusedrnn_cuda_runners, requires="torch", version=_fusedrnn_version, device="cuda")
register_peer("fusedrnn-cuda-per-step", lambda p: _fusedrnn_cuda_runners(p, "per_step"), requires="torch",
              version=_fusedrnn_version, device="cuda")
register_peer("fusedrnn-cuda-persistent", lambda p: _fusedrnn_cuda_runners(p, "persistent"), requires="torch",
              version=_fusedrnn_version, device="cuda")
register_peer("fusedrnn-cuda-graphs", lambda p: _fusedrnn_cuda_runners(p, "per_step", graphs=True), requires="torch",
              version=_fusedrnn_version, device="cuda")
register_peer("torch-cudnn", lambda p: _torch_cuda_runners(p, tf32=False), requires="torch", version=_torch_version,
              device="cuda")
register_peer("torch-cudnn-tf32", lambda p: _torch_cuda_runners(p, tf32=True), requires="torch",
              version=_torch_version, device="cuda")
register_peer("fusedrnn.torch-cuda", _fusedrnn_torch_cuda_runners, requires="torch", version=_fusedrnn_version,
              device="cuda")


def saved_for_backward_nbytes(problem: Problem, libraries=("fusedrnn", "torch")) -> dict:
    """Bytes each of `libraries` keeps for backward after a training forward of this problem, beyond
    the input and weights it references: fusedrnn's tapes; torch.nn's autograd saved tensors (counted
    by storage, once each, through saved_tensors_hooks), where torch is installed."""
    from .modules import make_module

    c = problem.case
    m = make_module(c.cell, c.input_size, c.hidden, **c.module_kwargs())
    m.load_state_dict(problem.state_dict)
    m.train()
    m(problem.x)
    result = {"fusedrnn": m.saved_nbytes}
    if "torch" in libraries and import_problem("torch") is None:
        import torch

        tm = _torch_module(c)
        tm.load_state_dict({k: torch.from_numpy(v) for k, v in problem.state_dict.items()})
        x = torch.from_numpy(problem.x).requires_grad_()
        referenced = {p.untyped_storage().data_ptr() for p in tm.parameters()} | {x.untyped_storage().data_ptr()}
        saved = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in referenced:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tm(x)
        result["torch"] = sum(saved.values())
    return result


# ---- cases ----------------------------------------------------------------------------------------------

DEFAULT_SHAPES = [(100, 32, 256, 256), (200, 1, 128, 128)]  # T, B, I, H
DEFAULT_CELLS = ("lstm", "gru", "rnn_tanh")
# The "projection" set: LSTMs with a projection (LSTMP) at the default shapes, P = H/2.
PROJECTION_CASES = [Case("lstm", t, b, i, h, proj_size=h // 2) for t, b, i, h in DEFAULT_SHAPES]


def parse_label(label: str) -> tuple[str, int]:
    """(cell, proj_size) of a row's cell (Case.label)."""
    name = label.lower()
    projected = re.fullmatch(r"lstmp(\d+)", name)
    return ("lstm", int(projected.group(1))) if projected else (name, 0)


def cases_for(cells: Sequence[str], shapes: Sequence[tuple], modes: Sequence[str] = MODES) -> list[Case]:
    """Every cell at every (T, B, I, H) shape, shape by shape."""
    for cell in cells:
        if cell not in CELLS:
            raise ValueError(f"cells: expected names from {CELLS}, got {cell!r}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes: expected names from {MODES}, got {mode!r}")
    return [Case(cell, *shape, modes=tuple(modes)) for shape in shapes for cell in cells]


def named_cases(name: str) -> list[Case]:
    """"default" (the cells and shapes of the README's table), "projection" (LSTMs with a projection at
    those shapes) or a DeepBench set: "training_set" (timed training), "inference_server_set" or
    "inference_device_set" (timed inference)."""
    if name == "default":
        return cases_for(DEFAULT_CELLS, DEFAULT_SHAPES)
    if name == "projection":
        return list(PROJECTION_CASES)
    rows = [s for s in deepbench_shapes() if s.set == name]
    if not rows:
        sets = sorted({s.set for s in deepbench_shapes()})
        raise ValueError(f"set: expected 'default', 'projection' or one of {sets}, got {name!r}")
    mode = ("training",) if name.startswith("training") else ("inference",)
    return [Case(s.cell, s.timesteps, s.batch, s.hidden, s.hidden, modes=mode) for s in rows]


def make_problem(case: Case, seed: int = 0) -> Problem:
    from .modules import make_module

    rng = np.random.default_rng(seed)
    weights = make_module(case.cell, case.input_size, case.hidden, seed=seed, **case.module_kwargs()).state_dict()
    x = rng.standard_normal((case.steps, case.batch, case.input_size), dtype=np.float32)
    dy = rng.standard_normal((case.steps, case.batch, case.state_size), dtype=np.float32)
    return Problem(case, weights, x, dy)


# ---- timing ----------------------------------------------------------------------------------------------


def time_calls(fn: Callable[[], None], repeats: int) -> list[float]:
    """The times of `repeats` calls, in seconds."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


# Pause before each runner's turn: thread pools (OpenMP's, XLA's, fusedrnn's) spin for a while after
# their last call, and a library timed right after another would otherwise share the cores with the
# previous one's spinning workers.
SETTLE_SECONDS = 0.05


def alternate_rounds(fns: dict, rounds: int, repeats: int,
                     on_round: Callable[[], None] | None = None) -> dict:
    """Per key, the median time of `repeats` calls in each of `rounds` rounds (see `alternate_samples`)."""
    return {key: [statistics.median(times) for times in per_round]
            for key, per_round in alternate_samples(fns, rounds, repeats, on_round).items()}


def alternate_samples(fns: dict, rounds: int, repeats: int,
                      on_round: Callable[[], None] | None = None) -> dict:
    """Per key, the times of `repeats` calls in each of `rounds` rounds (a list per round); each round
    runs every callable in turn, so drift on a shared machine hits them alike. Two untimed calls first
    warm up first-call allocation and thread start-up."""
    for fn in fns.values():
        fn()
        fn()
    samples = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            time.sleep(SETTLE_SECONDS)
            fn()  # untimed: wakes the library's threads after the pause
            samples[key].append(time_calls(fn, repeats))
        if on_round is not None:
            on_round()
    return samples


def sgemm_gflops(threads: int, size: int = 4096, repeats: int = 3) -> float:
    """GF/s of fusedrnn's own OpenBLAS on one float32 (size, size) @ (size, size) product with `threads`
    threads, best of `repeats`: what a tuned GEMM reaches on this host, with the kernels OpenBLAS picks
    for its CPU (or OPENBLAS_CORETYPE, where set). The yardstick for rows whose peer already runs near
    the FMA peak (bench/bench_ceiling.py)."""
    lib = ctypes.CDLL(_core.blas_library())
    sgemm = lib.scipy_cblas_sgemm
    pointer = ctypes.POINTER(ctypes.c_float)
    sgemm.restype = None
    sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, pointer, ctypes.c_int, pointer, ctypes.c_int,
                                           ctypes.c_float, pointer, ctypes.c_int]
    row_major, no_trans = 101, 111  # cblas.h's CblasRowMajor, CblasNoTrans
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    c = np.empty((size, size), np.float32)
    args = [row_major, no_trans, no_trans, size, size, size, 1.0, a.ctypes.data_as(pointer), size,
            b.ctypes.data_as(pointer), size, 0.0, c.ctypes.data_as(pointer), size]
    lib.scipy_openblas_set_num_threads(threads)
    try:
        sgemm(*args)  # untimed: starts OpenBLAS's threads
        best = min(time_calls(lambda: sgemm(*args), repeats))
    finally:
        lib.scipy_openblas_set_num_threads(1)  # fusedrnn calls its BLAS from its own team, one thread each
    return 2.0 * size**3 / best / 1e9


def timed_row(fns: dict, rounds: int, repeats: int, **fields) -> dict:
    """`fields` with each of `fns`' timing_fields, the functions timed by alternate_rounds."""
    medians = alternate_rounds(fns, rounds, repeats)
    for name in fns:
        fields.update(timing_fields(name, medians[name]))
    return fields


def timing_fields(name: str, round_medians: Sequence[float], work: float | None = None) -> dict:
    """{name}_ms (median of the round medians), {name}_spread_pct ((max - min) / median) and, given
    the work in FLOPs, {name}_gflops."""
    med = statistics.median(round_medians)
    fields = {f"{name}_ms": med * 1e3,
              f"{name}_spread_pct": (max(round_medians) - min(round_medians)) / med * 100}
    if work is not None:
        fields[f"{name}_gflops"] = work / med / 1e9
    return fields


def run_case(case: Case, peers: Sequence[str], *, rounds: int = 5, repeats: int = 10,
             on_round: Callable[[], None] | None = None, memory: bool = False) -> list[dict]:
    """Times one case on every peer; one row per mode. The first peer is the one the others are
    compared with: speedup_vs_{peer} = peer time / first peer's time. Each row keeps every timed call
    as {peer}_times_ms (a list of the repeats' times per round). With `memory`, each row also gets the
    fields of `_bench_memory.memory_fields` (bytes kept for backward, peak resident growth of a call)."""
    problem = make_problem(case)
    fns = {}
    for name in peers:
        runners = PEERS[name].factory(problem)
        for mode in case.modes:
            fns[(name, mode)] = runners.infer if mode == "inference" else runners.train
    samples = alternate_samples(fns, rounds, repeats, on_round)
    if memory:
        from ._bench_memory import memory_fields
        memory_rows = memory_fields(problem, fns)
    rows = []
    for mode in case.modes:
        row = {"cell": case.label, "T": case.steps, "B": case.batch, "I": case.input_size,
               "H": case.hidden, "mode": mode}
        for name in peers:
            per_round = samples[(name, mode)]
            row.update(timing_fields(name, [statistics.median(times) for times in per_round], case.flops(mode)))
            row[f"{name}_times_ms"] = [[t * 1e3 for t in times] for times in per_round]
        for name in peers[1:]:
            row[f"speedup_vs_{name}"] = row[f"{name}_ms"] / row[f"{peers[0]}_ms"]
        if memory:
            row.update(memory_rows[mode])
        rows.append(row)
    return rows


def script_arguments(doc: str, default_repeats: int):
    """The options every script in bench/ takes: --threads, --rounds, --repeats, --json. Returns the
    parser, so a script can add its own."""
    import argparse

    from . import _bench_report
    from .cli import _positive_int, _thread_count

    class ScriptParser(argparse.ArgumentParser):
        def parse_args(self, *args, **kwargs):
            """The options, --json's file tried before anything is timed."""
            parsed = super().parse_args(*args, **kwargs)
            if parsed.json is not None:
                try:
                    _bench_report.check_output_path(parsed.json, "--json")
                except ValueError as err:
                    self.error(str(err))
            return parsed

    parser = ScriptParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=_thread_count, default=2, help="threads of fusedrnn and torch (default 2)")
    parser.add_argument("--rounds", type=_positive_int, default=5, help="rounds (default 5)")
    parser.add_argument("--repeats", type=_positive_int, default=default_repeats,
                        help=f"timed calls per round (default {default_repeats})")
    parser.add_argument("--json", help="also write the rows to this file")
    return parser


def check_peers(peers: Sequence[str], device: str = "cpu", cases: Sequence[Case] = ()) -> list[str]:
    """The peers, each known, installed, for `device` and able to run every one of `cases`, given once."""
    if device == "cuda" and not _cuda_ready():
        raise ValueError("device: 'cuda' needs fusedrnn's CUDA module, torch and a visible GPU")
    _checks.distinct("peers", peers)
    for name in peers:
        if name not in PEERS:
            raise ValueError(f"peers: unknown peer {name!r}; known: {sorted(PEERS)}")
        if PEERS[name].device != device:
            raise ValueError(f"peers: {name!r} runs on {PEERS[name].device}, not {device} (--device)")
        if not PEERS[name].available():  # a CUDA peer's GPU was checked above: its package is the cause
            requires = PEERS[name].requires
            problem = import_problem(requires)
            raise ValueError(f"peers: {name!r} is not available: the {requires} package "
                             f"{'is not installed' if problem == NOT_INSTALLED else 'fails to import: ' + problem}")
        if not PEERS[name].projection and any(c.proj_size for c in cases):
            raise ValueError(f"peers: {name!r} has no LSTM with a projection (proj_size), which these cases use")
    return list(peers)


def set_threads(peers: Sequence[str], threads: int) -> None:
    for name in peers:
        if PEERS[name].set_threads is not None:
            PEERS[name].set_threads(threads)


def peer_threads(peers: Sequence[str], threads: int) -> dict:
    """Each peer's host threads: `threads` where the run sets them, the peer's own fixed count (torch-1t:
    1), "gpu" for a CUDA peer, else "own" (JAX's XLA and NumPy's BLAS keep pools of their own, sized by
    the host)."""
    def of(peer: Peer):
        if peer.set_threads is not None:
            return threads
        if peer.threads is not None:
            return peer.threads
        return "gpu" if peer.device == "cuda" else "own"
    return {name: of(PEERS[name]) for name in peers}


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def describe_run(meta: dict) -> str:
    """One line of what a table's figures depend on: the CPU (or GPU), each peer's threads, rounds and
    repeats."""
    by_kind: dict = {}
    for name, kind in meta["peer_threads"].items():
        by_kind.setdefault(kind, []).append(name)
    parts = []
    for kind, names in by_kind.items():
        if kind == "own":
            pools = "its own thread pool" if len(names) == 1 else "their own thread pools"
            parts.append(f"{', '.join(names)} on {pools} ({os.cpu_count()} CPUs here)")
        elif kind == "gpu":
            parts.append(f"{', '.join(names)} on {meta.get('gpu', 'the current GPU')}")
        else:
            parts.append(f"{_plural(kind, 'thread')} for {', '.join(names)}")
    return (f"{meta['cpu']}; {'; '.join(parts)}; {_plural(meta['rounds'], 'round')} of "
            f"{_plural(meta['repeats'], 'call')}, alternating peers")


def cpu_model() -> str:
    """The host CPU's model name as /proc/cpuinfo (and lscpu) give it, with its vendor, family and model
    numbers where Linux reports them: virtual machines often name only "AMD EPYC", and the family tells
    the microarchitecture apart (AMD family 25: Zen 3 and 4, 26: Zen 5). Elsewhere, platform's word."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" ({fields.get('vendor_id', 'vendor unknown')} family {fields['cpu family']} model {fields['model']})"
    return name


# The environment variables that override OpenBLAS's own choice of kernels and blocking for this CPU.
OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def openblas_overrides() -> dict:
    """Those of OPENBLAS_OVERRIDES the environment sets, with their values."""
    return {name: os.environ[name] for name in OPENBLAS_OVERRIDES if name in os.environ}


def metadata(peers: Sequence[str], threads: int, rounds: int, repeats: int) -> dict:
    """What a later reader (and `--compare`) needs to judge the rows: the peers in column order, the
    run's settings, the host CPU, fusedrnn's SIMD level and BLAS (OpenBLAS's build string names the
    kernels it picked, or those OPENBLAS_CORETYPE forced) and the version of every peer."""
    meta = {"peers": list(peers), "threads": threads, "peer_threads": peer_threads(peers, threads),
            "rounds": rounds, "repeats": repeats,
            "machine": platform.processor() or platform.machine(), "cpu": cpu_model(),
            "simd": _core.simd_level(), "blas": _core.blas_config(), "openblas_overrides": openblas_overrides(),
            "python": platform.python_version(), "platform": sys.platform}
    if any(PEERS[name].device == "cuda" for name in peers):  # such peers need torch (_cuda_ready)
        import torch
        meta["gpu"] = torch.cuda.get_device_name()
    for name in peers:
        if PEERS[name].version is not None:
            meta[name] = PEERS[name].version()
    return meta


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    try:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    except OSError as err:  # a full disk fails at the write or the close, with no file name
        raise OSError(err.errno, f"cannot be written ({err.strerror})", path) from err


# ---- the table ------------------------------------------------------------------------------------------


class Table:
    """Formats rows as a fixed-width table, one line per row as it arrives (header first)."""

    def __init__(self, peers: Sequence[str], show_input_size: bool):
        self.peers = list(peers)
        self.show_input_size = show_input_size

    @staticmethod
    def _width(peer: str) -> int:
        return max(12, len(peer) + 5)  # "{peer} ms" and a space before it

    def _ratio_label(self, peer: str) -> str:
        """The ratio column beside `peer`: its time over the first peer's (> 1: the first is faster)."""
        return f"{peer}/{self.peers[0]}"

    def header(self) -> str:
        inp = f"{'I':>5}" if self.show_input_size else ""
        head = f"{'cell':9}{'T':>5}{'B':>4}{inp}{'H':>5} {'mode':10}"
        for name in self.peers:
            head += f"{name + ' ms':>{self._width(name)}}{'spread':>8}{'GF/s':>7}"
            if name != self.peers[0]:
                label = self._ratio_label(name)
                head += f"{label:>{max(9, len(label) + 1)}}"
        return head

    def line(self, row: dict) -> str:
        inp = f"{row['I']:>5}" if self.show_input_size else ""
        text = f"{row['cell']:9}{row['T']:>5}{row['B']:>4}{inp}{row['H']:>5} {row['mode']:10}"
        for name in self.peers:
            # One round has no spread to show (its 0 is no measure of stability).
            spread = (f"{row[f'{name}_spread_pct']:>7.0f}%" if len(row.get(f"{name}_times_ms", ())) != 1
                      else f"{'-':>8}")
            text += f"{row[f'{name}_ms']:>{self._width(name)}.3f}{spread}{row[f'{name}_gflops']:>7.1f}"
            if f"speedup_vs_{name}" in row:
                text += f"{row[f'speedup_vs_{name}']:>{max(9, len(self._ratio_label(name)) + 1) - 1}.2f}x"
        return text
