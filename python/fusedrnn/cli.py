"""The `fusedrnn` command: `demo` (train a forecaster, or show gradient flow), `bench` (time fusedrnn
against its peers), `info` (how this installation was built)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

from tqdm import tqdm

from . import _MAX_THREADS as MAX_THREADS
from . import _bench_report, _checks, _device, benchmark, build_info, set_num_threads
from ._optional import NOT_INSTALLED, import_problem
from .demo import ForecastConfig
from .functional import CELLS


def _int_at_least(low: int, high: int | None = None):
    """An argparse type: a decimal int in [low, high]."""
    def parse(text: str) -> int:
        if not text.strip().lstrip("-").isdecimal():
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}")
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an int in [{low}, {high}], got {value}" if high is not None
                                             else f"expected an int >= {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse's "invalid int value" for what int() refuses
    return parse


_positive_int = _int_at_least(1)
_thread_count = _int_at_least(1, MAX_THREADS)


# The demo's training options and their defaults (the forecaster's own).
_DEMO_DEFAULTS = ForecastConfig()


class _Parser(argparse.ArgumentParser):
    """argparse with its mistakes on one line, as the command's own are (the usage is --help's)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fusedrnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a recurrent forecaster of the yearly sunspot numbers",
                          description="Trains a small recurrent forecaster of the yearly sunspot numbers "
                          "(truncated BPTT, gradient clipping, Adam) and prints its RMSE on held-out "
                          "years next to two baselines. With --gradients: trains nothing, shows how the "
                          "gradient fades back through time in an RNN, a GRU and an LSTM.")
    defaults = _DEMO_DEFAULTS
    demo.add_argument("--cell", default=defaults.cell, choices=CELLS, help=f"recurrent cell (default {defaults.cell})")
    demo.add_argument("--hidden", type=_positive_int, default=defaults.hidden,
                      help=f"hidden size (default {defaults.hidden})")
    demo.add_argument("--epochs", type=_positive_int, default=defaults.epochs,
                      help=f"training epochs (default {defaults.epochs})")
    demo.add_argument("--seed", type=_int_at_least(0), default=defaults.seed,
                      help=f"initialisation and shuffling seed (default {defaults.seed})")
    demo.add_argument("--members", type=_positive_int, default=defaults.members,
                      help=f"forecasters trained from different seeds and averaged (default {defaults.members})")
    demo.add_argument("--threads", type=_thread_count, default=1,
                      help="native threads (default 1: the layers here are small)")
    demo.add_argument("--device", default=defaults.device,
                      help="where to train: cpu (default), cuda or cuda:N (CuPy and the CUDA module)")
    demo.add_argument("--plot", metavar="OUT.png", help="draw the forecasts (or gradient profiles) to a file")
    demo.add_argument("--gradients", action="store_true", help="show gradient flow instead of training")
    demo.add_argument("--no-progress", action="store_true",
                      help="no progress bar (there is none either when stderr is not a terminal)")

    bench = sub.add_parser("bench", help="time fusedrnn against every installed peer",
                           description=benchmark.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--set", help="a named set of cases: 'default', 'projection' (LSTMs with proj_size), "
                       "or a DeepBench set (training_set, inference_server_set, inference_device_set)")
    bench.add_argument("--cell", nargs="+", action="extend", default=None,
                       help=f"cells: lstm gru rnn_tanh rnn_relu (default {' '.join(benchmark.DEFAULT_CELLS)})")
    bench.add_argument("--shape", nargs="+", action="extend", metavar="T,B,I,H", default=None,
                       help="shapes as T,B,I,H (default "
                       f"{' '.join(','.join(map(str, shape)) for shape in benchmark.DEFAULT_SHAPES)})")
    bench.add_argument("--mode", nargs="+", action="extend", default=None, choices=benchmark.MODES,
                       help="inference, training, or both named (the default), for every case, --set and --compare's too")
    bench.add_argument("--peers", nargs="+", action="extend", default=None,
                       help=f"peers to time (default: every installed one of {sorted(benchmark.PEERS)})")
    bench.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                       help="cpu (default) or cuda: the CUDA peers (fusedrnn-cuda, torch-cudnn with TF32 off "
                            "and on, fusedrnn.torch-cuda) on the current GPU")
    bench.add_argument("--threads", type=_thread_count, default=2,
                       help="threads of fusedrnn and torch (default 2); JAX, Flax and NumPy keep their own pools")
    bench.add_argument("--rounds", type=_positive_int, default=5,
                       help="rounds, each timing every peer in turn (default 5)")
    bench.add_argument("--repeats", type=_positive_int, default=10, help="timed calls per round (default 10)")
    bench.add_argument("--json", metavar="OUT.json",
                       help="write the rows as JSON ('-': to stdout, no table), with every call's time and "
                       "the host CPU, threads and versions")
    bench.add_argument("--no-progress", "--quiet", action="store_true",
                       help="no progress bar (there is none either when stderr is not a terminal)")
    _report_arguments(bench)

    sub.add_parser("info", help="version, build options, and which optional peers are importable")
    return parser


def _report_arguments(bench) -> None:
    """The options of `fusedrnn bench` beyond timing a list of cases (see _bench_report)."""
    bench.add_argument("--sweep", metavar="AXIS=V1,V2,...",
                       help="vary one axis of the base shape (the one --shape, else "
                       f"{','.join(map(str, benchmark.DEFAULT_SHAPES[0]))}): AXIS is steps, batch, input or "
                       "hidden (or T, B, I, H), e.g. --sweep batch=1,8,32; the plot then draws time and "
                       "ratio against it")
    bench.add_argument("--plot", metavar="OUT.png",
                       help="draw the rows: per peer the median time with min-max whiskers over the round "
                       "medians, and each peer's time over the first peer's (needs the plot extra)")
    bench.add_argument("--memory", action="store_true",
                       help="also measure memory: the bytes a training forward keeps for backward "
                       "(fusedrnn's tape, torch.nn's autograd-saved tensors) and each call's peak resident-set "
                       "growth (Linux; the README's Benchmark section says what each counts)")
    bench.add_argument("--compare", metavar="OLD.json",
                       help="compare with an earlier --json output (without --set/--cell/--shape/--sweep: "
                       "rerun its cases and peers). By round medians, " + _bench_report.COMPARE_RULE
                       + ". The exit status stays 0 unless --fail-on-slower")
    bench.add_argument("--threshold", metavar="PCT", type=float, default=None,
                       help="--compare: the least change in %% of the median that counts (default 5)")
    bench.add_argument("--fail-on-slower", action="store_true",
                       help="--compare: exit with status 1 when a row got slower (2 when no row could be "
                       "compared)")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"demo": _demo, "bench": _bench, "info": _info}[args.command](args)
    except (ValueError, TypeError, ImportError) as err:
        print(f"fusedrnn {args.command}: {err}", file=sys.stderr)
        return 2
    except MemoryError as err:
        print(f"fusedrnn {args.command}: {err if str(err) else 'not enough memory for these sizes'}",
              file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout (| head) went away: nothing left to say
        _drop_stdout()
        return 0
    except OSError as err:  # a file or stdout that cannot be written (a full disk), or read
        where = f"{err.filename!r}: " if err.filename else ""
        print(f"fusedrnn {args.command}: {where}{err.strerror or err}", file=sys.stderr)
        try:
            sys.stdout.flush()
        except OSError:
            _drop_stdout()
        return 1


def _drop_stdout() -> None:
    """Points stdout at the null device, so that the flush at exit has nowhere left to fail."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _progress_off(args):
    # tqdm reads None as "off unless stderr is a terminal": no bar in logs and CI.
    return True if args.no_progress else None


# ---- demo -------------------------------------------------------------------------------------------


def _demo(args) -> int:
    from . import demo

    if args.gradients:  # every cell, untrained, on the host: the training's options would be ignored
        training_options = ("cell", "hidden", "epochs", "members", "device")
        given = [name for name in training_options if getattr(args, name) != getattr(_DEMO_DEFAULTS, name)]
        if given:
            raise ValueError(f"{', '.join(given)}: not taken with --gradients, which trains nothing (it compares "
                             "every cell, untrained, on the CPU)")
    if args.plot is not None:  # before the training, not after
        _bench_report.check_plot_path(args.plot)
    set_num_threads(args.threads)
    if args.gradients:
        return _demo_gradients(args, demo)
    config = demo.ForecastConfig(cell=args.cell, hidden=args.hidden, epochs=args.epochs, seed=args.seed,
                                 members=args.members, device=args.device)
    _device.canonical_device(config.device)  # a bad name, or CUDA without CuPy, before the header
    print(f"Forecasting yearly sunspot numbers with a {args.cell.upper()} (hidden {config.hidden}): trained on "
          f"1700-{2008 - config.held_out_years}, judged on the {config.held_out_years} held-out years after.")
    print(f"Training: windows of {config.window} years, truncated BPTT in chunks of {config.chunk} steps, "
          f"gradient norm clipped at {config.clip}, Adam lr {config.lr}, {config.epochs} epochs; the average of "
          f"{config.members} such models, seed {config.seed}, on {config.device}.")
    with tqdm(total=config.epochs * config.members, desc="training", unit="epoch",
              disable=_progress_off(args)) as bar:
        def on_epoch(epoch, loss):
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()
        result = demo.train_forecaster(config, on_epoch)
    print("\nOne-year-ahead RMSE on the held-out years (sunspot number):")
    names = {"model": args.cell.upper(), **{k: k for k in result.baselines}}
    width = max(len(n) for n in names.values())
    for key, name in names.items():
        print(f"  {name:<{width}}  {result.rmse[key]:6.2f}")
    best_baseline = min(result.rmse[k] for k in result.baselines)
    if result.rmse["model"] < best_baseline:
        print(f"The {args.cell.upper()} beats both baselines "
              f"({(1 - result.rmse['model'] / best_baseline) * 100:.1f}% below the better one).")
    else:
        print(f"The {args.cell.upper()} does not beat the better baseline this time.")
    if args.plot is not None:
        demo.plot_forecast(result, args.plot, args.cell)
        print(f"Forecast plot written to {args.plot}")
    return 0


def _demo_gradients(args, demo) -> int:
    profiles = demo.gradient_profiles(seed=args.seed)
    steps = len(next(iter(profiles.values())).norms)
    print(f"Gradient of a loss on the last of {steps} steps, reaching each earlier step's hidden state "
          "(hidden 32, default initialisation, the same input sequence):")
    print(f"  {'cell':9}{'factor/step':>12}{'first/last':>13}  verdict")
    for cell, flow in profiles.items():
        print(f"  {cell.upper():9}{flow.factor_per_step:>12.3f}{flow.span:>13.2e}  {flow.verdict}")
    print("factor/step: fitted change of ||dL/dh_t|| per step back in time; first/last: that factor over "
          "the whole sequence.")
    if args.plot is not None:
        demo.plot_gradient_profiles(profiles, args.plot)
        print(f"Gradient profiles written to {args.plot}")
    return 0


# ---- bench ------------------------------------------------------------------------------------------


def _parse_shape(text: str) -> tuple:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdecimal() and 0 < int(p) <= _bench_report.MAX_SIZE for p in parts):
        raise ValueError(f"shape: expected T,B,I,H as four integers in [1, {_bench_report.MAX_SIZE}], got {text!r}")
    return tuple(int(p) for p in parts)


def _bench_cases(args, old_report) -> tuple:
    """The cases to time and the sweep (or None), from the options; an earlier report's cases when
    --compare stands alone."""
    if args.set is not None and (args.cell or args.shape or args.sweep):
        raise ValueError("set: give either --set or --cell/--shape/--sweep, not both")
    modes = args.mode or benchmark.MODES
    cells = args.cell or benchmark.DEFAULT_CELLS
    for name, values in (("mode", modes), ("cell", cells), ("shape", [_parse_shape(s) for s in args.shape or ()])):
        _checks.distinct(name, values)
    if args.sweep:
        sweep = _bench_report.parse_sweep(args.sweep)
        if args.shape and len(args.shape) != 1:
            raise ValueError(f"sweep: give one base --shape to vary, got {len(args.shape)}")
        base = _parse_shape(args.shape[0]) if args.shape else benchmark.DEFAULT_SHAPES[0]
        return benchmark.cases_for(cells, sweep.shapes(base), modes), sweep
    if args.cell or args.shape:
        shapes = [_parse_shape(s) for s in args.shape] if args.shape else benchmark.DEFAULT_SHAPES
        return benchmark.cases_for(cells, shapes, modes), None
    if old_report is not None and args.set is None:
        cases, sweep = _bench_report.report_cases(old_report), _bench_report.report_sweep(old_report)
    else:
        cases, sweep = benchmark.named_cases("default" if args.set is None else args.set), None
    if args.mode:  # the modes asked for, of those each case has
        cases = [dataclasses.replace(c, modes=tuple(m for m in c.modes if m in modes)) for c in cases]
        cases = [c for c in cases if c.modes]
        if not cases:
            raise ValueError(f"mode: no case of these has the mode {' or '.join(modes)}")
    return cases, sweep


def _bench(args) -> int:
    # Every argument is checked, and the optional packages found, before anything is timed.
    old_report = _bench_report.load_report(args.compare) if args.compare else None
    if old_report is None and (args.threshold is not None or args.fail_on_slower):
        raise ValueError("threshold, fail-on-slower: they judge a --compare; give one")
    threshold = 5.0 if args.threshold is None else args.threshold
    if not threshold >= 0:
        raise ValueError(f"threshold: expected a percentage >= 0, got {threshold}")
    if args.plot is not None:
        _bench_report.check_plot_path(args.plot)
    if args.json is not None and args.json != "-":
        _bench_report.check_output_path(args.json, "json")
    cases, sweep = _bench_cases(args, old_report)
    if args.peers:
        peers = args.peers
    elif old_report is not None:
        peers = _bench_report.report_peers(old_report)
    else:
        peers = benchmark.available_peers(args.device, cases)
    peers = benchmark.check_peers(peers, args.device, cases)
    benchmark.set_threads(peers, args.threads)
    to_stdout = args.json == "-"
    say = (lambda text: print(text, file=sys.stderr)) if to_stdout else tqdm.write
    table = benchmark.Table(peers, show_input_size=any(c.input_size != c.hidden for c in cases))
    meta = benchmark.metadata(peers, args.threads, args.rounds, args.repeats)
    say(benchmark.describe_run(meta))
    if sweep is not None:
        say(f"Sweep of {sweep.describe((cases[0].steps, cases[0].batch, cases[0].input_size, cases[0].hidden))}")
    if not to_stdout:
        tqdm.write(table.header())
    rows = []
    stopped = None  # why the timing stopped early (the rows so far are still written where asked), and the status
    with tqdm(total=len(cases) * args.rounds, desc="timing", unit="round", disable=_progress_off(args),
              file=sys.stderr) as bar:
        try:
            for case in cases:
                for row in benchmark.run_case(case, peers, rounds=args.rounds, repeats=args.repeats,
                                              on_round=bar.update, memory=args.memory):
                    rows.append(row)
                    if not to_stdout:
                        tqdm.write(table.line(row))
        except KeyboardInterrupt:
            stopped = "Interrupted", 130
        except (MemoryError, RuntimeError) as err:  # torch reports running out as a RuntimeError
            if not isinstance(err, MemoryError) and not re.search(r"can't allocate memory|out of memory", str(err)):
                raise
            stopped = (f"Not enough memory for {case.label} {case.steps},{case.batch},{case.input_size},"
                       f"{case.hidden}"), 2
    if stopped is not None:
        meta["interrupted_after_rows"] = len(rows)
        say(f"{stopped[0]}: {len(rows)} of {sum(len(c.modes) for c in cases)} rows timed"
            + ("; writing those" if rows and (args.json or args.plot) else ""))
        if not rows:
            return stopped[1]
    if sweep is not None:
        timed = [v for v in sweep.values if v in {row[sweep.axis] for row in rows}]  # all, unless interrupted
        if len(timed) > 1:  # else a report of plain cases
            meta["sweep"] = {"axis": sweep.axis, "values": timed}
    if args.memory:
        from . import _bench_memory
        meta["memory"] = {"saved_bytes": _bench_memory.SAVED_METHOD, "peak_rss_bytes": _bench_memory.PEAK_METHOD}
        say("\nMemory (kept: for backward, training rows; peak: resident-set growth of one call):")
        say(_bench_report.memory_table(rows, peers))
    report = {"meta": meta, "rows": rows}
    if to_stdout:
        json.dump(report, sys.stdout, indent=1)
        print()
    elif args.json:
        benchmark.write_json(args.json, meta, rows)
    if args.plot is not None:
        _bench_report.plot_rows(rows, peers, args.plot, sweep)
        say(f"Plot written to {args.plot}")
    status = 0
    if old_report is not None:
        changes = _bench_report.compare_reports(old_report, report, threshold / 100)
        say(f"\nAgainst {args.compare}:")
        say(_bench_report.format_comparison(changes, old_report, report, threshold / 100))
        if args.fail_on_slower and any(c.verdict == "slower" for c in changes):
            status = 1
        elif args.fail_on_slower and not changes:
            say("fail-on-slower: nothing to judge, so this run fails")
            status = 2
    return status if stopped is None else stopped[1]


# ---- info -------------------------------------------------------------------------------------------

OPTIONAL = {"torch": "bench peer, torch parity tests", "jax": "fusedrnn.jax, bench peers; the jax extra",
            "flax": "fusedrnn.jax.nnx, bench peer; the flax extra", "optax": "the JAX demo; the flax extra",
            "cupy": "GPU arrays", "matplotlib": "plots (the plot extra)"}


def _info(args) -> int:
    info = build_info()
    print(f"fusedrnn {info['version']}")
    print(f"  SIMD: {info['simd']} (this CPU supports: {', '.join(info['simd_supported'])}; "
          f"compiled: {', '.join(info.get('simd_compiled', info['simd_supported']))})")
    cuda = info["cuda"]
    if not cuda["installed"]:
        print(f"  CUDA: none ({cuda['error']})")
    elif not cuda["loaded"]:
        print(f"  CUDA: {cuda['source']}, does not load: {cuda['error']}")
    else:
        print(f"  CUDA: {cuda['source']}, built for sm {cuda['architectures']} (nvcc {cuda['nvcc']}, runtime "
              f"{cuda['runtime']}), {cuda['devices']} device(s)")
        for index, name in enumerate(cuda["device_names"]):
            print(f"    cuda:{index}: {name}")
        print(f"    XLA FFI handlers (fusedrnn.jax on GPUs): "
              f"{'built against jaxlib ' + cuda['jax_ffi'] if cuda['jax_ffi'] else 'not compiled in'}")
    jax_ffi = info["jax_ffi"]
    print(f"  XLA FFI handlers (fusedrnn.jax): "
          f"{'built against jaxlib ' + jax_ffi if jax_ffi else 'not compiled in (no jaxlib at build time)'}")
    print(f"  BLAS: {info['blas_name']} ({info['blas']})")
    if info["blas_library"]:
        print(f"    loaded from {info['blas_library']}")
    forced = benchmark.openblas_overrides()
    if forced:
        # What OpenBLAS made of them (a name it maps to another, or ignores) shows only in its build string.
        print(f"    set in the environment: {', '.join(f'{k}={v}' for k, v in forced.items())} (OpenBLAS reads "
              "them as it loads: the kernels it runs are those its build string above names)")
    limit = info["cgroup_cpu_limit"]
    print(f"  threads: {info['num_threads']}, on "
          f"{'the OpenMP runtime ' + info['openmp_runtime'] if info['openmp_runtime'] else 'its own workers'} "
          f"(default {info['default_num_threads']}: the CPUs this process may run on"
          f"{f', within its cgroup CPU limit of {limit}' if limit else ''})")
    print("Optional packages:")
    for name, use in OPTIONAL.items():
        problem = import_problem(name)
        print(f"  {name:11}{problem or 'importable':15}({use})" if problem in (None, NOT_INSTALLED)
              else f"  {name:11}installed, but fails to import ({use}): {problem}")
    print(f"Benchmark peers available: {', '.join(benchmark.available_peers())}")
    return 0
