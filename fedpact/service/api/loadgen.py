"""A bounded loopback load generator for the coordinator API, and uvicorn to run it against.

`serve_in_subprocess(home)` starts `uvicorn` in its own process on 127.0.0.1 (a free port) for the
duration of a `with` block, so the load generator does not share the server's GIL;
`serve_in_thread(app)` runs an app object in a thread of this process (functional checks).
`audit_query_load(url, token, ...)` keeps `concurrency` audit-query requests in flight until
`total` have been sent (or `deadline_s` passed) and reports latency percentiles and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np


@dataclass
class LoadReport:
    sent: int
    ok: int
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    concurrency: int = 0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    def line(self) -> str:
        return (f"{self.sent} audit queries, {self.concurrency} concurrent: {self.ok} ok, "
                f"{len(self.errors)} errors; p50 {self.p50:.0f} ms, p99 {self.p99:.0f} ms, "
                f"max {max(self.latencies_ms, default=float('nan')):.0f} ms; "
                f"{self.sent / self.wall_s if self.wall_s else 0:.0f} req/s over {self.wall_s:.1f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(app, *, startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Run `app` with uvicorn on loopback in a daemon thread; yield its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           backlog=2048, timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def app_from_env():
    """uvicorn `--factory` entry point: the service for $FEDPACT_HOME, without the job runner."""
    from .app import create_app

    return create_app(os.environ["FEDPACT_HOME"], start_worker=os.environ.get("FEDPACT_RUN_JOBS") == "1")


@contextlib.contextmanager
def serve_in_subprocess(home: str | Path, *, startup_timeout_s: float = 60.0) -> Iterator[str]:
    """`python -m uvicorn --factory ...app_from_env` on loopback; yield its base URL."""
    port = free_port()
    env = {**os.environ, "FEDPACT_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "fedpact.service.api.loadgen:app_from_env",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--backlog", "2048"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {proc.returncode}: "
                                   f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(url + "/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not answer on {url} within {startup_timeout_s:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _keepalive_worker(host: str, port: int, request: bytes, jobs, report: LoadReport,
                            stop_at: float) -> None:
    """One persistent HTTP/1.1 connection sending requests back to back (Content-Length replies)."""
    reader = writer = None
    try:
        for _ in jobs:
            if time.monotonic() > stop_at:
                report.errors.append("deadline reached before the request was sent")
                continue
            report.sent += 1
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}
                if "content-length" not in headers:
                    raise ValueError(f"reply without Content-Length: {lines[0]}")
                body = await reader.readexactly(int(headers["content-length"]))
            except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                report.errors.append(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            report.latencies_ms.append((time.perf_counter() - t0) * 1000)
            if status == 200 and b'"events"' in body[:20]:
                report.ok += 1
            else:
                report.errors.append(f"HTTP {status}: {body[:200]!r}")
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


def audit_query_load(url: str, token: str, *, concurrency: int = 200, total: int = 200,
                     deadline_s: float = 60.0, params: dict | None = None) -> LoadReport:
    """`total` GET /api/v1/audit/events requests, `concurrency` in flight at once, on loopback.

    Each of the `concurrency` workers holds one keep-alive HTTP/1.1 connection and sends its next
    request as soon as the previous reply is read. A minimal asyncio client is used on purpose:
    httpx's connection pool spends more CPU per request than the server at 200 connections, so
    it would measure the client.
    """
    from urllib.parse import urlencode, urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    query = urlencode(params or {"limit": 50}, doseq=True)
    request = (f"GET /api/v1/audit/events?{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Authorization: Bearer {token}\r\nAccept: application/json\r\n\r\n").encode()

    async def main() -> LoadReport:
        report = LoadReport(sent=0, ok=0, concurrency=concurrency)
        jobs = iter(range(total))
        stop_at = time.monotonic() + deadline_s
        started = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(_keepalive_worker(host, port, request, jobs, report, stop_at)
                             for _ in range(concurrency))),
            timeout=deadline_s + 30)
        report.wall_s = time.perf_counter() - started
        return report

    return asyncio.run(main())
