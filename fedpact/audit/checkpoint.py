"""Signed tree heads ("checkpoints") in the C2SP tlog-checkpoint / signed-note format, with Ed25519.

Pure code, no database. A checkpoint is the text

    <origin>\\n<tree size>\\n<base64 root hash>\\n[extension lines]\\n
    \\n
    — <key name> <base64(4-byte key id || 64-byte Ed25519 signature)>\\n

which Go's golang.org/x/mod/sumdb/note and transparency-dev tooling read as well. A verifier key is
published as `<name>+<8 hex key id>+<base64(0x01 || 32-byte public key)>`; it is all a third party
needs to check a checkpoint (and, with `merkle.py`, any proof against it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpact.audit.events import LedgerError

_ED25519 = b"\x01"
_SIGNATURE_PREFIX = "\u2014 "
_KEY_NAME = re.compile(r"^[^\s+]+$")


class CheckpointError(LedgerError):
    """A checkpoint or key is malformed, or its signature does not verify; the message says which."""


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte key id of signed notes: SHA-256(name || "\\n" || 0x01 || public key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + public_key).digest()[:4]


@dataclass(frozen=True)
class VerifierKey:
    """A public Ed25519 key with the name it signs under: all a third party needs."""

    name: str
    public_key: bytes

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    def encode(self) -> str:
        """`name+keyid+base64(0x01||key)`, the note verifier-key text."""
        return (
            f"{self.name}+{self.key_id.hex()}+"
            f"{base64.b64encode(_ED25519 + self.public_key).decode()}"
        )

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        """Read a verifier key from its text form; raise CheckpointError naming what is wrong."""
        parts = text.strip().split("+", 2)  # base64 may itself contain '+'
        if len(parts) != 3:
            raise CheckpointError(
                f"verifier key {text.strip()[:40]!r} is not of the form name+keyid+base64key"
            )
        name, hex_id, encoded = parts
        try:
            raw = base64.b64decode(encoded, validate=True)
            expected_id = bytes.fromhex(hex_id)
        except (binascii.Error, ValueError):
            raise CheckpointError(f"verifier key for {name!r} is not valid hex/base64") from None
        if len(raw) != 33 or raw[:1] != _ED25519:
            raise CheckpointError(f"verifier key for {name!r} is not an Ed25519 key")
        key = cls(name, raw[1:])
        if key.key_id != expected_id:
            raise CheckpointError(f"verifier key for {name!r}: key id does not match the key")
        return key

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return True


class CheckpointSigner:
    """An Ed25519 private key that signs checkpoints under a name (the log's origin)."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        if not _KEY_NAME.match(name):
            raise CheckpointError(f"key name {name!r} must be non-empty with no spaces or '+'")
        self.name = name
        self._key = private_key
        from cryptography.hazmat.primitives import serialization

        public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.verifier = VerifierKey(name, public)

    @classmethod
    def generate(cls, name: str) -> CheckpointSigner:
        return cls(name, Ed25519PrivateKey.generate())

    def encode_private(self) -> str:
        """`PRIVATE+KEY+name+keyid+base64(0x01||seed)`, the note signer-key text. Keep it secret."""
        from cryptography.hazmat.primitives import serialization

        seed = self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return (
            f"PRIVATE+KEY+{self.name}+{self.verifier.key_id.hex()}+"
            f"{base64.b64encode(_ED25519 + seed).decode()}"
        )

    @classmethod
    def parse_private(cls, text: str, *, source: str = "signer key") -> CheckpointSigner:
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise CheckpointError(f"{source} is not of the form PRIVATE+KEY+name+keyid+base64")
        try:
            raw = base64.b64decode(parts[4], validate=True)
        except binascii.Error:
            raise CheckpointError(f"{source} is not valid base64") from None
        if len(raw) != 33 or raw[:1] != _ED25519:
            raise CheckpointError(f"{source} is not an Ed25519 key")
        signer = cls(parts[2], Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if signer.verifier.key_id.hex() != parts[3]:
            raise CheckpointError(f"{source}: key id does not match the key")
        return signer

    def sign(self, checkpoint: Checkpoint) -> str:
        """Return the signed note text of `checkpoint`."""
        body = checkpoint.body()
        signature = self._key.sign(body.encode())
        stamp = base64.b64encode(self.verifier.key_id + signature).decode()
        return f"{body}\n{_SIGNATURE_PREFIX}{self.name} {stamp}\n"


def load_or_create_signer(path: Path, name: str) -> CheckpointSigner:
    """Read the signer key file at `path`, or create it (mode 0600) under `name` if absent."""
    if path.exists():
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read checkpoint signing key {path}: {exc}") from None
        return CheckpointSigner.parse_private(text, source=f"checkpoint signing key {path}")
    signer = CheckpointSigner.generate(name)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(signer.encode_private() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)  # atomic: the first process to create the key wins
        except FileExistsError:
            return load_or_create_signer(path, name)
    finally:
        temporary.unlink(missing_ok=True)
    return signer


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: the log `origin`, how many leaves it covers and their Merkle root."""

    origin: str
    tree_size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        lines = [self.origin, str(self.tree_size), base64.b64encode(self.root_hash).decode()]
        return "\n".join([*lines, *self.extensions]) + "\n"

    @property
    def timestamp(self) -> str | None:
        """The `timestamp <ISO-8601>` extension line, if present."""
        for line in self.extensions:
            if line.startswith("timestamp "):
                return line.split(" ", 1)[1]
        return None

    @property
    def ids_bound_from(self) -> int | None:
        """The `ids-bound-from <seq>` extension line: from which seq the log's event ids are
        derived from their records (`chain.event_id_for`); None in notes that do not say."""
        for line in self.extensions:
            if line.startswith("ids-bound-from "):
                value = line.split(" ", 1)[1]
                return int(value) if value.isdigit() else None
        return None


@dataclass(frozen=True)
class SignedCheckpoint:
    checkpoint: Checkpoint
    note: str
    key_name: str


def parse_note(note: str) -> tuple[Checkpoint, str, list[tuple[str, bytes]]]:
    """Split a signed note into its checkpoint, signed body and (key name, signature blob) pairs."""
    if not isinstance(note, str) or "\n\n" not in note:
        raise CheckpointError("checkpoint note has no blank line between its body and signatures")
    body, _, signature_block = note.partition("\n\n")
    body += "\n"
    lines = body[:-1].split("\n")
    if len(lines) < 3:
        raise CheckpointError("checkpoint body needs origin, tree size and root hash lines")
    origin, size_text, root_text, *extensions = lines
    if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
        raise CheckpointError(f"checkpoint tree size {size_text!r} is not a decimal number")
    try:
        root = base64.b64decode(root_text, validate=True)
    except binascii.Error:
        raise CheckpointError(f"checkpoint root hash {root_text!r} is not base64") from None
    if len(root) != 32:
        raise CheckpointError("checkpoint root hash is not 32 bytes")
    signatures: list[tuple[str, bytes]] = []
    for line in signature_block.splitlines():
        if not line.startswith(_SIGNATURE_PREFIX):
            raise CheckpointError(f"checkpoint signature line {line[:40]!r} does not start with '—'")
        try:
            name, encoded = line[len(_SIGNATURE_PREFIX):].split(" ")
            blob = base64.b64decode(encoded, validate=True)
        except (ValueError, binascii.Error):
            raise CheckpointError(f"checkpoint signature line {line[:40]!r} is malformed") from None
        if len(blob) != 68:
            raise CheckpointError(f"checkpoint signature by {name!r} has the wrong length")
        signatures.append((name, blob))
    if not signatures:
        raise CheckpointError("checkpoint carries no signature")
    return Checkpoint(origin, int(size_text), root, tuple(extensions)), body, signatures


def open_checkpoint(note: str, key: VerifierKey) -> Checkpoint:
    """Return the checkpoint in `note` if `key` signed it; raise CheckpointError otherwise."""
    checkpoint, body, signatures = parse_note(note)
    for name, blob in signatures:
        if name == key.name and blob[:4] == key.key_id:
            if key.verify(body.encode(), blob[4:]):
                return checkpoint
            raise CheckpointError(
                f"checkpoint for tree size {checkpoint.tree_size}: the signature by {key.name} "
                f"(key {key.key_id.hex()}) does not verify (forged or replaced)"
            )
    signers = ", ".join(f"{n} ({b[:4].hex()})" for n, b in signatures)
    raise CheckpointError(
        f"checkpoint for tree size {checkpoint.tree_size} is not signed by {key.name} "
        f"(key {key.key_id.hex()}); it carries signatures by {signers}"
    )
