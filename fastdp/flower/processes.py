"""Processes of a local Flower federation: free ports, console scripts, waiting, log tails, stopping process trees."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = [
    "FlowerRunError",
    "descendants",
    "flwr_cli",
    "free_ports",
    "json_out",
    "kill_tree",
    "log_tail",
    "raise_exit",
    "stop_processes",
    "tool_path",
    "wait_port",
]


class FlowerRunError(RuntimeError):
    """A Flower run that did not finish:completed; the message ends with the tails of the process logs."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    # Hold all sockets open while choosing so the n ports differ; the OS may still hand one to
    # someone else before our process binds it (unlikely on loopback in a test).
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tool_path(name: str) -> str:
    """A Flower console script next to this Python (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install the extra, pip install 'fastdp[flower]'")
    return found


def wait_port(port: int, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Returns once something listens on 127.0.0.1:port; FlowerRunError if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerRunError(f"process exited with {proc.returncode} before listening:\n{log_tail(log_path)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FlowerRunError(f"nothing listens on 127.0.0.1:{port} after {timeout} s:\n{log_tail(log_path)}")


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a process log, headed by its name (for error messages)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path}: no log)"
    return f"--- {path.name} ---\n" + "\n".join(text[-lines:])


def descendants(roots: list[int]) -> dict[int, str]:
    """{pid: cmdline} of every live descendant of `roots` (Linux /proc; {} elsewhere)."""
    parent, cmd = {}, {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            cmd[int(d.name)] = (d / "cmdline").read_text()
        except (OSError, ValueError):
            continue
    found, frontier = {}, set(roots)
    while frontier:
        children = {pid for pid, ppid in parent.items() if ppid in frontier and pid not in found}
        found.update({pid: cmd[pid] for pid in children})
        frontier = children
    return found


def _signal_if_same(pid: int, cmdline: str, sig: int) -> None:
    # A pid seen moments ago may have exited; only signal it if it is still the same program.
    try:
        if Path(f"/proc/{pid}/cmdline").read_text() == cmdline:
            os.kill(pid, sig)
    except (OSError, ProcessLookupError):
        pass


def stop_processes(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """Stops every process started here and every process they started, by pid.

    SIGTERM first (a SuperLink / SuperNode then stops its own SuperExec and app processes,
    which Flower starts in sessions of their own), SIGKILL whatever is left after `grace` s.
    """
    children = descendants([p.pid for p in procs])
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
    for pid, cmdline in children.items():
        _signal_if_same(pid, cmdline, signal.SIGTERM)
    time.sleep(0.5 if children else 0)
    for pid, cmdline in _descendants_alive(children).items():
        _signal_if_same(pid, cmdline, signal.SIGKILL)


def kill_tree(pid: int) -> None:
    """SIGKILLs process ``pid`` and every live descendant at once (children first seen, then the root)."""
    tree = descendants([pid])
    try:
        tree[pid] = Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        pass
    for p, cmdline in tree.items():
        _signal_if_same(p, cmdline, signal.SIGKILL)


def _descendants_alive(pids: dict[int, str]) -> dict[int, str]:
    return {pid: c for pid, c in pids.items() if Path(f"/proc/{pid}").exists()}


def flwr_cli(args: list[str], env: dict, timeout: float = 60.0) -> str:
    """Runs ``flwr ARGS`` and returns its stdout; FlowerRunError when it exits non-zero."""
    res = subprocess.run([tool_path("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise FlowerRunError(f"flwr {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def json_out(text: str) -> dict:
    """The JSON object in a flwr command's output; FlowerRunError when it says ``"success": false``.

    flwr commands exit 0 on many failures (a SuperLink it cannot reach, a refused request) and
    report them only in this object.
    """
    # flwr may print log lines before the JSON object.
    start = text.find("{")
    if start < 0:
        raise FlowerRunError(f"no JSON in flwr output:\n{text}")
    out = json.loads(text[start:])
    if out.get("success") is False:
        raise FlowerRunError(f"flwr failed: {out.get('error-message', out)}")
    return out


def raise_exit(signum, frame):
    """A signal handler that turns SIGTERM into SystemExit, so that `finally` clauses stop the processes."""
    raise SystemExit(128 + signum)
