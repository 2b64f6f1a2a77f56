"""The sunspot forecaster of `fusedrnn demo` (fusedrnn.demo), trained in JAX: fusedrnn.jax's fused layer
and a linear readout under jax.jit, optax's Adam with gradient clipping. Same data split, windows,
truncated BPTT (chunks of `chunk` steps, the state carried between them without gradient), warm-up,
batches, seeds per member, forecast averaging and RMSE against the same baselines as the NumPy demo.

    python -m fusedrnn.jax.demo [--cell lstm] [--hidden 64] [--epochs 150] [--seed 0] [--members 3]
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

import numpy as np

from .. import demo, sequences
from .._optional import require
from ..demo import FORECAST_CELLS, ForecastConfig, ForecastResult

jax = require("jax", "jax")
optax = require("optax", "flax")
import jax.numpy as jnp  # noqa: E402

from ._rnn import forward, init  # noqa: E402


def train_forecaster(config: ForecastConfig = ForecastConfig(),
                     on_epoch: Callable[[int, float], None] | None = None) -> ForecastResult:
    """fusedrnn.demo.train_forecaster in JAX: the same data, split, averaging and scores, each member
    trained with fusedrnn.jax and optax."""
    return demo.train_forecaster(config, on_epoch, train_member=_train_member)


def _train_member(config: ForecastConfig, seed: int, z: np.ndarray, n_train: int,
                  record: Callable[[float], None]) -> np.ndarray:
    cell, chunk = config.cell, config.chunk
    inputs, targets = sequences.next_step_chunks(z[:n_train], config.window, stride=1)
    loss_mask = np.ones(inputs.shape[:2], np.float32)
    loss_mask[:config.warmup] = 0.0
    history, _ = sequences.sliding_windows(z[n_train - config.window:], config.window, 1)

    key_rnn, key_w, key_b = jax.random.split(jax.random.key(seed), 3)
    bound = 1.0 / math.sqrt(config.hidden)  # torch.nn.Linear's initialisation range
    params = {"rnn": init(key_rnn, cell, 1, config.hidden),
              "head_w": jax.random.uniform(key_w, (1, config.hidden), jnp.float32, -bound, bound),
              "head_b": jax.random.uniform(key_b, (1,), jnp.float32, -bound, bound)}
    # A non-finite gradient skips the update, as the NumPy demo does.
    optimizer = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(config.clip), optax.adam(config.lr)),
                                      max_consecutive_errors=2**31 - 1)
    opt_state = optimizer.init(params)

    def predict(p, x, hx=None):
        y, state = forward(cell, p["rnn"], x, hx)
        return y @ p["head_w"].T + p["head_b"], state

    def chunk_loss(p, hx, x, y, mask):
        pred, state = predict(p, x, hx)
        count = jnp.maximum(jnp.sum(mask), 1.0)
        return jnp.sum(mask * (pred[..., 0] - y[..., 0]) ** 2) / count, state

    @jax.jit
    def train_batch(p, opt_state, x, y, mask):
        """Truncated BPTT over one batch of windows: an update per chunk, the state carried on."""
        hx, total = None, 0.0
        for start in range(0, x.shape[0], chunk):
            part = slice(start, start + chunk)
            (loss, hx), grads = jax.value_and_grad(chunk_loss, has_aux=True)(p, hx, x[part], y[part], mask[part])
            hx = jax.lax.stop_gradient(hx)
            updates, opt_state = optimizer.update(grads, opt_state, p)
            p = optax.apply_updates(p, updates)
            total = total + loss
        return p, opt_state, total

    forecast = jax.jit(lambda p: predict(p, history)[0][-1, :, 0])

    def batch(idx: np.ndarray) -> float:
        nonlocal params, opt_state
        params, opt_state, loss = train_batch(params, opt_state, inputs[:, idx], targets[:, idx], loss_mask[:, idx])
        return float(loss)

    return demo.run_epochs(config, np.random.default_rng(seed), inputs.shape[1], batch,
                           lambda: forecast(params), record)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedrnn.jax.demo", description=__doc__.split("\n\n")[0])
    defaults = ForecastConfig()
    parser.add_argument("--cell", default=defaults.cell, choices=FORECAST_CELLS,
                        help=f"recurrent cell (default {defaults.cell})")
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help=f"hidden size (default {defaults.hidden})")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help=f"training epochs (default {defaults.epochs})")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help=f"initialisation and shuffling seed (default {defaults.seed})")
    parser.add_argument("--members", type=int, default=defaults.members,
                        help=f"forecasters trained from different seeds and averaged (default {defaults.members})")
    args = parser.parse_args(argv)
    try:
        config = ForecastConfig(cell=args.cell, hidden=args.hidden, epochs=args.epochs, seed=args.seed,
                                members=args.members)
    except (TypeError, ValueError) as err:
        parser.error(str(err))  # one line and exit status 2, as fusedrnn demo's
    result = train_forecaster(config)
    print(f"held-out years {int(result.years[0])}-{int(result.years[-1])}, one-year-ahead RMSE:")
    for name, value in result.rmse.items():
        print(f"  {config.cell.upper() if name == 'model' else name:<24} {value:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
