"""A two-layer bidirectional LSTM on a variable-length batch: forward, backward, one SGD step.

    python examples/quickstart.py
"""

import numpy as np

import fusedrnn

T, B, I, H = 20, 4, 8, 16
rng = np.random.default_rng(0)
x = rng.standard_normal((T, B, I), dtype=np.float32)
lengths = np.array([20, 15, 9, 3])

lstm = fusedrnn.LSTM(input_size=I, hidden_size=H, num_layers=2, bidirectional=True, seed=0)
y, (h_n, c_n) = lstm(x, lengths=lengths)
print(f"y {y.shape}, h_n {h_n.shape}, c_n {c_n.shape}")
print(f"outputs past each sequence's end are zero: {bool(np.all(y[lengths[3]:, 3] == 0))}")

# Regress the final hidden states of the last layer onto a target and take a few SGD steps.
target = rng.standard_normal((B, 2 * H)).astype(np.float32)
for step in range(5):
    lstm.zero_grad()
    y, (h_n, c_n) = lstm(x, lengths=lengths)
    last = np.concatenate([h_n[-2], h_n[-1]], axis=1)  # both directions of the top layer
    loss = float(np.mean((last - target) ** 2))
    dh_n = np.zeros_like(h_n)
    grad_last = 2 * (last - target) / last.size
    dh_n[-2], dh_n[-1] = grad_last[:, :H], grad_last[:, H:]
    dx, (dh0, dc0) = lstm.backward(None, (dh_n, None))
    for name, p in lstm.named_parameters():
        p -= 0.5 * lstm.grads[name]
    print(f"step {step}: loss {loss:.4f}")
