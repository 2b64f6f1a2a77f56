"""What `fusedrnn bench` does with its rows beyond the table: sweeps of one shape axis, comparison with
an earlier run's JSON, the memory table, and plots.

Times are judged by their round medians (the median of the timed calls of each round, recomputed from
the per-call times a row keeps as {peer}_times_ms): a row's figure is the median of those, its spread
their min-max range.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import statistics
from dataclasses import dataclass
from typing import Sequence

from ._optional import require
from .benchmark import MODES, Case, parse_label
from .functional import CELLS

SHAPE_KEYS = ("T", "B", "I", "H")
# A size of one dimension no benchmark case reaches, past which a shape, sweep or row is refused rather
# than tried.
MAX_SIZE = 2**31 - 1
AXIS_NAMES = {"steps": "T", "batch": "B", "input": "I", "hidden": "H"}
AXIS_WORDS = {letter: word for word, letter in AXIS_NAMES.items()}
ROW_KEYS = ("cell", *SHAPE_KEYS, "mode")
_MAX_REPORT_BYTES = 64 << 20  # far past any report `fusedrnn bench --json` writes


# ---- sweeps ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    axis: str                 # "T", "B", "I" or "H"
    values: tuple             # the values it takes, positive ints, in the order given

    def shapes(self, base: tuple) -> list[tuple]:
        """The (T, B, I, H) shapes of the sweep: `base` with the axis set to each value in turn."""
        index = SHAPE_KEYS.index(self.axis)
        return [tuple(v if k == index else base[k] for k in range(4)) for v in self.values]

    def describe(self, base: tuple) -> str:
        fixed = ", ".join(f"{k}={base[i]}" for i, k in enumerate(SHAPE_KEYS) if k != self.axis)
        return f"{AXIS_WORDS[self.axis]} ({self.axis}) = {', '.join(map(str, self.values))} at {fixed}"


def parse_sweep(text: str) -> Sweep:
    """AXIS=V1,V2,... with AXIS one of steps, batch, input, hidden (or T, B, I, H) and at least two
    distinct integer values in [1, MAX_SIZE]."""
    usage = ("sweep: expected AXIS=V1,V2,... with AXIS one of steps, batch, input, hidden (or T, B, I, H) "
             f"and at least two distinct integers in [1, {MAX_SIZE}], e.g. batch=1,8,32; got {text!r}")
    name, sep, values = text.partition("=")
    name = name.strip()
    axis = AXIS_NAMES.get(name.lower(), name.upper() if name.upper() in SHAPE_KEYS else None)
    parts = [p.strip() for p in values.split(",")]
    if not sep or axis is None or not all(p.isdecimal() and 0 < int(p) <= MAX_SIZE for p in parts):
        raise ValueError(usage)
    numbers = tuple(int(p) for p in parts)
    if len(numbers) < 2 or len(set(numbers)) != len(numbers):
        raise ValueError(usage)
    return Sweep(axis, numbers)


# ---- reading a report -----------------------------------------------------------------------------------


def round_medians(row: dict, peer: str) -> list[float]:
    """The peer's median time of each round of this row, in ms."""
    return [statistics.median(times) for times in row[f"{peer}_times_ms"]]


def report_peers(report: dict) -> list[str]:
    """The peers of a report, in column order (the first is the one the others are compared with)."""
    peers = report.get("meta", {}).get("peers")
    if peers:
        return list(peers)
    return [key[:-len("_times_ms")] for key in report["rows"][0] if key.endswith("_times_ms")]


def load_report(path: str) -> dict:
    """Reads and checks the JSON a `fusedrnn bench --json` run wrote."""
    try:
        with open(path, "rb") as f:
            regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
            text = f.read(_MAX_REPORT_BYTES + 1) if regular else b""
    except OSError as err:
        raise ValueError(f"compare: cannot read {path!r}: {err.strerror}") from err
    if not regular:
        raise ValueError(f"compare: {path!r} is not a regular file")
    if len(text) > _MAX_REPORT_BYTES:
        raise ValueError(f"compare: {path!r} is larger than {_MAX_REPORT_BYTES >> 20} MiB, far past what "
                         "`fusedrnn bench --json` writes")
    try:
        report = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, numbers or nesting past Python's limits
        raise ValueError(f"compare: {path!r} is not JSON that `fusedrnn bench --json` writes ({err})") from err
    rows = report.get("rows") if isinstance(report, dict) else None
    if not rows or not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"compare: {path!r} has no rows; expected what `fusedrnn bench --json` writes")
    for row in rows:
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"compare: a row of {path!r} lacks {', '.join(missing)}")
    meta = report.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"compare: {path!r}: 'meta' is not an object")
    peers = meta.get("peers")
    if peers is not None and (not isinstance(peers, list) or not all(isinstance(p, str) for p in peers)):
        raise ValueError(f"compare: {path!r}: meta.peers is not a list of peer names")
    peers = report_peers(report)
    if not peers or not any(f"{p}_times_ms" in row for p in peers for row in rows):
        raise ValueError(f"compare: {path!r} has no per-call times ({{peer}}_times_ms); it was written by an "
                         "older version: rerun it with this one")
    seen = {}
    for i, row in enumerate(rows):
        _check_row(row, peers, f"compare: {path!r}, row {i}")
        if row_key(row) in seen:  # as the command line refuses a shape given twice
            raise ValueError(f"compare: {path!r}, row {i}: the same case and mode as row {seen[row_key(row)]}")
        seen[row_key(row)] = i
    sweep = meta.get("sweep")
    _check_sweep(sweep, f"compare: {path!r}, meta.sweep")
    if sweep is not None:
        on_axis = sorted({row[sweep["axis"]] for row in rows})
        if on_axis != sorted(sweep["values"]):
            raise ValueError(f"compare: {path!r}, meta.sweep: values {sorted(sweep['values'])} are not the rows' "
                             f"{sweep['axis']} values {on_axis}")
    return report


def _check_row(row: dict, peers: Sequence[str], where: str) -> None:
    """The fields of a report's row as this version writes them, or a ValueError saying which is not."""
    cell = row["cell"]
    if not isinstance(cell, str) or parse_label(cell)[0] not in CELLS or re.fullmatch(r"(?i)lstmp0\d*", cell):
        raise ValueError(f"{where}: cell {cell!r} is none of {', '.join(CELLS)} (or LSTMP<n>, n >= 1)")
    if cell != cell.upper():  # rows are matched by the label as written
        raise ValueError(f"{where}: cell {cell!r}, expected the label as `fusedrnn bench` writes it ({cell.upper()!r})")
    for key in SHAPE_KEYS:
        if not _positive_int(row[key]):
            raise ValueError(f"{where}: {key} = {row[key]!r}, expected an int in [1, {MAX_SIZE}]")
    proj = parse_label(cell)[1]
    if proj >= row["H"]:
        raise ValueError(f"{where}: cell {cell!r} projects to {proj} features, expected fewer than H = {row['H']}")
    if row["mode"] not in MODES:
        raise ValueError(f"{where}: mode {row['mode']!r} is neither of {', '.join(MODES)}")
    for peer in peers:
        times = row.get(f"{peer}_times_ms")
        if not (isinstance(times, list) and times and all(
                isinstance(r, list) and r and all(_positive_number(t) for t in r) for r in times)):
            raise ValueError(f"{where}: {peer}_times_ms is not a list of rounds, each a list of times > 0 in ms")


def _check_sweep(sweep, where: str) -> None:
    if sweep is None:
        return
    values = sweep.get("values") if isinstance(sweep, dict) else None
    if (not isinstance(sweep, dict) or sweep.get("axis") not in SHAPE_KEYS or not isinstance(values, list)
            or len(values) < 2 or not all(_positive_int(v) for v in values) or len(set(values)) < len(values)):
        raise ValueError(f"{where}: expected {{'axis': one of {', '.join(SHAPE_KEYS)}, 'values': distinct ints "
                         f"in [1, {MAX_SIZE}]}}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SIZE


def _positive_number(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # an int past every float
        return False


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in ROW_KEYS)


def report_sweep(report: dict) -> Sweep | None:
    """The sweep a report's run made, if it made one."""
    sweep = report.get("meta", {}).get("sweep")
    return Sweep(sweep["axis"], tuple(sweep["values"])) if sweep else None


def report_cases(report: dict) -> list[Case]:
    """The cases a report's rows measured, each with the modes it had, in the report's order."""
    modes: dict = {}
    for row in report["rows"]:
        key = (row["cell"], *(row[k] for k in SHAPE_KEYS))
        modes.setdefault(key, []).append(row["mode"])
    cases = []
    for (label, *shape), m in modes.items():
        cell, proj_size = parse_label(label)
        cases.append(Case(cell, *shape, modes=tuple(m), proj_size=proj_size))
    return cases


# ---- comparison -----------------------------------------------------------------------------------------

COMPARE_RULE = ("a row got slower (faster) when its new median lies above (below) every old round median, "
                "its old median lies below (above) every new round median, and the change of the median "
                "(new / old - 1) is at least the threshold (at most minus the threshold)")


@dataclass
class Change:
    key: tuple                # cell, T, B, I, H, mode
    peer: str
    old: list                 # round medians, ms
    new: list
    verdict: str              # "slower", "faster" or "same"

    @property
    def old_ms(self) -> float:
        return statistics.median(self.old)

    @property
    def new_ms(self) -> float:
        return statistics.median(self.new)


def judge(old: Sequence[float], new: Sequence[float], threshold: float) -> str:
    """"slower", "faster" or "same" by COMPARE_RULE; threshold is a fraction (0.05: 5%)."""
    old_ms, new_ms = statistics.median(old), statistics.median(new)
    if new_ms > max(old) and old_ms < min(new) and new_ms >= old_ms * (1 + threshold):
        return "slower"
    if new_ms < min(old) and old_ms > max(new) and new_ms <= old_ms * (1 - threshold):
        return "faster"
    return "same"


def compare_reports(old: dict, new: dict, threshold: float) -> list[Change]:
    """Every row and peer the two reports share, judged; rows in the new report's order."""
    old_rows = {row_key(r): r for r in old["rows"]}
    old_peers = set(report_peers(old))
    changes = []
    for row in new["rows"]:
        before = old_rows.get(row_key(row))
        if before is None:
            continue
        for peer in report_peers(new):
            if peer in old_peers:
                a, b = round_medians(before, peer), round_medians(row, peer)
                changes.append(Change(row_key(row), peer, a, b, judge(a, b, threshold)))
    return changes


def format_comparison(changes: list[Change], old: dict, new: dict, threshold: float) -> str:
    lines = []
    old_meta, new_meta = old.get("meta", {}), new.get("meta", {})
    common = sorted(set(report_peers(old)) & set(report_peers(new)))
    # Rounds and repeats too: the rule reads the spread of round medians, which more rounds widen.
    for key in ("cpu", "gpu", "simd", "blas", "threads", "rounds", "repeats", *common):
        if key in old_meta and key in new_meta and old_meta[key] != new_meta[key]:
            lines.append(f"note: the runs differ in {key}: {old_meta[key]} then, {new_meta[key]} now")
    old_threads, new_threads = old_meta.get("peer_threads", {}), new_meta.get("peer_threads", {})
    follows = (old_meta.get("threads"), new_meta.get("threads"))  # a peer on --threads: noted above
    for peer in common:
        if peer in old_threads and peer in new_threads and old_threads[peer] != new_threads[peer] \
                and (old_threads[peer], new_threads[peer]) != follows:
            lines.append(f"note: the runs differ in {peer}'s threads: {old_threads[peer]} then, "
                         f"{new_threads[peer]} now")
    if not changes:
        lines.append("compare: no row and peer in common with the earlier run")
        return "\n".join(lines)
    peer_width = max(15, 1 + max(len(c.peer) for c in changes))
    lines.append(f"{'cell':9}{'T':>5}{'B':>4}{'I':>5}{'H':>5} {'mode':10}{'peer':>{peer_width}}"
                 f"{'old ms':>11}{'range':>20}{'new ms':>11}{'range':>20}{'change':>10}  verdict")
    for c in changes:
        cell, t, b, i, h, mode = c.key
        text = f"{cell:9}{t:>5}{b:>4}{i:>5}{h:>5} {mode:10}{c.peer:>{peer_width}}"
        for rounds in (c.old, c.new):
            span = f"{min(rounds):.3f}-{max(rounds):.3f}"
            text += f"{statistics.median(rounds):>11.3f}{span:>20}"
        text += f"{(c.new_ms / c.old_ms - 1) * 100:>+9.0f}%  {c.verdict}"
        lines.append(text)
    counts = {v: sum(c.verdict == v for c in changes) for v in ("slower", "faster", "same")}
    lines.append(f"{counts['slower']} slower, {counts['faster']} faster, {counts['same']} within spread or "
                 f"under {threshold * 100:g}%")
    lines.append(f"(by round medians: {COMPARE_RULE})")
    return "\n".join(lines)


# ---- memory ---------------------------------------------------------------------------------------------


def memory_table(rows: list[dict], peers: Sequence[str]) -> str:
    """Per row and peer: the bytes kept for backward (training rows) and the peak resident-set growth of
    one call; "-" where a figure is not measured (a peer whose backward state is not counted, inference
    keeps nothing, no /proc)."""
    def amount(value):
        if value is None:
            return "-"
        for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if value >= size:
                return f"{value / size:.1f} {unit}"
        return f"{value} B"

    lines = [f"{'cell':9}{'T':>5}{'B':>4}{'I':>5}{'H':>5} {'mode':10}"
             + "".join(f"{name + ' kept':>20}{'peak':>10}" for name in peers)]
    for row in rows:
        text = f"{row['cell']:9}{row['T']:>5}{row['B']:>4}{row['I']:>5}{row['H']:>5} {row['mode']:10}"
        for name in peers:
            text += f"{amount(row.get(f'{name}_saved_bytes')):>20}{amount(row.get(f'{name}_peak_rss_bytes')):>10}"
        lines.append(text)
    return "\n".join(lines)


# ---- plots ----------------------------------------------------------------------------------------------


def _spread(values: Sequence[float], centre: float) -> tuple:
    """Whisker lengths below and above centre reaching the min and max of values."""
    return max(0.0, centre - min(values)), max(0.0, max(values) - centre)


def _round_ratios(row: dict, peer: str, first: str) -> list[float]:
    """The peer's time over the first peer's, round by round (the two ran in the same round)."""
    return [p / f for p, f in zip(round_medians(row, peer), round_medians(row, first))]


def _log_if_wide(ax, which: str, values: Sequence[float]) -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) >= 10:
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")


def row_label(row: dict) -> str:
    return f"{row['cell']} ({row['T']},{row['B']},{row['I']},{row['H']}) {row['mode']}"


def _errorbars(ax, positions, rows, peers, first, horizontal):
    """One errorbar series per peer on ax: the time panel when first is None, else the ratio panel."""
    for k, peer in enumerate(peers, start=0 if first is None else 1):  # a peer keeps its colour and place
        centres, low, high = [], [], []
        for row in rows:
            if first is None:
                centre, spread_of = row[f"{peer}_ms"], round_medians(row, peer)
            else:
                centre, spread_of = row[f"{peer}_ms"] / row[f"{first}_ms"], _round_ratios(row, peer, first)
            below, above = _spread(spread_of, centre)
            centres.append(centre)
            low.append(below)
            high.append(above)
        pos = [p + k for p in positions] if horizontal else positions
        bars = {"xerr" if horizontal else "yerr": [low, high]}
        xs, ys = (centres, pos) if horizontal else (pos, centres)
        ax.errorbar(xs, ys, fmt="o" if horizontal else "o-", capsize=3, label=peer, color=f"C{k}", **bars)


def check_output_path(path: str, option: str) -> None:
    """ValueError naming `option` where a file could not be written at `path`: its folder missing or not
    writable, the path a folder, or no path at all."""
    if not path:
        raise ValueError(f"{option}: expected a file name, got an empty one")
    target = os.path.realpath(path)  # where a link (even one to nothing yet) has the file written
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise ValueError(f"{option}: the folder {folder!r} does not exist")
    if os.path.isdir(target):
        raise ValueError(f"{option}: {path!r} is a folder, not a file name")
    if not os.access(folder, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise ValueError(f"{option}: {path!r} cannot be written here")
    existed = os.path.exists(target)
    if not existed or os.path.isfile(target):  # opened as it will be (a pipe or device is left alone)
        try:
            with open(target, "a"):
                pass
        except OSError as err:  # what access() does not see: a read-only or special file system, as root
            raise ValueError(f"{option}: {path!r} cannot be written here ({err.strerror})") from err
        if not existed:
            os.remove(target)


def check_plot_path(path: str) -> None:
    """Raises ImportError without matplotlib, ValueError where the plot could not be written: its folder
    missing, or a format matplotlib does not write (known by the extension)."""
    require("matplotlib", "plot")
    from matplotlib.figure import Figure

    check_output_path(path, "plot")
    formats = Figure().canvas.get_supported_filetypes()
    extension = os.path.splitext(path)[1][1:].lower()
    if extension not in formats:
        endings = ", ".join("." + f for f in sorted(formats))
        raise ValueError(f"plot: expected a file name ending in one of {endings}, got {path!r}")


def plot_rows(rows: list[dict], peers: Sequence[str], path: str, sweep: Sweep | None = None):
    """Draws the rows to path (any format matplotlib writes, by its extension) and returns the Figure:
    per peer the median time with min-max whiskers over the round medians, and each other peer's time
    over the first peer's. Without a sweep: one line per row, cell, shape (T,B,I,H) and mode. With a
    sweep: time and ratio against the swept axis, one pair of panels per cell and mode."""
    require("matplotlib", "plot")
    first, others = peers[0], list(peers[1:])
    if sweep is None:
        fig = _plot_cases(rows, peers, first, others)
    else:
        fig = _plot_sweep(rows, peers, first, others, sweep)
    fig.savefig(path, dpi=110)
    return fig


def _plot_cases(rows, peers, first, others):
    from matplotlib.figure import Figure

    n = len(rows)
    step = len(peers) + 1
    fig = Figure(figsize=(12, 1.2 + 0.28 * n * step / 2), layout="constrained")
    time_ax, ratio_ax = fig.subplots(1, 2, sharey=True)
    positions = [i * step for i in range(n)]
    _errorbars(time_ax, positions, rows, peers, None, horizontal=True)
    time_ax.set_xlabel("time per call, ms (median of round medians; whiskers: min-max)")
    _log_if_wide(time_ax, "x", [row[f"{p}_ms"] for row in rows for p in peers])
    time_ax.set_yticks([p + (len(peers) - 1) / 2 for p in positions], [row_label(r) for r in rows])
    time_ax.set_ylabel("cell (T,B,I,H) mode")
    time_ax.invert_yaxis()
    time_ax.legend(loc="best", fontsize="small")
    time_ax.set_title("time")
    if others:
        _errorbars(ratio_ax, positions, rows, others, first, horizontal=True)
        ratio_ax.axvline(1.0, color="grey", linewidth=0.8)
        ratio_ax.set_xlabel(f"peer time / {first} time (> 1: {first} is faster)")
        _log_if_wide(ratio_ax, "x", [row[f"{p}_ms"] / row[f"{first}_ms"] for row in rows for p in others])
        ratio_ax.legend(loc="best", fontsize="small")
        ratio_ax.set_title(f"ratio to {first}")
    else:
        ratio_ax.set_axis_off()
    return fig


def _plot_sweep(rows, peers, first, others, sweep):
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    groups: dict = {}
    for row in rows:
        groups.setdefault((row["cell"], row["mode"]), []).append(row)
    fig = Figure(figsize=(11, 0.5 + 3.2 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 2, squeeze=False)
    axis_label = f"{AXIS_WORDS[sweep.axis]} ({sweep.axis})"
    for (time_ax, ratio_ax), ((cell, mode), group) in zip(axes, groups.items()):
        group = sorted(group, key=lambda r: r[sweep.axis])
        xs = [r[sweep.axis] for r in group]
        fixed = ", ".join(f"{k}={group[0][k]}" for k in SHAPE_KEYS if k != sweep.axis)
        _errorbars(time_ax, xs, group, peers, None, horizontal=False)
        time_ax.set_title(f"{cell} {mode}, {fixed}: time")
        time_ax.set_ylabel("ms per call")
        _log_if_wide(time_ax, "y", [r[f"{p}_ms"] for r in group for p in peers])
        if others:
            _errorbars(ratio_ax, xs, group, others, first, horizontal=False)
            ratio_ax.axhline(1.0, color="grey", linewidth=0.8)
            _log_if_wide(ratio_ax, "y", [r[f"{p}_ms"] / r[f"{first}_ms"] for r in group for p in others])
            ratio_ax.set_title(f"{cell} {mode}: peer time / {first} time")
            ratio_ax.set_ylabel(f"> 1: {first} is faster")
            ratio_ax.legend(loc="best", fontsize="small")
        else:
            ratio_ax.set_axis_off()
        for ax in (time_ax, ratio_ax):
            ax.set_xlabel(axis_label)
            _log_if_wide(ax, "x", xs)
            ax.set_xticks(xs, [str(x) for x in xs])  # the values measured, not powers of ten
            ax.xaxis.set_minor_locator(NullLocator())
        time_ax.legend(loc="best", fontsize="small")
    return fig
