"""A small run of every CUDA kernel, for compute-sanitizer (bench/gpu_check.sh): each cell, both
directions, with lengths, per step and persistent, forward and backward, plus gathered (strided) inputs
and an LSTM with a projection, checked against the CPU path so a run that is clean but wrong still
fails. Exits non-zero on a mismatch."""

import sys

import numpy as np

import fusedrnn  # noqa: F401  (loads the CPU core first)
from fusedrnn import _cuda_layer
from fusedrnn import functional as F

try:
    import cupy as xp

    def to_device(a):
        return None if a is None else xp.asarray(a)

    def to_host(a):
        return None if a is None else xp.asnumpy(a)

    def time_major(a):
        return a.transpose(1, 0, 2)
except ImportError:
    import torch

    def to_device(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).cuda()

    def to_host(a):
        return None if a is None else a.detach().cpu().numpy()

    def time_major(a):
        return a.permute(1, 0, 2)


def check(cell, dtype, reverse, recurrence, strided, rng, proj=0):
    steps, batch, inp, hidden = 4, 3, 5, 33
    width = proj or hidden
    gates = fusedrnn.functional.GATES[cell]
    w = [rng.uniform(-0.5, 0.5, s).astype(dtype) for s in ((gates * hidden, inp), (gates * hidden, width),
                                                          (gates * hidden,), (gates * hidden,))]
    w_hr = rng.uniform(-0.5, 0.5, (proj, hidden)).astype(dtype) if proj else None
    x_batch_major = rng.standard_normal((batch, steps, inp)).astype(dtype)
    x = np.ascontiguousarray(x_batch_major.transpose(1, 0, 2))
    # strided: a (T, B, I) view whose rows are not evenly spaced, which the backend gathers first
    device_x = time_major(to_device(x_batch_major)) if strided else to_device(x)
    lengths = np.array([4, 1, 3], np.int64)
    dy = rng.standard_normal((steps, batch, width)).astype(dtype)
    y, h_n, c_n, tape = _cuda_layer.forward(cell, device_x, *(to_device(a) for a in w), None, None, lengths,
                                            reverse, True, None, None, recurrence, weight_hr=to_device(w_hr))
    grads = F.layer_backward(tape, to_device(dy))
    ref = F.layer_forward(cell, x, *w, lengths=lengths, reverse=reverse, weight_hr=w_hr)
    ref_grads = F.layer_backward(ref.tape, dy)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_host(y), ref.y, **tol)
    for name in ("dx", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "dh_norm") + (("weight_hr",) if proj else ()):
        np.testing.assert_allclose(to_host(getattr(grads, name)), getattr(ref_grads, name), err_msg=name, **tol)


def main():
    rng = np.random.default_rng(0)
    for cell in ("lstm", "gru", "rnn_tanh"):
        for recurrence in ("per_step", "persistent"):
            for reverse in (False, True):
                check(cell, np.float32, reverse, recurrence, strided=reverse, rng=rng)
    check("lstm", np.float64, False, "persistent", strided=False, rng=rng)
    for reverse in (False, True):
        check("lstm", np.float32, reverse, "per_step", strided=reverse, rng=rng, proj=7)
    print("small case: every kernel ran and matched the CPU path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
