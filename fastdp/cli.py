"""The ``fastdp`` command: run experiments, compute privacy, benchmark, report.

    fastdp run [CONFIG]           federated non-private vs DP training, the attack, the report
    fastdp epsilon ...            epsilon of DP-SGD (sample rate, sigma, steps, delta)
    fastdp calibrate ...          sigma that reaches a target epsilon
    fastdp attack [CONFIG]        gradient inversion against a trained run's model
    fastdp report RUN_DIR         (re)write RUN_DIR/report.md and its plots
    fastdp config [CONFIG]        print the resolved config as TOML
    fastdp bench {step,ops} ...   the benchmarks in benchmarks/
    fastdp credentials DIR ...    a CA, a SuperLink TLS certificate and SuperNode keys for Flower

Also ``python -m fastdp``. The federated engine, the attacks and matplotlib are imported only by
the subcommands that use them.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]

_EPILOG = """\
examples:
  fastdp run                                   # the built-in demo (3 phantom sites, FL vs DP-FL, attack)
  fastdp run configs/paper_liver_256.toml --set data.msd_path=/data/Task03_Liver
  fastdp epsilon --sample-rate 0.01 --sigma 1.1 --steps 10000 --delta 1e-5
  fastdp calibrate --target-epsilon 8 --sample-rate 0.05 --steps 100
  fastdp report runs/demo
  fastdp config --show configs/demo.toml --set federated.rounds=3
  fastdp bench step -- --batches 16 --sizes 64
  fastdp credentials certs --host superlink.example.org --nodes 3   # TLS + SuperNode keys for Flower
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps epilog line breaks and shows defaults."""


class CLIError(Exception):
    """An error the user can fix: printed as ``fastdp: error: ...`` with exit status 2."""


# ----------------------------------------------------------------------------- accounting


def _sample_rate(args: argparse.Namespace) -> float:
    if args.sample_rate is not None:
        if args.batch_size is not None or args.dataset_size is not None:
            raise CLIError("give --sample-rate or --batch-size with --dataset-size, not both")
        q = args.sample_rate
    elif args.batch_size is not None and args.dataset_size is not None:
        q = args.batch_size / args.dataset_size
    else:
        raise CLIError("give --sample-rate Q, or --batch-size B and --dataset-size N (Q = B / N)")
    if not 0 < q <= 1:
        raise CLIError(f"the sample rate must be in (0, 1], got {q}")
    return q


def _quiet_absl() -> None:
    # dp-accounting logs a warning for every RDP order that does not converge: noise, not news.
    logging.getLogger("absl").setLevel(logging.ERROR)


def _cmd_epsilon(args: argparse.Namespace) -> int:
    from fastdp.accounting import compute_epsilon

    _quiet_absl()
    q = _sample_rate(args)
    if args.sigma < 0 or args.steps < 0:
        raise CLIError("--sigma and --steps must be non-negative")
    try:
        eps = compute_epsilon(q, args.sigma, args.steps, args.delta, args.accountant)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    result = {
        "epsilon": eps,
        "delta": args.delta,
        "sample_rate": q,
        "noise_multiplier": args.sigma,
        "steps": args.steps,
        "accountant": args.accountant,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"epsilon = {eps:.4f}  at delta = {args.delta:g}")
        print(f"  ({args.steps} Poisson-sampled steps, sample rate {q:.6g}, sigma {args.sigma:g}, {args.accountant})")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from fastdp.accounting import compute_epsilon, get_noise_multiplier

    _quiet_absl()
    q = _sample_rate(args)
    if args.steps < 1:
        raise CLIError("--steps must be a positive integer")
    try:
        sigma = get_noise_multiplier(args.target_epsilon, args.delta, q, args.steps, args.accountant)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    eps = compute_epsilon(q, sigma, args.steps, args.delta, args.accountant)
    result = {
        "noise_multiplier": sigma,
        "epsilon": eps,
        "target_epsilon": args.target_epsilon,
        "delta": args.delta,
        "sample_rate": q,
        "steps": args.steps,
        "accountant": args.accountant,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"sigma (noise multiplier) = {sigma:.6g}")
        print(f"  gives epsilon = {eps:.4f} (target {args.target_epsilon:g}) at delta = {args.delta:g}")
        print(f"  ({args.steps} Poisson-sampled steps, sample rate {q:.6g}, {args.accountant})")
    return 0


# ----------------------------------------------------------------------------- experiments


def _load(args: argparse.Namespace):
    from fastdp.experiment import load_config

    return load_config(args.config, getattr(args, "set", None) or [])


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    source = args.config or "built-in demo defaults"
    print(f"# fastdp experiment config (resolved from {source})")
    print(cfg.to_toml(), end="")
    return 0


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="[fastdp] %(message)s")
    _quiet_absl()


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.out_dir:
        cfg = cfg.replace(out_dir=args.out_dir)
    extra = {}
    if cfg.federated.backend == "flower":
        from fastdp.flower import run_experiment  # ImportError without the extra: main says what to install

        extra["insecure"] = args.insecure
    else:
        from fastdp.experiment.runner import run_experiment

        if args.insecure:
            raise CLIError('--insecure is for the Flower backend (federated.backend = "flower") only')
    _logging(args.verbose)
    run_dir = run_experiment(cfg, progress=not args.no_progress, report=not args.no_report, fresh=args.fresh, **extra)
    print(f"run folder: {run_dir}")
    if not args.no_report:
        print(f"report: {run_dir / 'report.md'}")
    return 0


def _cmd_credentials(args: argparse.Namespace) -> int:
    from fastdp.flower.credentials import make_ca, make_node_key, make_server_certificate

    out = Path(args.out_dir)
    if (out / "ca.key").exists() and not args.force:
        raise CLIError(f"{out / 'ca.key'} exists: a new CA would invalidate every certificate it signed (--force)")
    if args.nodes < 0:
        raise CLIError(f"--nodes must be >= 0, got {args.nodes}")
    ca = make_ca(out, name=args.name, days=args.days)
    server = make_server_certificate(ca, out, hosts=args.host or ["127.0.0.1", "localhost"], days=args.days)
    keys = [make_node_key(out / "nodes", f"{args.node_prefix}{k}") for k in range(args.nodes)]
    print(f"CA:                 {ca.cert}   (give to every SuperNode and flwr host: --root-certificates)")
    print(f"CA key:             {ca.key}   (keep offline; signs new server certificates)")
    print(f"SuperLink TLS:      {server.cert}, {server.key}   (server host only)")
    for key in keys:
        print(f"SuperNode key:      {key.private}   (that hospital only: --auth-supernode-private-key)")
        print(f"  register with:    flwr supernode register {key.public} <connection>")
    return 0


def _cmd_attack(args: argparse.Namespace) -> int:
    from fastdp.experiment.data import build_data
    from fastdp.experiment.runner import run_attack

    cfg = _load(args)
    run_dir = Path(args.run_dir or cfg.out_dir)
    _logging(args.verbose)
    model = None  # attack.target = "round1": the initial global model, rebuilt from the seed
    if args.model:
        model = Path(args.model)
        if not model.is_file():
            raise CLIError(f"--model {model}: no such file")
    elif cfg.attack.target == "final":
        model = run_dir / "nonprivate" / "global_model.pt"
        if not model.is_file():
            raise CLIError(f"attack.target = 'final' but there is no trained model at {model}: run `fastdp run` first")
    import torch

    torch.set_num_threads(cfg.threads)
    result = run_attack(cfg, build_data(cfg.data, cfg.seed), run_dir, model)
    from fastdp.report import attack_metric_rows, markdown_table

    print(markdown_table(attack_metric_rows(result)), end="")
    print(f"results: {run_dir / 'attack' / 'attack.json'}")
    if any(run_dir.glob("*/history.json")):
        from fastdp.report import write_report

        print(f"report: {write_report(run_dir)}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fastdp.report import write_report

    attack = None
    if args.attack_json:
        try:
            attack = json.loads(Path(args.attack_json).read_text())
        except (OSError, ValueError) as exc:
            raise CLIError(f"--attack-json {args.attack_json}: {exc}") from None
    try:
        path = write_report(
            args.run_dir,
            attack,
            title=args.title,
            attack_dir=Path(args.attack_json).parent if args.attack_json else None,
            plots=not args.no_plots,
        )
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    print(path)
    return 0


# ----------------------------------------------------------------------------- benchmarks

_BENCHES = {"step": "bench_step.py", "ops": "bench_ops.py"}


def _cmd_bench(args: argparse.Namespace) -> int:
    # The benchmarks live in the source tree next to the package (an editable install or a clone).
    script = Path(__file__).resolve().parent.parent / "benchmarks" / _BENCHES[args.which]
    if not script.is_file():
        raise CLIError(f"{script} not found: the benchmarks ship with the source tree, run from a clone of fastdp")
    extra = list(args.args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return subprocess.call([sys.executable, str(script), *extra])


# ----------------------------------------------------------------------------- parser


def _add_privacy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample-rate", "-q", type=float, help="Poisson sampling rate q = E[batch size] / dataset size")
    p.add_argument("--batch-size", type=int, help="expected batch size (with --dataset-size, instead of -q)")
    p.add_argument("--dataset-size", type=int, help="training set size (with --batch-size)")
    p.add_argument("--steps", "-n", type=int, required=True, help="number of DP-SGD steps")
    p.add_argument("--delta", "-d", type=float, default=1e-5, help="target delta")
    p.add_argument(
        "--accountant",
        choices=("rdp", "pld", "prv", "gdp"),  # fastdp.accounting.ACCOUNTANTS (the CLI imports it lazily)
        default="rdp",
        help="privacy accountant (prv: numerical, PrivacyEngine's default; gdp: a CLT approximation)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML or YAML experiment config (default: the built-in demo)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value (TOML syntax, repeatable), e.g. --set federated.rounds=3",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``fastdp`` command."""
    from fastdp import __version__

    parser = argparse.ArgumentParser(
        prog="fastdp",
        description="Fast differentially private federated learning for CT segmentation.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fastdp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="run an experiment: federated training per mode, the attack, the report",
        description="Trains every configured run (non-private FL, DP-FL, ...) with fastdp.federated, attacks the "
        "shared updates, and writes OUT_DIR/report.md. Rerunning resumes from the checkpoints.",
        epilog="examples:\n  fastdp run\n  fastdp run configs/demo.toml --set federated.rounds=3 --out-dir runs/quick\n"
        "  fastdp run configs/demo.toml --set federated.backend=flower   # over Flower, one SuperNode per site\n"
        "  fastdp run configs/paper_liver_256.toml --set data.msd_path=/data/Task03_Liver",
        formatter_class=_Formatter,
    )
    _add_config_args(p)
    p.add_argument("--out-dir", help="run folder (overrides the config's out_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="do not write report.md")
    p.add_argument("--fresh", action="store_true", help="discard the run folder's checkpoints and train from scratch")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="Flower backend only: no TLS and no SuperNode authentication (a warning says so); default: TLS with a "
        "generated CA and registered SuperNodes",
    )
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "credentials",
        help="a private CA, a SuperLink TLS certificate and SuperNode keys for a Flower federation",
        description="Writes OUT_DIR/ca.crt + ca.key (a new CA), OUT_DIR/server.crt + server.key (the SuperLink's TLS "
        "certificate for every --host) and OUT_DIR/nodes/<prefix>K + .pub (SuperNode authentication keys, "
        "ECDSA P-384, OpenSSH format). Private keys are written with mode 0600. See docs/flower.md.",
        epilog="examples:\n  fastdp credentials certs --host superlink.hospital-net.org --host 10.0.0.5 --nodes 3",
        formatter_class=_Formatter,
    )
    p.add_argument("out_dir", help="folder for the files")
    p.add_argument("--host", action="append", help="a name or IP address the SuperLink is reached at (repeatable)")
    p.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to make")
    p.add_argument("--node-prefix", default="hospital-", help="SuperNode key file names: PREFIX0, PREFIX1, ...")
    p.add_argument("--name", default="fastdp federation CA", help="the CA's common name")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")
    p.add_argument("--force", action="store_true", help="overwrite an existing CA")
    p.set_defaults(func=_cmd_credentials)

    p = sub.add_parser(
        "epsilon",
        help="epsilon of DP-SGD from sample rate, sigma, steps and delta",
        description="Epsilon spent by STEPS Poisson-sampled Gaussian steps (fastdp.accounting.compute_epsilon).",
        epilog="examples:\n  fastdp epsilon --sample-rate 0.01 --sigma 1.1 --steps 10000\n"
        "  fastdp epsilon --batch-size 32 --dataset-size 600 --sigma 0.76 --steps 100 --accountant pld",
        formatter_class=_Formatter,
    )
    _add_privacy_args(p)
    p.add_argument("--sigma", "-s", type=float, required=True, help="noise multiplier (noise std / clip norm)")
    p.set_defaults(func=_cmd_epsilon)

    p = sub.add_parser(
        "calibrate",
        help="the noise multiplier sigma that reaches a target epsilon",
        description="Smallest sigma with epsilon <= TARGET after STEPS steps (fastdp.accounting.get_noise_multiplier).",
        epilog="examples:\n  fastdp calibrate --target-epsilon 8 --sample-rate 0.05 --steps 100\n"
        "  fastdp calibrate --target-epsilon 1 --batch-size 16 --dataset-size 5000 --steps 3000 --json",
        formatter_class=_Formatter,
    )
    _add_privacy_args(p)
    p.add_argument("--target-epsilon", "-e", type=float, required=True, help="epsilon to reach")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser(
        "attack",
        help="gradient inversion on a site's update, non-private vs DP",
        description="Attacks one site's update (non-private and with the DP run's noise), computed from the "
        "round-1 global model (attack.target = 'round1', the default) or from RUN_DIR's trained non-private global "
        "model (attack.target = 'final'), and writes RUN_DIR/attack/ (and the report if RUN_DIR has runs).",
        epilog="examples:\n  fastdp attack                       # the demo's run folder runs/demo\n"
        "  fastdp attack configs/demo.toml --set attack.steps=500 --set attack.batch_sizes=[1,4]",
        formatter_class=_Formatter,
    )
    _add_config_args(p)
    p.add_argument("--run-dir", help="run folder (default: the config's out_dir)")
    p.add_argument(
        "--model",
        help="state_dict to attack (default: attack.target: the round-1 model, or RUN_DIR/nonprivate/global_model.pt)",
    )
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=_cmd_attack)

    p = sub.add_parser(
        "report",
        help="(re)write RUN_DIR/report.md and RUN_DIR/plots/",
        description="Summary table, Dice/epsilon/time plots and the attack grid from the history.json of every run "
        "in RUN_DIR (and RUN_DIR/attack/attack.json if present).",
        epilog="examples:\n  fastdp report runs/demo\n  fastdp report runs/demo --attack-json my_attack/results.json",
        formatter_class=_Formatter,
    )
    p.add_argument("run_dir", help="run folder with one sub-folder (holding history.json) per run")
    p.add_argument("--attack-json", help="attack results JSON (default: RUN_DIR/attack/attack.json)")
    p.add_argument("--title", help="report title (default: the folder name)")
    p.add_argument("--no-plots", action="store_true", help="tables only, no PNG plots (fast)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "config",
        help="print the resolved experiment config as TOML",
        description="Loads and validates CONFIG (default: the built-in demo), applies --set overrides and prints the "
        "result as TOML: a starting point for your own config.",
        epilog="examples:\n  fastdp config --show > my.toml\n"
        "  fastdp config --show configs/demo.toml --set dp.target_epsilon=2",
        formatter_class=_Formatter,
    )
    _add_config_args(p)
    p.add_argument("--show", action="store_true", help="print the config (the default action)")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser(
        "bench",
        help="run benchmarks/bench_step.py or bench_ops.py",
        description="Runs a benchmark script from the source tree with this Python; arguments after the name "
        "(after an optional --) go to the script.",
        epilog="examples:\n  fastdp bench step -- --batches 16,32 --sizes 128 --json step.json\n"
        "  fastdp bench ops -- --help",
        formatter_class=_Formatter,
    )
    p.add_argument("which", choices=sorted(_BENCHES), help="step: a training step per mode; ops: the fused kernels")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastdp`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from fastdp.experiment import ConfigError
    from fastdp.federated.simulation import FederationError
    from fastdp.federated.state_files import StateFileError

    try:
        return int(args.func(args) or 0)
    except (CLIError, ConfigError) as exc:
        print(f"fastdp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (StateFileError, FederationError) as exc:
        print(f"fastdp {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"fastdp {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastdp {args.command}: interrupted (a rerun resumes from the last checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
