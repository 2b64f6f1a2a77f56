"""Small real data sets shipped inside the package (read with importlib.resources; no network).

- `sunspots()`: yearly sunspot activity 1700-2008 (NOAA National Geophysical Data Center; public domain).
- `co2_weekly()`: weekly atmospheric CO2 at Mauna Loa, March 1958 - December 2001 (Keeling & Whorf,
  CDIAC; public domain); 59 weeks have no measurement.
- `deepbench_shapes()`: the 125 RNN problem sizes of Baidu's DeepBench (Apache-2.0).
"""

from __future__ import annotations

import csv
import io
from importlib import resources
from typing import NamedTuple

import numpy as np


def _text(name: str) -> str:
    return resources.files("fusedrnn").joinpath("data", name).read_text(encoding="utf-8")


def sunspots() -> tuple[np.ndarray, np.ndarray]:
    """(years (309,) int64, yearly mean sunspot activity (309,) float64)."""
    rows = list(csv.reader(io.StringIO(_text("sunspots_yearly.csv"))))[1:]
    years = np.array([int(float(r[0])) for r in rows], np.int64)
    return years, np.array([float(r[1]) for r in rows])


class CO2Series(NamedTuple):
    """The weekly Mauna Loa CO2 record as co2_weekly returns it."""

    dates: np.ndarray      # (N,) datetime64[D], one every 7 days
    ppm: np.ndarray        # (N,) float64, gaps filled by linear interpolation in time
    measured: np.ndarray   # (N,) bool, False where the week had no value and was filled


def co2_weekly() -> CO2Series:
    """The weekly Mauna Loa CO2 record. The file has every week from 1958-03-29 to 2001-12-29, but 59 of
    them (runs of up to 18 weeks) hold no value. The weeks stay on their regular 7-day grid (a
    recurrent model needs evenly spaced steps) and each gap is filled by linear interpolation between
    the measured weeks either side; `measured` marks the real values, so a loss can leave the filled
    ones out (e.g. as a mask)."""
    rows = list(csv.reader(io.StringIO(_text("co2_mauna_loa_weekly.csv"))))[1:]
    dates = np.array([f"{r[0][:4]}-{r[0][4:6]}-{r[0][6:8]}" for r in rows], "datetime64[D]")
    ppm = np.array([float(r[1]) if r[1] else np.nan for r in rows])
    measured = ~np.isnan(ppm)
    days = (dates - dates[0]).astype(np.float64)
    filled = np.interp(days, days[measured], ppm[measured])
    return CO2Series(dates, filled, measured)


class DeepBenchShape(NamedTuple):
    """One recurrent shape of DeepBench's sets, as deepbench_shapes returns them."""

    set: str        # training_set, inference_server_set or inference_device_set
    hidden: int
    batch: int
    timesteps: int
    cell: str       # fusedrnn's cell name: "rnn_relu" (DeepBench's vanilla), "gru" or "lstm"


DEEPBENCH_CELLS = {"vanilla": "rnn_relu", "gru": "gru", "lstm": "lstm"}


def deepbench_shapes() -> list[DeepBenchShape]:
    """DeepBench's RNN sizes: one layer, unidirectional, input size = hidden size. training_set rows
    are timed forward + backward, inference rows forward only."""
    rows = list(csv.reader(io.StringIO(_text("deepbench_rnn_shapes.tsv")), delimiter="\t"))[1:]
    return [DeepBenchShape(r[0], int(r[1]), int(r[2]), int(r[3]), DEEPBENCH_CELLS[r[4]]) for r in rows]
