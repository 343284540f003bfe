"""launch_local: the fastdp Flower app on this machine, one SuperLink and N SuperNodes as processes on 127.0.0.1."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastdp.atomic import atomic_write_text
from fastdp.flower.app_files import write_app
from fastdp.flower.config import resolve_config
from fastdp.flower.offline import OFFLINE_ENV
from fastdp.flower.processes import (
    FlowerRunError,
    flwr_cli,
    free_ports,
    json_out,
    log_tail,
    raise_exit,
    stop_processes,
    tool_path,
    wait_port,
)

__all__ = ["FlowerRun", "FlowerRunError", "launch_local"]


@dataclass
class FlowerRun:
    """What launch_local returns.

    global_state: the final global model's state_dict.
    history: the History as a dict (history.json).
    out_dir, work_dir: where results and logs (work_dir/logs/*.log) are.
    run_id, status: Flower's run id and final status ("finished:completed").
    wall_s: seconds from the first process start to the end of the run.
    """

    global_state: dict[str, torch.Tensor]
    history: dict
    out_dir: Path
    work_dir: Path
    run_id: int
    status: str
    wall_s: float
    logs: dict[str, Path] = field(default_factory=dict)


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def launch_local(
    num_nodes: int | None = None,
    run_config: Mapping | None = None,
    work_dir: str | os.PathLike | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 600.0,
    start_timeout: float = 60.0,
    status_every: float = 15.0,
) -> FlowerRun:
    """Runs the fastdp Flower app on this machine: one SuperLink and `num_nodes` SuperNodes, each a
    separate process on 127.0.0.1 (insecure, offline), then `flwr run`; stops them all afterwards.

    Args:
        num_nodes: SuperNodes (partition-id 0..num_nodes-1); default: the run's number of sites
            (it must be that number: each site is one SuperNode).
        run_config: run config, e.g. from run_config_for(experiment, "dp") (see DEFAULT_RUN_CONFIG);
            state-dir and out-dir default to work_dir/state and work_dir/out.
        work_dir: app folder, FLWR_HOME, logs, results (default: a new temporary folder).
        env: extra environment for every process (e.g. FASTDP_CONV_METHOD, OMP_NUM_THREADS).
        timeout: seconds the run may take once submitted (None: no limit).
        start_timeout: seconds each process may take to start listening.
        status_every: seconds between `flwr ls` status checks while the run has no result yet.
    Returns: FlowerRun. Raises FlowerRunError when the run does not finish:completed.
    """
    cfg = dict(run_config or {})
    if num_nodes is not None:
        cfg.setdefault("num-sites", int(num_nodes))  # resolve_config checks it against the run's sites
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="fastdp-flower-"))
    work = work.resolve()
    # "" is unset (a resolved run config holds every key), as everywhere in the run config.
    cfg["state-dir"] = cfg.get("state-dir") or str(work / "state")
    cfg["out-dir"] = cfg.get("out-dir") or str(work / "out")
    cfg = resolve_config(cfg)
    num_nodes = int(cfg["num-sites"])
    app_dir = write_app(work / "app", cfg)
    logs_dir = work / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    home = work / "flwr-home"
    home.mkdir(exist_ok=True)

    link_port, *node_ports = free_ports(1 + num_nodes)
    atomic_write_text(
        home / "config.toml",
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n',
    )
    penv = {
        **os.environ,
        **OFFLINE_ENV,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # the SuperLink and SuperNodes start flower-superexec and the app processes from PATH
        "PATH": os.pathsep.join([str(Path(tool_path("flower-superlink")).parent), os.environ.get("PATH", "")]),
        **(env or {}),
    }
    procs: list[subprocess.Popen] = []
    names: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        logs[name] = logs_dir / f"{name}.log"
        with open(logs[name], "wb") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=penv)
        procs.append(p)
        names[name] = p
        return p

    # A SIGTERM (a CI timeout, kill PID) must still reach the finally clause that stops the processes.
    in_main = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, raise_exit) if in_main else None
    t0 = time.perf_counter()
    try:
        link = start(
            "superlink",
            [
                tool_path("flower-superlink"),
                "--insecure",
                "--isolation",
                "subprocess",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
            ],
        )
        wait_port(link_port, link, logs["superlink"], start_timeout)
        for k, port in enumerate(node_ports):
            start(
                f"supernode-{k}",
                [
                    tool_path("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--isolation",
                    "subprocess",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={k} num-partitions={num_nodes}",
                ],
            )
        out = json_out(flwr_cli(["run", str(app_dir), "local", "--format", "json"], penv))
        if not out.get("success") or out.get("run-id") is None:
            raise FlowerRunError(f"flwr run did not start a run: {out}")
        run_id = int(out["run-id"])
        # flwr run exits 0 whatever happens to the run: its status says how it ended. Each flwr
        # call is a new Python process (seconds of CPU), so between status checks watch for the
        # ServerApp's result file, which appears when the run is about to finish.
        result = Path(str(cfg["out-dir"])) / "global_model.pt"
        # A result file left by an earlier run in the same out-dir is not this run's.
        stale = _mtime(result)
        deadline = time.monotonic() + (math.inf if timeout is None else timeout)
        status, details, next_ls = "", "", 0.0
        while True:
            for name, p in names.items():
                if p.poll() is not None:
                    raise FlowerRunError(f"{name} exited early ({p.returncode}):\n{log_tail(logs[name])}")
            if time.monotonic() >= next_ls or _mtime(result) != stale:
                runs = json_out(flwr_cli(["ls", "local", "--run-id", str(run_id), "--format", "json"], penv))["runs"]
                status, details = runs[0]["status"], runs[0].get("status-details", "")
                if status.startswith("finished"):
                    break
                next_ls = time.monotonic() + status_every
            if time.monotonic() > deadline:
                flwr_cli(["stop", str(run_id), "local"], penv)
                raise FlowerRunError(f"run {run_id} still {status!r} after {timeout} s")
            time.sleep(0.5)
        if status != "finished:completed":
            tails = "\n".join(log_tail(p) for p in logs.values())
            raise FlowerRunError(f"run {run_id} ended {status!r} ({details}):\n{tails}")
        wall = time.perf_counter() - t0
    finally:
        stop_processes(procs)
        if in_main:
            signal.signal(signal.SIGTERM, old_handler)
    out_dir = Path(str(cfg["out-dir"]))
    return FlowerRun(
        global_state=torch.load(out_dir / "global_model.pt", weights_only=True),
        history=json.loads((out_dir / "history.json").read_text()),
        out_dir=out_dir,
        work_dir=work,
        run_id=run_id,
        status=status,
        wall_s=wall,
        logs=logs,
    )
