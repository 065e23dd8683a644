"""The ``pwff`` command.

    pwff reproduce pftt [--quick | --medium] [--adapter-sizes 8 16 32 64] [--seeds 3] [--out DIR] [--app DIR]
                        [--methods ...] [--data-dir DIR] [--client-cpus 1] [--client-gpus 0.25]
    pwff reproduce compression [--seeds 3] [--out DIR] [...the same run options]
    pwff sweep --method pftt --set KEY=V1,V2,... [--base KEY=VALUE ...] [--quick] [--seeds 2] [--out DIR]
    pwff report RUN_DIR [RUN_DIR ...] [--out DIR]
    pwff reproduce pfit [--quick] [--methods ...] [...the same run options]
    pwff train-rewards [...]      (forwards to pwff_app.instruct.rewards.main)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options every command that launches `flwr run`s shares (seeds, folders, resources)."""
    from pwff_app.experiments.profiles import DEFAULT_SEED_BASE

    p.add_argument("--seeds", type=int, default=3, metavar="N", help="number of seeds (default 3)")
    p.add_argument("--seed-base", type=int, default=DEFAULT_SEED_BASE,
                   help=f"first seed; seeds are BASE..BASE+N-1 (default {DEFAULT_SEED_BASE})")
    p.add_argument("--out", type=Path, default=None, help="output folder (default under pwff-reproduce/)")
    p.add_argument("--app", type=Path, default=None, help="Flower app folder (default: this package's project)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="local data folder (PWFF_DATA_DIR); default: $PWFF_DATA_DIR or the Hub")
    p.add_argument("--client-cpus", type=float, default=1, metavar="N",
                   help="CPU cores per simulated client (Flower's client-resources-num-cpus; default 1)")
    p.add_argument("--client-gpus", type=float, default=0, metavar="F",
                   help="share of a GPU per simulated client (client-resources-num-gpus; 0.25 = 4 clients "
                        "per GPU; default 0)")
    p.add_argument("--aggregate-only", action="store_true",
                   help="run nothing; only rebuild the table and plots from finished runs in --out")


def _profile_help(name: str) -> str:
    """Help of a profile flag: its overrides, and that without a flag the paper's profile runs."""
    from pwff_app.experiments.profiles import PROFILES

    overrides = " ".join(f"{k}={v}" for k, v in PROFILES[name].items())
    return f"{'small' if name == 'quick' else name} profile ({overrides}); default: the paper's profile (40 rounds)"


def _reproduce_parser(sub: argparse._SubParsersAction) -> None:
    from pwff_app.experiments.profiles import ALL_METHODS, MEDIUM_METHODS, PFIT_METHODS, PROFILES, WIDTH_CONTENDERS

    p = sub.add_parser("reproduce", help="reproduce a figure of the paper through real `flwr run`s")
    which = p.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    f = which.add_parser("pftt", help="Fig. 5: PFTT vs vanilla FL, FedLoRA, FedBert (+ local, fedavg-full)",
                         description="Run every method for several seeds through `flwr run` (resuming: "
                                     "runs with a summary.json are skipped), then write comparison.csv, "
                                     "comparison.md and PNG plots into --out.")
    size = f.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=_profile_help("quick"))
    size.add_argument("--medium", action="store_true",
                      help="medium profile (" + " ".join(f"{k}={v}" for k, v in PROFILES["medium"].items())
                      + f"); methods default to {' '.join(MEDIUM_METHODS)}")
    f.add_argument("--methods", nargs="+", default=None, choices=list(ALL_METHODS), metavar="METHOD",
                   help=f"methods to run (default: all of {' '.join(ALL_METHODS)}; with --medium "
                        f"{' '.join(MEDIUM_METHODS)}; with --adapter-sizes {' '.join(WIDTH_CONTENDERS)})")
    f.add_argument("--adapter-sizes", nargs="+", type=int, default=None, metavar="WIDTH",
                   help="run PFTT once per adapter width (rows pftt-a<WIDTH>, task.adapter-size) in place of "
                        "pftt, beside the other --methods")
    _add_run_options(f)
    f.set_defaults(func=_cmd_reproduce_pftt)
    c = which.add_parser("compression", help="issue 17: PFTT with none, fp16, int8, top-k 0.1 (with and without "
                                             "error feedback) and adaptive uplinks",
                         description="PFTT on the quick profile with each uplink codec, several seeds, through "
                                     "`flwr run` (resuming); writes comparison.csv, comparison.md and PNG plots "
                                     "(accuracy vs cumulative uplink bytes among them) into --out.")
    _add_run_options(c)
    c.set_defaults(func=_cmd_reproduce_compression)
    i = which.add_parser("pfit", help="Fig. 4: PFIT vs PFL, SFL and Shepherd, judged on held-out test prompts",
                         description="Run PFIT, PFL, SFL and Shepherd for several seeds through `flwr run` "
                                     "(resuming: runs with a summary.json of this config and code are skipped), "
                                     "then write comparison.csv, comparison.md (final judge and training-RM "
                                     "rewards, uplink bytes, delay, energy) and PNG plots into --out.")
    i.add_argument("--quick", action="store_true",
                   help="2-CPU profile (" + " ".join(f"{k}={v}" for k, v in PROFILES["pfit-quick"].items())
                   + "); default: the paper's profile (4 clients, 40 rounds), meant for a GPU")
    i.add_argument("--methods", nargs="+", default=list(PFIT_METHODS), choices=list(PFIT_METHODS),
                   metavar="METHOD", help=f"methods to run (default: all of {' '.join(PFIT_METHODS)})")
    _add_run_options(i)
    i.set_defaults(func=_cmd_reproduce_pfit)


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="one method over a grid of one setting (e.g. a wireless one), several seeds",
                       description="Run METHOD once per value of one run-config key and seed through `flwr run` "
                                   "(resuming like `reproduce`), then write sweep.md, comparison.md and plots "
                                   "(accuracy vs the value, vs cumulative air time, vs cumulative uplink energy) "
                                   "into --out. Example: pwff sweep --method pftt --set wireless.deadline-s=0,20,60 "
                                   "--base wireless.scenario=uma num-clients=8 clients-per-round=4 --quick")
    p.add_argument("--method", default="pftt", help="the method to run (default pftt)")
    p.add_argument("--set", dest="grid", required=True, metavar="KEY=V1,V2,...",
                   help="the swept run-config key and its values (';' separates values that hold commas)")
    p.add_argument("--base", nargs="*", default=[], metavar="KEY=VALUE",
                   help="run-config overrides every run of the sweep shares (num-clients sets the SuperNodes)")
    p.add_argument("--quick", action="store_true", help=_profile_help("quick"))
    _add_run_options(p)
    p.set_defaults(func=_cmd_sweep)


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="per-round table and plots of finished runs (flwr run or reproduce)",
                       description="Print each run's per-round table (score per client, bytes, latency, delay, "
                                   "energy, lost updates, training loss) and write rounds.md, comparison.csv, "
                                   "comparison.md and the plots of `pwff reproduce`; several runs are overlaid.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="a run folder (<results-dir>/<run-name>, or <out>/runs/<name>-seed<S> of reproduce)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: the run folder for one run, ./report for several)")
    p.set_defaults(func=_cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pwff", description="pwff: personalized wireless federated fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _reproduce_parser(sub)
    _sweep_parser(sub)
    _report_parser(sub)
    sub.add_parser("train-rewards", help="train the reward models (forwards to pwff_app.instruct.rewards)", add_help=False)
    return parser


def run_variants(args: argparse.Namespace, variants: Sequence, profile: str, default_out: Path,
                 title: str) -> int:
    """Run (or with ``--aggregate-only`` only tabulate) ``variants`` x the seeds of ``args``; exit status."""
    from pwff_app.experiments import reproduce, tables

    out = args.out or default_out
    if args.seeds < 1:
        print("pwff: --seeds must be at least 1", file=sys.stderr)
        return 2
    seeds = list(range(args.seed_base, args.seed_base + args.seeds))
    if args.aggregate_only:
        rows, files = reproduce.tabulate(out, variants, seeds, profile, title)
        if not rows:
            print(f"pwff: no finished runs under {out}/runs", file=sys.stderr)
            return 1
        other = reproduce.unkeyed_runs(out, variants, seeds, profile, args.app, args.data_dir)
        if other:  # tabulated as asked, but said: a run without --aggregate-only reruns them
            print(f"pwff: warning: {len(other)} run(s) tabulated were made by another config or code version "
                  f"than this one would use (a rerun without --aggregate-only replaces them): {' '.join(other)}",
                  file=sys.stderr)
        print(tables.markdown_table(rows))
        print("\n".join(str(p) for p in files))
        return 0
    try:
        result = reproduce.reproduce(out, variants, profile, seeds, args.app, args.data_dir,
                                     args.client_cpus, args.client_gpus, title)
    except ValueError as err:  # a setting that cannot work: one line, nothing run
        print(f"pwff: {err}", file=sys.stderr)
        return 2
    return 1 if result.failed else 0


def _cmd_reproduce_pftt(args: argparse.Namespace) -> int:
    from pwff_app.experiments.profiles import (ALL_METHODS, MEDIUM_METHODS, WIDTH_CONTENDERS,
                                               adapter_width_variants)
    from pwff_app.experiments.tables import PFTT_TITLE, WIDTHS_TITLE

    profile = "quick" if args.quick else "medium" if args.medium else "full"
    if args.adapter_sizes is None:
        methods = args.methods or list(MEDIUM_METHODS if args.medium else ALL_METHODS)
        return run_variants(args, methods, profile, Path("pwff-reproduce") / f"pftt-{profile}", PFTT_TITLE)
    if any(n < 1 for n in args.adapter_sizes):
        print("pwff: --adapter-sizes must be positive integers", file=sys.stderr)
        return 2
    others = [m for m in (args.methods or WIDTH_CONTENDERS) if m != "pftt"]
    variants = adapter_width_variants(dict.fromkeys(args.adapter_sizes)) + others
    return run_variants(args, variants, profile, Path("pwff-reproduce") / f"pftt-widths-{profile}", WIDTHS_TITLE)


def _cmd_reproduce_compression(args: argparse.Namespace) -> int:
    from pwff_app.experiments.profiles import COMPRESSION_VARIANTS
    from pwff_app.experiments.tables import COMPRESSION_TITLE

    return run_variants(args, COMPRESSION_VARIANTS, "quick", Path("pwff-reproduce") / "compression-quick",
                        COMPRESSION_TITLE)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pwff_app.experiments import reproduce, sweep
    from pwff_app.experiments.profiles import build_run_config, profile_header

    profile = "quick" if args.quick else "full"
    try:
        key, values = sweep.parse_grid(args.grid)
        base = {k: sweep.parse_value(v) for k, v in map(sweep.parse_assignment, args.base)}
        variants = sweep.sweep_variants(args.method, key, values, base)
        seeds = list(range(args.seed_base, args.seed_base + max(args.seeds, 1)))
        for v in variants:  # every value is a valid config before anything runs
            reproduce.expected_config(args.app or reproduce.APP_DIR,
                                      build_run_config(v, seeds[0], Path("/tmp"), profile), args.data_dir)
    except ValueError as err:  # a bad --set / --base, or a value the config refuses (ConfigError)
        print(f"pwff sweep: {err}", file=sys.stderr)
        return 2
    out = args.out or Path("pwff-reproduce") / f"sweep-{args.method}-{key.rsplit('.', 1)[-1]}-{profile}"
    status = run_variants(args, variants, profile, out, f"{args.method}: sweep of {key}")
    rows, _ = reproduce.tabulate(out, variants, seeds, profile, f"{args.method}: sweep of {key}")
    if rows:
        every = " ".join(f"{k}={v}" for k, v in base.items()) or "nothing else"
        header = f"{profile_header(profile, seeds)} Swept `{key}` over {values}; every run also: {every}."
        files = sweep.write_sweep(out, rows, variants, key, values, header)
        print((out / "sweep.md").read_text())
        print("\n".join(str(f) for f in files))
    return status


def _cmd_report(args: argparse.Namespace) -> int:
    from pwff_app.experiments import report

    try:
        text, files = report.report(args.run_dirs, args.out)
    except report.NotARunError as err:
        print(f"pwff: {err}", file=sys.stderr)
        return 2
    print(text)
    print("\n".join(str(p) for p in files))
    return 0


def _cmd_reproduce_pfit(args: argparse.Namespace) -> int:
    from pwff_app.experiments.tables import PFIT_TITLE

    profile = "pfit-quick" if args.quick else "pfit-full"
    return run_variants(args, args.methods, profile, Path("pwff-reproduce") / profile, PFIT_TITLE)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-rewards":
        from pwff_app.instruct import rewards  # lazy: torch and friends load only for this command

        rc = rewards.main(argv[1:])
        return int(rc or 0)
    args = build_parser().parse_args(argv)
    return args.func(args)  # each command's parser sets its handler


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
