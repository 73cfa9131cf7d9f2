"""How the two matching parties exchange messages: a small interface and an in-process pair.

The protocol code only sees `Transport`: typed messages (a kind and bytes) sent and received in
order. `LocalTransport.pair()` connects two parties running in threads of one process (tests);
`fedpact.federation.match_channel` carries the same messages over gRPC between two nodes.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Protocol

from fedpact.privacy.matching.groups import MatchProtocolError

INITIATOR = "initiator"
RESPONDER = "responder"
ABORT = "abort"


class Transport(Protocol):
    """An ordered, reliable, two-party message channel."""

    role: str
    """INITIATOR (the side that connected) or RESPONDER (the side that listened)."""

    def send(self, kind: str, payload: bytes) -> None: ...

    def recv(self, kind: str, timeout: float | None = None) -> bytes: ...

    def close(self) -> None: ...


@dataclass
class TranscriptRecorder:
    """What one party sent, message by message (tests use it to check what leaks)."""

    sent: list[tuple[str, bytes]] = field(default_factory=list)
    received: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def bytes_sent(self) -> int:
        return sum(len(p) for _, p in self.sent)


def expect(kind: str, got_kind: str, payload: bytes) -> bytes:
    """Check that the message received is the one the protocol expects next."""
    if got_kind == ABORT:
        reason = payload.decode("utf-8", "replace")
        raise MatchProtocolError(f"the partner stopped the match job: {reason}")
    if got_kind != kind:
        raise MatchProtocolError(
            f"protocol out of step: expected a {kind!r} message from the partner, got {got_kind!r}"
        )
    return payload


class LocalTransport:
    """One end of an in-process channel; build two connected ends with `LocalTransport.pair()`."""

    def __init__(self, role: str, inbox: queue.Queue, outbox: queue.Queue,
                 recorder: TranscriptRecorder | None = None, timeout: float = 3600.0):
        self.role = role
        self._inbox, self._outbox = inbox, outbox
        self.recorder = recorder
        self.timeout = timeout
        self._closed = threading.Event()

    @classmethod
    def pair(cls, *, record: bool = False, timeout: float = 3600.0
             ) -> tuple[LocalTransport, LocalTransport]:
        a_to_b: queue.Queue = queue.Queue()
        b_to_a: queue.Queue = queue.Queue()
        rec_a = TranscriptRecorder() if record else None
        rec_b = TranscriptRecorder() if record else None
        return (cls(INITIATOR, b_to_a, a_to_b, rec_a, timeout),
                cls(RESPONDER, a_to_b, b_to_a, rec_b, timeout))

    def send(self, kind: str, payload: bytes) -> None:
        if self._closed.is_set():
            raise MatchProtocolError("the match channel is closed")
        payload = bytes(payload)
        if self.recorder is not None:
            self.recorder.sent.append((kind, payload))
        self._outbox.put((kind, payload))

    def recv(self, kind: str, timeout: float | None = None) -> bytes:
        try:
            got_kind, payload = self._inbox.get(timeout=timeout or self.timeout)
        except queue.Empty:
            raise MatchProtocolError(
                f"no {kind!r} message from the partner within {timeout or self.timeout:.0f} s"
            ) from None
        if self.recorder is not None:
            self.recorder.received.append((got_kind, payload))
        return expect(kind, got_kind, payload)

    def close(self) -> None:
        self._closed.set()
