"""A Flower federation on this machine: one SuperLink and N SuperNodes as processes on 127.0.0.1.

:class:`LocalFederation` starts, supervises and stops the processes; :func:`launch_local` runs
one fastdp run on a new one. Secure by default, as a hospital deployment must be:

- **TLS**: a private CA and a SuperLink certificate for 127.0.0.1/localhost are generated
  (:mod:`fastdp.flower.credentials`) under ``work_dir/credentials``; SuperNodes and ``flwr``
  trust only that CA. ``insecure=True`` (plain text) is an explicit opt-in with a warning.
- **Only registered sites join**: the SuperLink runs with ``--enable-supernode-auth``; each
  SuperNode has its own key pair whose public key is registered (``flwr supernode register``)
  before it starts. A SuperNode with any other key is refused by the SuperLink.
- **A site going away does not end the federation**: a SuperNode that exits is restarted after
  ``restart_after_s`` (as a hospital's service manager would); the ServerApp records the site
  as failed for the rounds it misses (Flower reports its messages undeliverable once its
  heartbeat lapses, within about a minute) and the site rejoins with its own state file.
  Only the SuperLink exiting ends the run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastdp.atomic import atomic_write_text
from fastdp.flower.app_files import write_app
from fastdp.flower.config import resolve_config
from fastdp.flower.credentials import NodeKey, ServerCertificate, make_ca, make_node_key, make_server_certificate
from fastdp.flower.offline import OFFLINE_ENV
from fastdp.flower.processes import (
    FlowerRunError,
    descendants,
    flwr_cli,
    free_ports,
    json_out,
    kill_tree,
    log_tail,
    raise_exit,
    stop_processes,
    tool_path,
    wait_port,
)

__all__ = ["FlowerRun", "FlowerRunError", "InsecureFederationWarning", "LocalFederation", "NodeExit", "launch_local"]


class InsecureFederationWarning(UserWarning):
    """A Flower federation started without TLS or without SuperNode authentication."""


@dataclass(frozen=True)
class NodeExit:
    """A SuperNode process that ended while the federation ran: which, its exit code, when (s after start)."""

    node: int
    returncode: int
    at_s: float


@dataclass
class FlowerRun:
    """What launch_local returns.

    global_state: the final global model's state_dict.
    history: the History as a dict (history.json).
    out_dir, work_dir: where results and logs (work_dir/logs/*.log) are.
    run_id, status: Flower's run id and final status ("finished:completed").
    wall_s: seconds from the first process start to the end of the run.
    node_exits: SuperNodes that exited (and were restarted) during the run.
    secure: TLS and SuperNode authentication were on.
    """

    global_state: dict[str, torch.Tensor]
    history: dict
    out_dir: Path
    work_dir: Path
    run_id: int
    status: str
    wall_s: float
    logs: dict[str, Path] = field(default_factory=dict)
    node_exits: list[NodeExit] = field(default_factory=list)
    secure: bool = True


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


class LocalFederation:
    """One SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, each a process; TLS and node authentication on.

        with LocalFederation(3, "work") as fed:          # starts the processes
            run_id = fed.submit(app_dir)
            status, details = fed.wait(run_id, timeout=600)

    Args:
        num_nodes: SuperNodes; node k gets node config ``partition-id=k num-partitions=num_nodes``.
        work_dir: credentials/, flwr-home/ (the ``flwr`` connection), logs/ (one log per process).
        insecure: plain-text connections and no node authentication (warns; for quick local tries).
        env: extra environment for every process (e.g. FASTDP_CONV_METHOD, OMP_NUM_THREADS).
        start_timeout: seconds the SuperLink may take to listen.
        restart_after_s: a SuperNode that exits is started again after this many seconds (None: not).
    """

    def __init__(
        self,
        num_nodes: int,
        work_dir: str | os.PathLike,
        *,
        insecure: bool = False,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
        restart_after_s: float | None = 5.0,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"a federation needs at least one SuperNode, got num_nodes={num_nodes}")
        self.num_nodes = int(num_nodes)
        self.work = Path(work_dir).resolve()
        self.insecure = bool(insecure)
        self.start_timeout = float(start_timeout)
        self.restart_after_s = restart_after_s
        self.logs_dir = self.work / "logs"
        self.home = self.work / "flwr-home"
        self.logs: dict[str, Path] = {}
        self.node_exits: list[NodeExit] = []
        self._procs: dict[str, subprocess.Popen] = {}
        self._all: list[subprocess.Popen] = []
        self._restart_at: dict[int, float] = {}
        self._t0 = time.monotonic()
        self.link_port, *self.node_ports = free_ports(1 + self.num_nodes)
        self.server: ServerCertificate | None = None
        self.node_keys: list[NodeKey] = []
        self.env = {
            **os.environ,
            **OFFLINE_ENV,
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # the SuperLink and SuperNodes start flower-superexec and the app processes from PATH
            "PATH": os.pathsep.join([str(Path(tool_path("flower-superlink")).parent), os.environ.get("PATH", "")]),
            **(env or {}),
        }

    # --- credentials and processes --------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.link_port}"

    def _credentials(self) -> None:
        creds = self.work / "credentials"
        ca = make_ca(creds, name="fastdp local federation CA", days=30)
        self.server = make_server_certificate(ca, creds, hosts=["127.0.0.1", "localhost"], name="superlink")
        self.node_keys = [make_node_key(creds / "nodes", f"supernode-{k}") for k in range(self.num_nodes)]

    def _write_connection(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        lines = ['[superlink]\ndefault = "local"\n', "[superlink.local]", f'address = "{self.address}"']
        if self.insecure:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.server.ca_cert}"')
        atomic_write_text(self.home / "config.toml", "\n".join(lines) + "\n")

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.logs[name] = self.logs_dir / f"{name}.log"
        with open(self.logs[name], "ab") as f:
            f.write(("$ " + " ".join(cmd) + "\n").encode())  # what was started, for whoever reads the log
            f.flush()
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        self._procs[name] = p
        self._all.append(p)
        return p

    def _tls_args(self) -> list[str]:
        if self.insecure:
            return ["--insecure"]
        # the CA file too: the SuperLink refuses to serve TLS without all three
        return [
            "--ssl-certfile",
            str(self.server.cert),
            "--ssl-keyfile",
            str(self.server.key),
            "--ssl-ca-certfile",
            str(self.server.ca_cert),
        ]

    def start(self) -> LocalFederation:
        """Credentials (unless insecure), the SuperLink, node registration, the SuperNodes."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        if self.insecure:
            warnings.warn(
                "Flower federation WITHOUT TLS and without SuperNode authentication: updates travel in plain "
                "text and any process that reaches the SuperLink can join as a site (insecure=True)",
                InsecureFederationWarning,
                stacklevel=2,
            )
        else:
            self._credentials()
        self._write_connection()
        auth = [] if self.insecure else ["--enable-supernode-auth"]
        link = self._start(
            "superlink",
            [
                tool_path("flower-superlink"),
                *self._tls_args(),
                *auth,
                "--isolation",
                "subprocess",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.link_port),
            ],
        )
        wait_port(self.link_port, link, self.logs["superlink"], self.start_timeout)
        if not self.insecure:
            for key in self.node_keys:
                self.register(key.public)
        for k in range(self.num_nodes):
            self.start_node(k)
        return self

    def register(self, public_key: str | os.PathLike) -> int:
        """Registers a SuperNode public key with the SuperLink (``flwr supernode register``); its node id."""
        out = json_out(self.flwr(["supernode", "register", str(public_key), "local", "--format", "json"]))
        if not out.get("success"):
            raise FlowerRunError(f"registering {public_key} failed: {out}")
        return int(out["node-id"])

    def node_command(
        self, k: int, key: NodeKey | None = None, *, insecure: bool | None = None, port: int | None = None
    ) -> list[str]:
        """The flower-supernode command line of node k: its own key and port unless ``key`` / ``port`` are given.

        Tests start impostors with it: a node with an unregistered key, a plain-text node.
        """
        insecure = self.insecure if insecure is None else insecure
        cmd = [tool_path("flower-supernode"), "--superlink", self.address]
        if insecure:
            cmd.append("--insecure")
        else:
            key = key if key is not None else self.node_keys[k]
            cmd += ["--root-certificates", str(self.server.ca_cert), "--auth-supernode-private-key", str(key.private)]
        port = port if port is not None else self.node_ports[k]
        return [
            *cmd,
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--node-config",
            f"partition-id={k} num-partitions={self.num_nodes}",
        ]

    def start_node(self, k: int) -> subprocess.Popen:
        """Starts SuperNode k (again)."""
        self._restart_at.pop(k, None)
        return self._start(f"supernode-{k}", self.node_command(k))

    def start_process(self, name: str, cmd: list[str]) -> subprocess.Popen:
        """Starts another process in this federation (logged as logs/NAME.log, stopped with the rest)."""
        return self._start(name, cmd)

    def node_pids(self, k: int) -> list[int]:
        """PIDs of SuperNode k and every process it started (its SuperExec, ClientApp processes)."""
        p = self._procs[f"supernode-{k}"]
        return [p.pid, *descendants([p.pid])] if p.poll() is None else []

    def kill_node(self, k: int) -> None:
        """SIGKILLs SuperNode k and everything it started, as when the hospital's machine goes away."""
        kill_tree(self._procs[f"supernode-{k}"].pid)

    def process(self, name: str) -> subprocess.Popen:
        return self._procs[name]

    def flwr(self, args: list[str], timeout: float = 60.0) -> str:
        """``flwr ARGS`` against this federation's SuperLink (TLS with its CA unless insecure)."""
        return flwr_cli(args, self.env, timeout=timeout)

    def supervise(self) -> None:
        """Raises when the SuperLink has exited; records SuperNodes that exited and restarts them when due."""
        link = self._procs["superlink"]
        if link.poll() is not None:
            raise FlowerRunError(f"the SuperLink exited ({link.returncode}):\n{log_tail(self.logs['superlink'])}")
        now = time.monotonic()
        for k in range(self.num_nodes):
            p = self._procs.get(f"supernode-{k}")
            if p is None or p.poll() is None or k in self._restart_at:
                continue
            self.node_exits.append(NodeExit(k, p.returncode, round(now - self._t0, 1)))
            if self.restart_after_s is None:
                raise FlowerRunError(f"supernode-{k} exited ({p.returncode}):\n{log_tail(self.logs[f'supernode-{k}'])}")
            print(
                f"[fastdp.flower] supernode-{k} exited ({p.returncode}); restarting it in {self.restart_after_s:g} s",
                file=sys.stderr,
            )
            self._restart_at[k] = now + float(self.restart_after_s)
        for k, due in list(self._restart_at.items()):
            if now >= due:
                self.start_node(k)

    # --- runs ---------------------------------------------------------------------------------
    def submit(self, app_dir: str | os.PathLike) -> int:
        """``flwr run APP_DIR``; the run id."""
        out = json_out(self.flwr(["run", str(app_dir), "local", "--format", "json"]))
        if not out.get("success") or out.get("run-id") is None:
            raise FlowerRunError(f"flwr run did not start a run: {out}")
        return int(out["run-id"])

    def status(self, run_id: int) -> tuple[str, str]:
        """Flower's (status, status details) of a run."""
        runs = json_out(self.flwr(["ls", "local", "--run-id", str(run_id), "--format", "json"]))["runs"]
        return runs[0]["status"], runs[0].get("status-details", "")

    def wait(
        self,
        run_id: int,
        *,
        timeout: float | None = 600.0,
        status_every: float = 15.0,
        result: Path | None = None,
    ) -> tuple[str, str]:
        """Waits until the run finishes, supervising the processes; (status, details).

        flwr run exits 0 whatever happens to the run: its status says how it ended. Each flwr call
        is a new Python process (seconds of CPU), so between status checks this watches the
        ServerApp's ``result`` file, which appears when the run is about to finish.
        """
        stale = _mtime(result) if result is not None else None
        deadline = time.monotonic() + (math.inf if timeout is None else timeout)
        next_ls = 0.0
        status = ""
        while True:
            self.supervise()
            if time.monotonic() >= next_ls or (result is not None and _mtime(result) != stale):
                status, details = self.status(run_id)
                if status.startswith("finished"):
                    return status, details
                next_ls = time.monotonic() + status_every
            if time.monotonic() > deadline:
                self.flwr(["stop", str(run_id), "local"])
                raise FlowerRunError(f"run {run_id} still {status!r} after {timeout} s")
            time.sleep(0.5)

    def log_tails(self) -> str:
        return "\n".join(log_tail(p) for p in self.logs.values())

    def stop(self) -> None:
        """Stops every process started here and every process they started, by PID."""
        stop_processes(self._all)

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def launch_local(
    num_nodes: int | None = None,
    run_config: Mapping | None = None,
    work_dir: str | os.PathLike | None = None,
    *,
    insecure: bool = False,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 600.0,
    start_timeout: float = 60.0,
    status_every: float = 15.0,
    restart_after_s: float | None = 5.0,
    on_start=None,
) -> FlowerRun:
    """Runs the fastdp Flower app on a new :class:`LocalFederation` (TLS, registered SuperNodes), then stops it.

    Args:
        num_nodes: SuperNodes (partition-id 0..num_nodes-1); default: the run's number of sites
            (it must be that number: each site is one SuperNode).
        run_config: run config, e.g. from run_config_for(experiment, "dp") (see DEFAULT_RUN_CONFIG);
            state-dir and out-dir default to work_dir/state and work_dir/out. The ServerApp
            checkpoints to out-dir/checkpoints after every round and resumes from there.
        work_dir: app folder, credentials, FLWR_HOME, logs, results (default: a new temporary folder).
        insecure: no TLS and no node authentication (warns).
        env: extra environment for every process (e.g. FASTDP_CONV_METHOD, OMP_NUM_THREADS).
        timeout: seconds the run may take once submitted (None: no limit).
        start_timeout: seconds the SuperLink may take to start listening.
        status_every: seconds between `flwr ls` status checks while the run has no result yet.
        restart_after_s: a SuperNode that exits is restarted after this many seconds (None: the
            run fails instead).
        on_start: called with the LocalFederation and the run id once the run is submitted, in a
            thread of its own (tests use it to kill a SuperNode mid-run).
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
    app_dir = write_app(work / "app", cfg)
    out_dir = Path(str(cfg["out-dir"]))
    fed = LocalFederation(
        int(cfg["num-sites"]),
        work,
        insecure=insecure,
        env=env,
        start_timeout=start_timeout,
        restart_after_s=restart_after_s,
    )
    # A SIGTERM (a CI timeout, kill PID) must still reach the finally clause that stops the processes.
    in_main = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, raise_exit) if in_main else None
    t0 = time.perf_counter()
    try:
        fed.start()
        run_id = fed.submit(app_dir)
        if on_start is not None:
            threading.Thread(target=on_start, args=(fed, run_id), daemon=True).start()
        status, details = fed.wait(
            run_id, timeout=timeout, status_every=status_every, result=out_dir / "global_model.pt"
        )
        if status != "finished:completed":
            raise FlowerRunError(f"run {run_id} ended {status!r} ({details}):\n{fed.log_tails()}")
        wall = time.perf_counter() - t0
    finally:
        fed.stop()
        if in_main:
            signal.signal(signal.SIGTERM, old_handler)
    return FlowerRun(
        global_state=torch.load(out_dir / "global_model.pt", weights_only=True),
        history=json.loads((out_dir / "history.json").read_text()),
        out_dir=out_dir,
        work_dir=work,
        run_id=run_id,
        status=status,
        wall_s=wall,
        logs=dict(fed.logs),
        node_exits=list(fed.node_exits),
        secure=not insecure,
    )
