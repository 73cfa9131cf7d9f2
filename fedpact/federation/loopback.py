"""A whole deployment on one machine's loopback: TLS SuperLink, registered node keys, partner
nodes as separate processes. Used by the integration tests, the deployment benchmarks and anyone
who wants to try the deployment engine before installing it on three machines (docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from .deployment import Connection, SuperLinkProcess, flower_env, flwr_cli, register_node

FEDPACT = str(Path(sys.executable).with_name("fedpact"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackDeployment:
    """SuperLink + partner node processes under `root`; the coordinator's run folder is `home`.

    `stock=True` starts Flower's own `flower-supernode` (default subprocess isolation, 3 s polls)
    instead of `fedpact node start`, for comparison.
    """

    def __init__(self, root: str | Path, *, home: str | Path | None = None) -> None:
        from fedpact.privacy.pki import create_certificates

        self.root = Path(root)
        self.pki = self.root / "pki"
        self.home = Path(home) if home else self.root / "coordinator"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        create_certificates(self.pki, ["127.0.0.1", "localhost"])
        self.connection = Connection(self.address, self.pki / "ca.crt", self.home / "flwr")
        self.link = SuperLinkProcess(self.root / "superlink", port=self.port,
                                     certificates=self.pki)
        self.nodes: dict[int, subprocess.Popen] = {}

    def start(self) -> LoopbackDeployment:
        self.link.start().wait_ready()
        return self

    def key(self, name: str) -> Path:
        from fedpact.privacy.pki import create_node_key

        private = self.pki / "keys" / name
        if not private.exists():
            create_node_key(private)
        return private

    def register(self, name: str) -> int:
        return register_node(self.connection, self.key(name).with_suffix(".pub"))

    def node_dir(self, index: int) -> Path:
        return self.root / f"node{index}"

    def start_node(self, index: int, *, key: str | None = None, data_dir: str | Path | None = None,
                   stock: bool = False, track: bool = True, admission_wait: float = 120,
                   own: tuple[str, str | Path, str | Path] | None = None,
                   env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Partner node `index` serving partition `index` of the job's data set, or, with
        `own` = (partner name, CSV, mapping), that partner's own file. `env`: extra environment
        for the node's processes (test hooks, e.g. `fedpact.testing.node_fault.fault_env`)."""
        name = key or f"p{index}"
        log = open(self.root / f"node{index}.log", "ab")  # noqa: SIM115
        state = self.node_dir(index)
        if stock:
            config = f'partition-id={index} state-dir="{state}"'
            if data_dir:
                config += f' data-dir="{Path(data_dir).resolve()}"'
            argv = [str(Path(sys.executable).with_name("flower-supernode")), "--superlink",
                    self.address, "--root-certificates", str(self.pki / "ca.crt"),
                    "--auth-supernode-private-key", str(self.key(name)), "--node-config", config,
                    "--port", str(free_port())]
        else:
            argv = [FEDPACT, "node", "start", "--superlink", self.address, "--root-certificates",
                    str(self.pki / "ca.crt"), "--key", str(self.key(name)), "--state-dir",
                    str(state), "--runtime-port", str(free_port()), "--admission-wait",
                    str(admission_wait)]
            argv += (["--data-csv", str(own[1]), "--mapping", str(own[2]), "--partner", own[0]]
                     if own else ["--partition-id", str(index)])
            if data_dir and not own:
                argv += ["--data-dir", str(data_dir)]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=flower_env(**(env or {})))
        if track:
            self.nodes[index] = proc
        return proc

    def wait_node_up(self, index: int, timeout: float = 240) -> None:
        """Until node `index`'s latest start was admitted (its SuperNode logged its node id)."""
        log = self.root / f"node{index}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            starts = text.count("Starting Flower SuperNode")
            if starts and text.rsplit("Starting Flower SuperNode", 1)[1].count("SuperNode ID:"):
                return
            proc = self.nodes.get(index)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"node {index} exited with code {proc.returncode}; see {log}")
            time.sleep(0.5)
        raise TimeoutError(f"node {index} not admitted within {timeout:.0f} s; see {log}")

    def kill_node(self, index: int) -> None:
        """The partner's machine dies: SuperNode and executor, no goodbye."""
        proc = self.nodes.pop(index)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def online(self) -> int:
        doc = flwr_cli(self.connection, "supernode", "list")
        return sum(str(n.get("status", "")).lower() == "online" for n in doc.get("nodes", []))

    def wait_connected(self, n: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online() >= n:
                return
            time.sleep(0.5)
        raise TimeoutError(f"fewer than {n} nodes online after {timeout:.0f} s")

    def task_log(self, index: int) -> list[dict]:
        """The tasks node `index` ran (`fedpact node start` writes state-dir/tasks.jsonl)."""
        path = self.node_dir(index) / "tasks.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def serverapp_pids(self) -> list[int]:
        """flwr-serverapp processes started (through flower-superexec) by this SuperLink."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.link.process.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                todo.append(child)
                try:
                    if b"flwr-serverapp" in Path(f"/proc/{child}/cmdline").read_bytes():
                        found.append(child)
                except OSError:
                    pass
        return found

    def stop(self) -> None:
        """Every node told to stop at once (then waited for, 15 s each at most), then the link."""
        procs = [self.nodes.pop(index) for index in list(self.nodes)]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.link.stop()
