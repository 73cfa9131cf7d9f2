"""Salted-hash matching keys: an X25519 agreement per match job, HMAC-SHA256 tokens of identifiers.

The two partners each draw an X25519 key pair and a nonce for the job, exchange the public halves,
and derive (HKDF-SHA256, bound to the job id and both public keys) a 32-byte HMAC key, a key for
the job-scoped output tokens and a key-confirmation key. Nothing is hard-coded or reused: a new
job gives new keys, and `JobKeys.erase()` overwrites them when the job ends.
"""

from __future__ import annotations

import hmac as _hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpact.privacy.matching.groups import MatchProtocolError

TOKEN_BYTES = 16
"""HMAC-SHA256 truncated to 128 bits: collisions among 10**9 ids have probability < 2**-68."""

NONCE_BYTES = 32
_INFO = b"fedpact/match/hash/v1"


@dataclass
class KeyShare:
    """One side's contribution to the job key: X25519 public key and a fresh nonce."""

    public_key: bytes
    nonce: bytes


class KeyAgreement:
    """One party's half of the per-job X25519 key agreement."""

    def __init__(self) -> None:
        self._private: X25519PrivateKey | None = X25519PrivateKey.generate()
        self.share = KeyShare(self._private.public_key().public_bytes_raw(),
                              secrets.token_bytes(NONCE_BYTES))

    def derive(self, peer: KeyShare, *, initiator: bool, job_id: str) -> JobKeys:
        """Combine with the partner's share; both sides get the same keys. Usable once."""
        if self._private is None:
            raise MatchProtocolError("this key agreement was already used; start a new job")
        if len(peer.public_key) != 32 or len(peer.nonce) != NONCE_BYTES:
            raise MatchProtocolError("partner's key share has the wrong length")
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer.public_key))
        except ValueError as exc:  # all-zero shared secret: a low-order public key
            raise MatchProtocolError(f"partner's X25519 public key is invalid: {exc}") from None
        self._private = None  # the private key is used once and dropped
        first, second = (self.share, peer) if initiator else (peer, self.share)
        material = HKDF(
            algorithm=hashes.SHA256(), length=96, salt=first.nonce + second.nonce,
            info=_INFO + b"|" + job_id.encode() + b"|" + first.public_key + second.public_key,
        ).derive(shared)
        keys = JobKeys(bytearray(material[:32]), bytearray(material[32:64]),
                       bytearray(material[64:]))
        del material, shared
        return keys


class JobKeys:
    """The keys of one match job; `erase()` zeroes them (best effort: Python may hold copies)."""

    def __init__(self, hmac_key: bytearray, token_key: bytearray, confirm_key: bytearray):
        self._hmac_key, self._token_key, self._confirm_key = hmac_key, token_key, confirm_key

    def _require(self, key: bytearray | None) -> bytearray:
        if key is None:
            raise MatchProtocolError("the job keys were already erased")
        return key

    def confirmation(self, role: str, transcript: bytes) -> bytes:
        """Key-confirmation tag for `role`: proves both sides derived the same keys."""
        return _hmac.digest(bytes(self._require(self._confirm_key)),
                            role.encode() + b"|" + transcript, "sha256")

    def check_confirmation(self, role: str, transcript: bytes, tag: bytes) -> None:
        if not _hmac.compare_digest(self.confirmation(role, transcript), tag):
            raise MatchProtocolError(
                "key confirmation failed: the partner derived a different key (wrong peer, a "
                "tampered channel, or a protocol version mismatch)"
            )

    def hash_ids(self, values: Sequence[str]) -> bytes:
        """HMAC-SHA256(job key, id) truncated to TOKEN_BYTES, concatenated in input order."""
        return hmac_tokens(values, self._require(self._hmac_key))

    def output_tokens(self, match_tokens: bytes) -> list[str]:
        """Job-scoped pseudonyms of matched identifiers (same on both sides, useless after erase)."""
        return output_tokens(match_tokens, self._require(self._token_key))

    def erase(self) -> None:
        for key in (self._hmac_key, self._token_key, self._confirm_key):
            if key is not None:
                key[:] = bytes(len(key))
        self._hmac_key = self._token_key = self._confirm_key = None

    def __repr__(self) -> str:
        return "JobKeys(<erased>)" if self._hmac_key is None else "JobKeys(<secret>)"


def hmac_tokens(values: Sequence[str], key: bytes | bytearray) -> bytes:
    """Keyed hash of each value (UTF-8), TOKEN_BYTES each, concatenated in order.

    Uses one HMAC object keyed once and copied per value (about twice the speed of hmac.digest).
    """
    base = crypto_hmac.HMAC(bytes(key), hashes.SHA256())
    copy, n = base.copy, TOKEN_BYTES
    out = []
    append = out.append
    for v in values:
        h = copy()
        h.update(v.encode())
        append(h.finalize()[:n])
    return b"".join(out)


def output_tokens(match_tokens: bytes, token_key: bytes | bytearray) -> list[str]:
    """Turn matched HMAC tokens into printable job-scoped pseudonyms (base32 of a second HMAC)."""
    import base64

    base = crypto_hmac.HMAC(bytes(token_key), hashes.SHA256())
    out = []
    for off in range(0, len(match_tokens), TOKEN_BYTES):
        h = base.copy()
        h.update(match_tokens[off:off + TOKEN_BYTES])
        out.append(base64.b32encode(h.finalize()[:15]).decode().lower())
    return out
