"""The network channel of an audience-match job: one gRPC bidirectional stream between two nodes.

No protoc step: a generic handler carries raw bytes. Each protocol message (a kind and a payload)
travels as frames of at most 1 MiB (``kind_len | kind | last | chunk``), so the default gRPC
message limits hold for any set size. One node listens (`listen`, the responder), the other
connects (`connect`, the initiator); both then hand the transport to
`fedpact.privacy.matching.run_match`. Use TLS (`TlsFiles`) between organisations; without it
the channel is only fit for loopback and tests.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedpact.errors import ConfigurationError
from fedpact.privacy.matching.groups import MatchProtocolError
from fedpact.privacy.matching.transport import (
    ABORT,
    INITIATOR,
    RESPONDER,
    TranscriptRecorder,
    expect,
)

SERVICE = "fedpact.match.v1.MatchChannel"
METHOD = f"/{SERVICE}/Exchange"
FRAME_BYTES = 1 << 20
_OPTIONS = [("grpc.max_receive_message_length", 4 * FRAME_BYTES),
            ("grpc.max_send_message_length", 4 * FRAME_BYTES)]
# The initiator may dial before the partner listens: retry every 50-500 ms, not gRPC's default
# 1 s doubling up to 120 s, which made a node that started first wait seconds for nothing.
_DIAL_OPTIONS = _OPTIONS + [("grpc.initial_reconnect_backoff_ms", 50),
                            ("grpc.min_reconnect_backoff_ms", 50),
                            ("grpc.max_reconnect_backoff_ms", 500)]
_END = object()


def _identity(b: bytes) -> bytes:
    return b


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS channel; with `ca` on both sides the peers authenticate each other."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def _read(self, path: Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the TLS {what} {path}: {exc.strerror}") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._read(self.cert, "certificate"), self._read(self.key, "key"), \
            self._read(self.ca, "CA certificate")
        if cert is None or key is None:
            raise ConfigurationError("a listening node needs --tls-cert and --tls-key for TLS")
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca, "CA certificate"),
            private_key=self._read(self.key, "key"),
            certificate_chain=self._read(self.cert, "certificate"))


def encode_frames(kind: str, payload: bytes) -> Iterator[bytes]:
    name = kind.encode()
    if not 0 < len(name) < 256:
        raise ValueError(f"message kind {kind!r} must be 1-255 bytes")
    head = bytes([len(name)]) + name
    view = memoryview(payload)
    if len(view) == 0:
        yield head + b"\x01"
        return
    for start in range(0, len(view), FRAME_BYTES):
        last = start + FRAME_BYTES >= len(view)
        yield head + (b"\x01" if last else b"\x00") + bytes(view[start:start + FRAME_BYTES])


class _Reassembler:
    def __init__(self) -> None:
        self.kind: str | None = None
        self.parts: list[bytes] = []

    def feed(self, frame: bytes) -> tuple[str, bytes] | None:
        if len(frame) < 2 or len(frame) < 2 + frame[0]:
            raise MatchProtocolError("malformed frame on the match channel")
        n = frame[0]
        kind, last, chunk = frame[1:1 + n].decode("utf-8", "replace"), frame[1 + n], frame[2 + n:]
        if self.kind is not None and kind != self.kind:
            raise MatchProtocolError("interleaved messages on the match channel")
        self.kind = kind
        self.parts.append(chunk)
        if not last:
            return None
        message = (kind, b"".join(self.parts))
        self.kind, self.parts = None, []
        return message


class GrpcMatchTransport:
    """A `Transport` over one gRPC stream; build it with `listen(...)` or `connect(...)`."""

    def __init__(self, role: str, *, record: bool = False, timeout: float = 3600.0):
        self.role = role
        self.timeout = timeout
        self.recorder = TranscriptRecorder() if record else None
        self._outbox: queue.Queue = queue.Queue()
        self._inbox: queue.Queue = queue.Queue()
        self._finished = threading.Event()
        self._closed = False
        self._server: grpc.Server | None = None
        self._channel: grpc.Channel | None = None
        self._reader: threading.Thread | None = None
        self.port: int | None = None

    # -- Transport ----------------------------------------------------------------------
    def send(self, kind: str, payload: bytes) -> None:
        if self._closed:
            raise MatchProtocolError("the match channel is closed")
        payload = bytes(payload)
        if self.recorder is not None:
            self.recorder.sent.append((kind, payload))
        for frame in encode_frames(kind, payload):
            self._outbox.put(frame)

    def recv(self, kind: str, timeout: float | None = None) -> bytes:
        wait = timeout or self.timeout
        try:
            got_kind, payload = self._inbox.get(timeout=wait)
        except queue.Empty:
            raise MatchProtocolError(
                f"no {kind!r} message from the partner within {wait:.0f} s") from None
        if self.recorder is not None:
            self.recorder.received.append((got_kind, payload))
        return expect(kind, got_kind, payload)

    def close(self, grace: float = 10.0) -> None:
        """End our half of the stream after everything queued has gone out."""
        if self._closed:
            return
        self._closed = True
        self._outbox.put(_END)
        if self._server is not None:
            if self._reader is not None:  # a partner connected: let the last frames go out
                self._finished.wait(grace)
            self._server.stop(grace=1.0).wait(grace)
        if self._reader is not None:
            self._reader.join(grace)
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> GrpcMatchTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------
    def _outgoing(self) -> Iterator[bytes]:
        while True:
            frame = self._outbox.get()
            if frame is _END:
                return
            yield frame

    def _consume(self, frames: Iterator[bytes]) -> None:
        """Reader thread: frames in, whole messages onto the inbox; a broken stream aborts."""
        assembler = _Reassembler()
        try:
            for frame in frames:
                message = assembler.feed(frame)
                if message is not None:
                    self._inbox.put(message)
        except grpc.RpcError as exc:
            if not self._closed:
                detail = exc.details() if hasattr(exc, "details") else str(exc)
                self._inbox.put((ABORT, f"connection to the partner lost ({detail})".encode()))
        except MatchProtocolError as exc:
            self._inbox.put((ABORT, str(exc).encode()))
        else:
            self._inbox.put((ABORT, b"the partner closed the channel"))


def listen(address: str, *, tls: TlsFiles | None = None, record: bool = False,
           timeout: float = 3600.0) -> GrpcMatchTransport:
    """Serve the match channel on `address` (``host:port``; port 0 picks one, see `.port`).

    Accepts exactly one partner connection; further ones are refused.
    """
    transport = GrpcMatchTransport(RESPONDER, record=record, timeout=timeout)
    taken = threading.Lock()

    def exchange(request_iterator: Iterator[bytes], context: grpc.ServicerContext
                 ) -> Iterator[bytes]:
        if not taken.acquire(blocking=False):
            context.abort(grpc.StatusCode.ALREADY_EXISTS, "this node already has its match partner")
        reader = threading.Thread(target=transport._consume, args=(request_iterator,),
                                  name="fedpact-match-reader", daemon=True)
        transport._reader = reader
        reader.start()
        try:
            yield from transport._outgoing()
        finally:
            transport._finished.set()

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Exchange": grpc.stream_stream_rpc_method_handler(
            exchange, request_deserializer=_identity, response_serializer=_identity)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler],
                         options=_OPTIONS, maximum_concurrent_rpcs=2)
    try:
        port = (server.add_secure_port(address, tls.server_credentials()) if tls
                else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise ConfigurationError(f"cannot listen on {address!r}: {exc}") from None
    if not port:
        raise ConfigurationError(f"cannot listen on {address!r} (address in use or invalid)")
    server.start()
    transport._server, transport.port = server, port
    return transport


def connect(address: str, *, tls: TlsFiles | None = None, record: bool = False,
            timeout: float = 3600.0, connect_timeout: float = 60.0) -> GrpcMatchTransport:
    """Open the match channel to the partner listening on `address` (``host:port``).

    Dials until the partner listens, for at most `connect_timeout` seconds (``--connect-timeout``);
    `timeout` then bounds the wait for each message.
    """
    if not connect_timeout > 0:
        raise ConfigurationError(f"connect_timeout (--connect-timeout) must be positive, not "
                                 f"{connect_timeout}")
    transport = GrpcMatchTransport(INITIATOR, record=record, timeout=timeout)
    channel = (grpc.secure_channel(address, tls.channel_credentials(), options=_DIAL_OPTIONS)
               if tls else grpc.insecure_channel(address, options=_DIAL_OPTIONS))
    try:
        grpc.channel_ready_future(channel).result(timeout=connect_timeout)
    except grpc.FutureTimeoutError:
        channel.close()
        raise ConfigurationError(
            f"no match partner reachable at {address} within {connect_timeout:g} s "
            "(is the other node listening with --listen? --connect-timeout sets how long to "
            "dial)") from None
    call = channel.stream_stream(METHOD, request_serializer=_identity,
                                 response_deserializer=_identity)
    responses = call(transport._outgoing())
    reader = threading.Thread(target=transport._consume, args=(responses,),
                              name="fedpact-match-reader", daemon=True)
    transport._channel, transport._reader = channel, reader
    reader.start()
    return transport
