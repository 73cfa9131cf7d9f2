"""A partner node on Flower's deployment engine: the SuperNode plus a warm ClientApp executor.

With Flower's default isolation every message starts a fresh `flwr-clientapp` process, which pays
≈ 3.5 s of torch/opacus/flwr imports each time, and the stock SuperNode and Grid poll every 3 s.
`fedpact node start` instead runs

* the SuperNode with `--isolation process` (its Runtime API on loopback) and a short poll
  interval, and
* one long-lived executor (this module's `serve_tasks`) that acquires each ClientApp task from
  that Runtime API and runs it in-process with everything already imported.

The executor runs only the ClientApp this node's admin installed (`fedpact.federation.
client_app:app`); a run whose app bundle names another ClientApp is refused, so the coordinator
cannot make a partner execute code the partner did not install.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("fedpact.node")

CLIENT_APP_REF = "fedpact.federation.client_app:app"
DEFAULT_POLL_INTERVAL = 0.05
# The SuperLink did not admit the node (Flower's exit code 305: unregistered key or unreachable).
EXIT_NOT_ADMITTED = 77
# A task's message must arrive within this many seconds (it cannot when its run has just ended).
TASK_INPUT_TIMEOUT = 30.0


class IdlePoll:
    """How long to wait before polling again: `fast` s right after work, doubling up to `slow` s
    while nothing comes (optionally staying fast for `hot` s first). Measured on 2 cores: pure
    doubling (hot = 0) gave 3.0 s rounds with 3 nodes and 8.4 s with 10; staying fast for 3 s
    gave 3.8 s and 13.3 s — ten nodes polling fast starve each other of CPU."""

    def __init__(self, fast: float, slow: float = 1.0, hot: float = 0.0) -> None:
        self.fast, self.slow, self.hot = fast, max(fast, slow), hot
        self._last_work = time.monotonic()
        self._wait = fast

    def worked(self) -> None:
        self._last_work = time.monotonic()
        self._wait = self.fast

    def next_wait(self) -> float:
        if time.monotonic() - self._last_work < self.hot:
            return self.fast
        wait, self._wait = self._wait, min(self._wait * 2, self.slow)
        return wait


class _CappedSleep:
    """Stands in for the `time` module inside Flower's SuperNode loop.

    Flower sleeps 3 s when the SuperLink had no message and 0.5 s while a reply is pending. Here
    the idle sleep follows `IdlePoll` (fast during a job, up to 1 s between jobs: ten nodes
    polling every 50 ms would keep two cores busy on their own), and a pending reply is checked
    every `cap` s.
    """

    def __init__(self, cap: float) -> None:
        self._cap = cap
        self._idle = IdlePoll(cap)

    def sleep(self, seconds: float) -> None:
        if seconds >= 1.0:  # the SuperNode's "no message" wait
            time.sleep(self._idle.next_wait())
        else:  # waiting for a reply or its content: a job is running
            self._idle.worked()
            time.sleep(min(seconds, self._cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def run_supernode(argv: list[str], poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
    """Flower's `flower-supernode` with its fixed 3 s / 0.5 s polling sleeps capped at
    `poll_interval` (pinned to flwr 1.42's module layout; checked in tests/test_deployment.py)."""
    from flwr.supernode import fleet_http_connection, start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    flwr_exit = fleet_http_connection.flwr_exit

    def exit_with_reason(code: int, *args, **kwargs):
        try:
            flwr_exit(code, *args, **kwargs)
        finally:  # Flower exits 1 for every error; keep "not admitted" distinguishable
            if code == 305:
                os._exit(EXIT_NOT_ADMITTED)

    from .flower_tuning import tune_object_pulls

    tune_object_pulls()
    start_client_internal.time = _CappedSleep(poll_interval)
    fleet_http_connection.flwr_exit = exit_with_reason
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


@dataclass
class TaskOutcome:
    task_id: int
    run_id: int
    message_type: str
    seconds: float
    ok: bool
    details: str = ""
    compute_seconds: float = 0.0  # inside fedpact's ClientApp (the rest is Flower messaging)
    pull_seconds: float = 0.0  # fetching the task's message from the SuperNode
    push_seconds: float = 0.0  # handing the reply back


def _runtime_client(address: str, token: str | None, secret: bytes | None):
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(
        component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    elif secret:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))
    # Flower's invoker retries a refused connection forever; this process must notice when its
    # SuperNode is gone (polling: fail at once, the loop waits and checks; a task: a few tries).
    invoker = make_simple_http_retry_invoker()
    invoker.max_tries = 5 if token else 1
    invoker.max_time = 60.0
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True,
                                                 root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=invoker)


def _fab_client_app(fab_content: bytes) -> str:
    from flwr.common.config import get_fab_config

    try:
        return str(get_fab_config(fab_content)["tool"]["flwr"]["app"]["components"]["clientapp"])
    except (KeyError, TypeError, ValueError):
        return ""


def _pull_task_input(client, max_time: float):
    """flwr 1.42's `run_clientapp.pull_task_input` with a bound on the object pulls: a task whose
    message belongs to a run that ended meanwhile would otherwise block for PULL_MAX_TIME (2 h)."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
    from flwr.proto.runtime_pb2 import (  # pylint: disable=no-name-in-module
        PullAppMessagesRequest,
        PullTaskInputRequest,
    )
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = (context_from_proto(res.context), run_from_proto(res.run),
                         fab_from_proto(res.fab))
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message for this task from the Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message, max_time=max_time)
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


def run_task(address: str, token: str, task_id: int, client_app=None, *,
             input_timeout: float = TASK_INPUT_TIMEOUT) -> TaskOutcome:
    """Pull one ClientApp task's message, run fedpact's ClientApp on it, push the reply."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    if client_app is None:
        from .client_app import app as client_app

    started = time.perf_counter()
    client = _runtime_client(address, token, None)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    sub_status, details, run_id, kind, compute = SubStatus.FAILED, "", 0, "?", 0.0
    pulled = pushed = 0.0
    try:
        message, context, run, fab = _pull_task_input(client, input_timeout)
        pulled = time.perf_counter() - started
        run_id, kind = run.run_id, message.metadata.message_type
        wanted = _fab_client_app(fab.content)
        if wanted != CLIENT_APP_REF:
            details = (f"refused: the run's app bundle names ClientApp {wanted!r}; this node runs "
                       f"only its installed {CLIENT_APP_REF}")
            log.error(details)
            reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=details),
                            reply_to=message)
        else:
            computing = time.perf_counter()
            reply = client_app(message=message, context=context)
            compute = time.perf_counter() - computing
            sub_status = SubStatus.COMPLETED
    except Exception as exc:  # noqa: BLE001 - reported to the coordinator, node keeps serving
        details = f"{type(exc).__name__}: {exc}"
        log.exception("ClientApp task %s failed", task_id)
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                            reply_to=message)
    finally:
        try:
            pushing = time.perf_counter()
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, sub_status, details)
            pushed = time.perf_counter() - pushing
        except Exception as exc:  # noqa: BLE001 - the run ended or the SuperNode restarted
            sub_status, details = SubStatus.FAILED, f"reply not delivered: {exc}"
            log.warning("task %s: %s", task_id, details)
        finally:
            heartbeat.stop()
            client.close()
    return TaskOutcome(task_id, run_id, kind, time.perf_counter() - started,
                       sub_status == SubStatus.COMPLETED, details, compute, pulled, pushed)


def serve_tasks(address: str, *, secret: bytes | None = None,
                poll_interval: float = DEFAULT_POLL_INTERVAL,
                stop: threading.Event | None = None,
                on_task: Callable[[TaskOutcome], None] | None = None) -> None:
    """Acquire ClientApp tasks from the SuperNode's Runtime API at `address` and run them warm."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType

    from . import client_app  # noqa: F401 - import torch/opacus/fedpact once, before any task
    from .flower_tuning import tune_object_pulls

    tune_object_pulls()
    stop = stop or threading.Event()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    client = _runtime_client(address, None, secret)
    idle = IdlePoll(poll_interval)
    down_since, warned = 0.0, False
    try:
        while not stop.is_set():
            try:
                res = client.AcquireTask(AcquireTaskRequest(
                    supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as exc:  # noqa: BLE001 - SuperNode starting or restarting
                down_since = down_since or time.monotonic()
                if not warned and time.monotonic() - down_since > 10:
                    log.warning("SuperNode Runtime API at %s not reachable for 10 s (%s); still "
                                "trying", address, exc)
                    warned = True
                stop.wait(min(1.0, poll_interval * 4))
                continue
            down_since, warned = 0.0, False
            if res.HasField("task") and res.token:
                try:
                    outcome = run_task(address, res.token, res.task.task_id)
                except Exception as exc:  # noqa: BLE001 - one bad task must not stop the node
                    log.exception("task %s could not run", res.task.task_id)
                    outcome = TaskOutcome(res.task.task_id, res.task.run_id, "?", 0.0, False,
                                          f"{type(exc).__name__}: {exc}")
                log.info("task %s (%s, run %s) %s in %.2f s", outcome.task_id,
                         outcome.message_type, outcome.run_id,
                         "done" if outcome.ok else "FAILED " + outcome.details, outcome.seconds)
                if on_task is not None:
                    on_task(outcome)
                idle.worked()
                continue
            stop.wait(idle.next_wait())  # fast during a job, backing off to 1 s between jobs
    finally:
        client.close()


@dataclass
class NodeProcessConfig:
    """What `fedpact node start` needs to bring one partner node up."""

    superlink: str
    node_config: str
    runtime_port: int
    root_certificates: Path | None = None
    private_key: Path | None = None
    state_dir: Path = Path(".fedpact/node")
    poll_interval: float = DEFAULT_POLL_INTERVAL

    def supernode_argv(self, secret_file: Path) -> list[str]:
        argv = ["--superlink", self.superlink, "--node-config", self.node_config,
                "--isolation", "process", "--port", str(self.runtime_port),
                "--superexec-auth-secret-file", str(secret_file)]
        if self.root_certificates:
            argv += ["--root-certificates", str(self.root_certificates)]
        else:
            argv += ["--insecure"]
        if self.private_key:
            argv += ["--auth-supernode-private-key", str(self.private_key)]
        return argv


def _secret_file(state_dir: Path) -> tuple[Path, bytes]:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "superexec.secret"
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    return path, secret


def _run_once(config: NodeProcessConfig, stop: threading.Event,
              record: Callable[[TaskOutcome], None]) -> int:
    """One SuperNode child + the executor until either ends; the SuperNode's exit code."""
    secret_file, secret = _secret_file(Path(config.state_dir))
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    supernode = subprocess.Popen(
        [sys.executable, "-m", "fedpact.federation.node_runtime", "supernode",
         "--poll-interval", str(config.poll_interval), "--",
         *config.supernode_argv(secret_file)], env=env)
    ended = threading.Event()

    def watch() -> None:
        supernode.wait()
        ended.set()

    def forward() -> None:
        stop.wait()
        ended.set()

    threading.Thread(target=watch, daemon=True).start()
    threading.Thread(target=forward, daemon=True).start()
    try:
        serve_tasks(f"127.0.0.1:{config.runtime_port}", secret=secret,
                    poll_interval=config.poll_interval, stop=ended, on_task=record)
    finally:
        if supernode.poll() is None:
            supernode.terminate()
            try:
                supernode.wait(10)
            except subprocess.TimeoutExpired:
                supernode.kill()
                supernode.wait()
    return supernode.returncode


def start_node(config: NodeProcessConfig, *, stop: threading.Event | None = None,
               on_task: Callable[[TaskOutcome], None] | None = None,
               admission_wait: float = 120.0) -> int:
    """Run the SuperNode (child process) and the warm executor (this process) until stopped or
    until the SuperNode exits; returns the SuperNode's exit code.

    A node restarted after a crash is not admitted while the SuperLink still holds its previous
    session (until that session's heartbeat expires, ≈ 1 min): it retries for `admission_wait`
    seconds before returning EXIT_NOT_ADMITTED (also what an unregistered key gets)."""
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    task_log = Path(config.state_dir) / "tasks.jsonl"

    def record(outcome: TaskOutcome) -> None:
        with task_log.open("a") as handle:
            handle.write(json.dumps({**asdict(outcome), "finished": time.time()}) + "\n")
        if on_task is not None:
            on_task(outcome)

    started = time.monotonic()
    try:
        while True:
            code = _run_once(config, stop, record)
            waited = time.monotonic() - started
            if code != EXIT_NOT_ADMITTED or stop.is_set() or waited >= admission_wait:
                return code
            log.warning("the SuperLink did not admit this node (key not registered, or its "
                        "previous session not yet expired); retrying for another %.0f s",
                        admission_wait - waited)
            if stop.wait(min(5.0, admission_wait - waited)):
                return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    """`python -m fedpact.federation.node_runtime supernode|worker ...` (used by `fedpact node`)."""
    parser = argparse.ArgumentParser(prog="fedpact.federation.node_runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    sn = sub.add_parser("supernode", help="flower-supernode with a short poll interval")
    sn.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL)
    sn.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    run_supernode(rest, args.poll_interval)


if __name__ == "__main__":
    main()
