"""`fusedrnn demo`: a recurrent forecaster of the yearly sunspot numbers, trained with the toolkit
(windows, truncated BPTT, gradient clipping, Adam) and judged on held-out years against two baselines;
and `fusedrnn demo --gradients`: how the gradient fades back through time in an RNN, a GRU and an LSTM.

The forecaster reads the (standardised) series one year at a time and predicts the next year from its
hidden state through a linear readout. It trains on overlapping windows of the training years, each run
in chunks of `chunk` steps with the state carried between them (truncated BPTT); the first `warmup`
steps of each window, which start from a zero state, are left out of the loss. It forecasts each
held-out year from the window of years before it, and averages the forecasts of the last
`average_last` fraction of epochs (less noise from the last few updates). `members` forecasters
trained from different seeds are averaged: one alone lands on either side of the linear baseline
depending on its seed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import _checks, _device, datasets, losses, optim, sequences
from .bptt import truncated_bptt
from .functional import CELLS
from .gradients import clip_grad_norm, diagnose_gradient_flow, plot_gradient_flow
from .modules import Linear, make_module
from ._optional import require

FORECAST_CELLS = CELLS  # every cell the core has


@dataclass
class ForecastConfig:
    cell: str = "lstm"
    hidden: int = 64
    epochs: int = 150
    seed: int = 0
    held_out_years: int = 60
    window: int = 64          # years per training window, and of history behind each forecast
    chunk: int = 16           # truncated-BPTT chunk length
    warmup: int = 8           # first steps of a window left out of the loss
    batch: int = 32
    lr: float = 1e-2
    clip: float = 1.0
    average_last: float = 0.3
    members: int = 3          # forecasters trained from different seeds, their forecasts averaged
    device: str = "cpu"       # where the modules train: "cpu", or "cuda"/"cuda:N" (CuPy arrays)

    def __post_init__(self):
        """Each field checked by name: a bad one would train nothing, or average no forecast (nan)."""
        if self.cell not in FORECAST_CELLS:
            raise ValueError(f"cell: expected one of {FORECAST_CELLS}, got {self.cell!r}")
        for name in ("hidden", "epochs", "window", "chunk", "batch", "members", "held_out_years"):
            _checks.positive_int(name, getattr(self, name))
        for name in ("seed", "warmup"):
            _checks.positive_int(name, getattr(self, name), minimum=0)
        if self.warmup >= self.window:
            raise ValueError(f"warmup: expected fewer steps than window ({self.window}), got {self.warmup}")
        for name in ("lr", "clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
        if isinstance(self.average_last, bool) or not isinstance(self.average_last, numbers.Real) \
                or not 0 < self.average_last <= 1:
            raise ValueError(f"average_last: expected a fraction of the epochs in (0, 1], got {self.average_last!r}")


@dataclass
class ForecastResult:
    years: np.ndarray           # the held-out years
    truth: np.ndarray           # their sunspot numbers
    forecast: np.ndarray        # the model's one-step-ahead forecasts
    baselines: dict             # name -> forecasts of the same years
    rmse: dict                  # "model" and each baseline name -> RMSE
    linear_window: int          # the window the linear baseline chose on validation years
    losses: list = field(default_factory=list)   # mean training loss of each epoch of each member


def rmse(forecast, truth) -> float:
    return float(np.sqrt(np.mean((np.asarray(forecast) - np.asarray(truth)) ** 2)))


# ---- baselines ------------------------------------------------------------------------------------------


def _lagged(series: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [y[t-window], ..., y[t-1], 1] and targets y[t] for every t >= window."""
    lags = np.lib.stride_tricks.sliding_window_view(series, window + 1)
    return np.hstack([lags[:, :window], np.ones((len(lags), 1))]), lags[:, window]


def linear_window_forecast(series: np.ndarray, n_train: int, window: int) -> np.ndarray:
    """Least-squares y[t] ~ w . y[t-window:t] + b fitted on the first n_train values; forecasts of
    y[n_train:] from the true values before each."""
    a, b = _lagged(series[:n_train], window)
    coef = np.linalg.lstsq(a, b, rcond=None)[0]
    rows, _ = _lagged(series[n_train - window:], window)
    return rows @ coef


def choose_linear_window(series: np.ndarray, n_train: int, validation: int = 50, longest: int = 20) -> int:
    """The window (1..longest) whose linear model, fitted on the training values before the last
    `validation` ones, forecasts those best: chosen without looking at the held-out years."""
    fit_end = n_train - validation
    errors = [rmse(linear_window_forecast(series[:n_train], fit_end, w), series[fit_end:n_train])
              for w in range(1, longest + 1)]
    return int(np.argmin(errors)) + 1


# ---- the recurrent forecaster -------------------------------------------------------------------------


def train_forecaster(config: ForecastConfig = ForecastConfig(),
                     on_epoch: Callable[[int, float], None] | None = None, *,
                     train_member: Callable | None = None) -> ForecastResult:
    """Trains `config.members` forecasters (seeds seed*members + 0, 1, ...) and averages their
    forecasts of the held-out years; `on_epoch(n, loss)` after each of the members * epochs epochs.
    `train_member(config, seed, z, n_train, record)` trains one (default: the NumPy modules')."""
    train_member = _train_member if train_member is None else train_member
    _device.canonical_device(config.device)  # a bad name, or CUDA without CuPy, refused before any training
    years, series = datasets.sunspots()
    n_train = len(series) - config.held_out_years
    if n_train <= config.window:  # the training years must hold one window and its next year
        raise ValueError(f"held_out_years: {config.held_out_years} of the series' {len(series)} years leave "
                         f"{n_train} to train on, fewer than window + 1 = {config.window + 1}")
    mean, std = series[:n_train].mean(), series[:n_train].std()
    z = ((series - mean) / std).astype(np.float32)

    epoch_losses = []

    def record(loss: float) -> None:
        epoch_losses.append(loss)
        if on_epoch is not None:
            on_epoch(len(epoch_losses) - 1, loss)

    forecasts = [train_member(config, config.seed * config.members + m, z, n_train, record)
                 for m in range(config.members)]
    model = np.mean(forecasts, axis=0) * std + mean

    truth = series[n_train:]
    window = choose_linear_window(series, n_train)
    baselines = {"repeat last value": series[n_train - 1:-1],
                 f"linear, last {window} years": linear_window_forecast(series, n_train, window)}
    scores = {"model": rmse(model, truth), **{k: rmse(v, truth) for k, v in baselines.items()}}
    return ForecastResult(years[n_train:], truth, model, baselines, scores, window, epoch_losses)


def _train_member(config: ForecastConfig, seed: int, z: np.ndarray, n_train: int,
                  record: Callable[[float], None]) -> np.ndarray:
    """One forecaster trained on z[:n_train] on config.device; its (standardised) forecasts of z[n_train:]."""
    inputs, targets = sequences.next_step_chunks(z[:n_train], config.window, stride=1)
    loss_mask = np.ones(inputs.shape[:2], bool)
    loss_mask[:config.warmup] = False

    rnn = make_module(config.cell, 1, config.hidden, seed=seed).to(config.device)
    head = Linear(config.hidden, 1, seed=seed + 1).to(config.device)
    opt = optim.Adam([rnn, head], lr=config.lr)
    rng = np.random.default_rng(seed)

    # Forecast inputs: the window of years before each held-out year (its targets are those years).
    history, _ = sequences.sliding_windows(z[n_train - config.window:], config.window, 1)
    inputs, targets, loss_mask, history = (_device.move(a, rnn.device) for a in (inputs, targets, loss_mask, history))
    xp = _device.array_module(inputs)

    def forecast() -> np.ndarray:
        rnn.eval()
        head.eval()
        out, _ = rnn(history)
        predicted = _device.to_host(head(out[-1])[:, 0])
        rnn.train()
        head.train()
        return predicted

    def step(_chunk_index: int) -> None:
        grads = [*rnn.grads.values(), *head.grads.values()]
        if math.isfinite(clip_grad_norm(grads, config.clip)):
            opt.step()                           # a non-finite gradient skips the update
        rnn.zero_grad()
        head.zero_grad()

    def train_batch(idx: np.ndarray) -> float:
        idx = _device.move(idx, rnn.device)
        x, y, mask = inputs[:, idx], targets[:, idx], loss_mask[:, idx]

        def loss_fn(out, t0, t1):
            chunk_mask = mask[t0:t1]
            if not bool(chunk_mask.any()):   # a chunk inside the warm-up: nothing to learn from
                return 0.0, xp.zeros_like(out)
            loss, dpred = losses.mse_loss(head(out), y[t0:t1], chunk_mask)
            return loss, head.backward(dpred)

        return sum(truncated_bptt(rnn, x, config.chunk, loss_fn, after_chunk=step).losses)

    return run_epochs(config, rng, inputs.shape[1], train_batch, forecast, record)


def run_epochs(config: ForecastConfig, rng: np.random.Generator, count: int,
               train_batch: Callable[[np.ndarray], float], forecast: Callable[[], np.ndarray],
               record: Callable[[float], None]) -> np.ndarray:
    """A member's training schedule, whatever trains it: each epoch, the `count` windows in a fresh
    random order, `config.batch` at a time (`train_batch(indices)` returns the batch's summed chunk
    losses); the epoch's mean loss recorded; the forecasts of the last `config.average_last` of the
    epochs averaged (the last one alone if none falls there)."""
    snapshots = []
    for epoch in range(config.epochs):
        total = 0.0
        order = rng.permutation(count)
        for start in range(0, count, config.batch):
            total += float(train_batch(order[start:start + config.batch]))
        record(total / math.ceil(count / config.batch))
        if epoch >= config.epochs * (1 - config.average_last):
            snapshots.append(np.asarray(forecast()))
    return np.mean(snapshots, axis=0) if snapshots else np.asarray(forecast())


def plot_forecast(result: ForecastResult, path, cell: str = "lstm"):
    """Held-out truth, the model's forecasts and the baselines' (matplotlib, the `plot` extra)."""
    fig = require("matplotlib.figure", "plot").Figure(figsize=(9, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(result.years, result.truth, "k-", lw=2, label="observed")
    ax.plot(result.years, result.forecast, "-", label=f"{cell.upper()} (RMSE {result.rmse['model']:.1f})")
    for name, values in result.baselines.items():
        ax.plot(result.years, values, "--", lw=1, label=f"{name} (RMSE {result.rmse[name]:.1f})")
    ax.set_xlabel("year")
    ax.set_ylabel("sunspot number")
    ax.set_title("One-year-ahead forecasts of held-out years")
    ax.legend()
    fig.savefig(path, dpi=120)
    return fig


# ---- gradient flow ------------------------------------------------------------------------------------

GRADIENT_CELLS = ("rnn_tanh", "gru", "lstm")


def gradient_profiles(steps: int = 100, hidden: int = 32, seed: int = 0) -> dict:
    """cell -> GradientFlow: each cell, at its default initialisation, runs the same sequence (the
    first `steps` standardised sunspot years, 4 copies with different noise); the loss is on the last
    step's output only, so the profile shows what reaches each earlier step."""
    _, series = datasets.sunspots()
    z = (series[:steps] - series.mean()) / series.std()
    rng = np.random.default_rng(seed)
    x = (z[:, None, None] + 0.1 * rng.standard_normal((steps, 4, 1))).astype(np.float64)
    profiles = {}
    for cell in GRADIENT_CELLS:
        m = make_module(cell, 1, hidden, dtype=np.float64, seed=seed)
        y, _ = m(x)
        dy = np.zeros_like(y)
        dy[-1] = 1.0
        m.backward(dy)
        profiles[cell] = diagnose_gradient_flow(m.hidden_grad_norms[0])
    return profiles


def plot_gradient_profiles(profiles: dict, path):
    return plot_gradient_flow({cell.upper(): flow.norms for cell, flow in profiles.items()}, path,
                              title="||dL/dh_t|| for a loss on the last step (default initialisation)")
