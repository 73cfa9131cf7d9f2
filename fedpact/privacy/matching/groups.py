"""Prime-order groups for commutative (Diffie-Hellman) encryption of identifiers, by name.

``x25519`` (the default): identifiers are hashed onto Curve25519 by try-and-increment (a uniform
point, with unknown discrete logarithm) and raised to secret scalars with X25519, whose clamped
scalars are multiples of the cofactor 8, so every value sent lies in the prime-order subgroup
(x-coordinate only). ``ristretto255``: libsodium's ``from_hash`` map and ristretto255 scalar
multiplication. Both use libsodium (bundled by ``rbcl``) through ctypes, which releases the GIL,
so a thread pool uses every core. docs/matching.md explains the choice (measured in bench/).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from fedpact.errors import FedpactError

ELEMENT_BYTES = 32
_CHUNK = 4096


class MatchProtocolError(FedpactError):
    """The matching protocol cannot go on: bad message, wrong length, degenerate group element."""


def _load_libsodium() -> ctypes.CDLL:
    """libsodium as bundled by rbcl (written to a temporary file that we remove once loaded)."""
    try:
        import rbcl.rbcl as rb
    except ImportError as exc:  # pragma: no cover - rbcl is a declared dependency
        raise FedpactError(
            "PSI needs the 'rbcl' package (libsodium bindings): pip install rbcl"
        ) from exc
    lib = rb._sodium
    path = getattr(sys.modules.get("rbcl._sodium"), "lib_path", None)
    if path and os.path.exists(path):
        with contextlib.suppress(OSError):  # mapped into this process: the file is not needed
            os.unlink(path)
    if lib.sodium_init() < 0:  # pragma: no cover
        raise FedpactError("libsodium failed to initialise")
    return lib


_LIB: ctypes.CDLL | None = None


def libsodium() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = _load_libsodium()
    return _LIB


def _c_fn(name: str, nargs: int) -> Callable[..., int]:
    """A private ctypes prototype of a libsodium function taking `nargs` pointers (GIL released)."""
    proto = ctypes.CFUNCTYPE(ctypes.c_int, *([ctypes.c_void_p] * nargs))
    return proto((name, libsodium()))


class SecretScalar:
    """A secret exponent held in a C buffer that `erase()` overwrites with zeros."""

    def __init__(self, size: int = 32):
        self._buf = ctypes.create_string_buffer(size)
        self.size = size

    @property
    def address(self) -> int:
        if self._buf is None:
            raise MatchProtocolError("the secret scalar was already erased")
        return ctypes.addressof(self._buf)

    def erase(self) -> None:
        if self._buf is not None:
            ctypes.memset(self._buf, 0, self.size)
            self._buf = None

    def __repr__(self) -> str:  # never print key material
        return "SecretScalar(<erased>)" if self._buf is None else "SecretScalar(<secret>)"


def _address(buffer: bytes | bytearray) -> int:
    if isinstance(buffer, bytearray):
        return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
    return ctypes.cast(ctypes.c_char_p(buffer), ctypes.c_void_p).value or 0


def _parallel(n: int, workers: int, work: Callable[[int, int], int]) -> int:
    """Run work(lo, hi) over chunks of range(n) on `workers` threads; return the sum of results."""
    if n == 0:
        return 0
    if workers <= 1 or n <= _CHUNK:
        return work(0, n)
    bounds = [(lo, min(n, lo + _CHUNK)) for lo in range(0, n, _CHUNK)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedpact-psi") as pool:
        return sum(pool.map(lambda b: work(*b), bounds))


def _check_points(points: bytes | bytearray, what: str) -> int:
    if len(points) % ELEMENT_BYTES:
        raise MatchProtocolError(
            f"{what}: {len(points)} bytes is not a whole number of {ELEMENT_BYTES}-byte group elements"
        )
    return len(points) // ELEMENT_BYTES


class CommutativeGroup:
    """Commutative encryption E_k(x) = k·H(x): E_a(E_b(H(x))) == E_b(E_a(H(x)))."""

    name = ""

    def new_scalar(self) -> SecretScalar:
        raise NotImplementedError

    def hash_to_group(self, values: Sequence[bytes], domain: bytes, workers: int = 1) -> bytearray:
        """H(domain, v) for each value, as concatenated 32-byte group elements."""
        raise NotImplementedError

    def multiply(self, scalar: SecretScalar, points: bytes | bytearray, workers: int = 1,
                 what: str = "group elements") -> bytearray:
        """scalar·P for each concatenated 32-byte element P; raises on a degenerate element."""
        n = _check_points(points, what)
        out = bytearray(n * ELEMENT_BYTES)
        if n == 0:
            return out
        fn, out_addr, in_addr, key = self._mult_fn, _address(out), _address(points), scalar.address

        def work(lo: int, hi: int) -> int:
            bad = 0
            for off in range(lo * ELEMENT_BYTES, hi * ELEMENT_BYTES, ELEMENT_BYTES):
                bad |= fn(out_addr + off, key, in_addr + off)
            return 1 if bad else 0

        if _parallel(n, workers, work):
            raise MatchProtocolError(
                f"{what}: a degenerate group element was received (small order or not a valid "
                "encoding); the partner's message is malformed or malicious"
            )
        return out

    @property
    def _mult_fn(self) -> Callable[..., int]:
        raise NotImplementedError


# --------------------------------------------------------------------------- X25519

_P25519 = 2**255 - 19
_A25519 = 486662


class X25519Group(CommutativeGroup):
    """Curve25519's prime-order subgroup, x-coordinate only, with libsodium X25519."""

    name = "x25519"

    def __init__(self) -> None:
        self._fn = _c_fn("crypto_scalarmult_curve25519", 3)
        try:
            from gmpy2 import jacobi, mpz
        except ImportError as exc:  # pragma: no cover - gmpy2 is a declared dependency
            raise FedpactError("the x25519 PSI group needs the 'gmpy2' package") from exc
        self._jacobi, self._p, self._mpz = jacobi, mpz(_P25519), mpz

    @property
    def _mult_fn(self) -> Callable[..., int]:
        return self._fn

    def new_scalar(self) -> SecretScalar:
        s = SecretScalar(32)
        ctypes.memmove(s.address, secrets.token_bytes(32), 32)  # X25519 clamps it
        return s

    def hash_to_group(self, values: Sequence[bytes], domain: bytes, workers: int = 1) -> bytearray:
        """Try-and-increment: u = SHA-512(dst, counter, v) (low 255 bits) until u < p is the
        x-coordinate of a point on Curve25519 (u^3 + A u^2 + u is a non-zero square).

        A uniform curve point up to sign; the clamped X25519 scalar then clears the cofactor.
        Each attempt succeeds with probability 1/2 (at most 256 attempts: failure 2**-256).
        """
        a, jacobi, pm, mpz = _A25519, self._jacobi, self._p, self._mpz
        base = hashlib.sha512(b"fedpact/h2c/curve25519-tai/v1" + len(domain).to_bytes(2, "big")
                              + domain)
        copy, from_bytes, mask = base.copy, mpz.from_bytes, mpz((1 << 255) - 1)
        out: list[bytes] = []
        append = out.append
        counters = [bytes((c,)) for c in range(256)]
        for v in values:
            for c in counters:
                h = copy()
                h.update(c + v)
                u = from_bytes(h.digest(), "little") & mask  # SHA-512 -> 255 bits
                if u < pm and jacobi(u * (u * (u + a) + 1) % pm, pm) == 1:
                    break
            else:  # pragma: no cover - probability 2**-256
                raise MatchProtocolError("hash to Curve25519 failed after 256 attempts")
            append(u.to_bytes(ELEMENT_BYTES, "little"))
        return bytearray(b"".join(out))


# --------------------------------------------------------------------------- ristretto255


class Ristretto255Group(CommutativeGroup):
    """The ristretto255 prime-order group (libsodium from_hash and scalar multiplication)."""

    name = "ristretto255"

    def __init__(self) -> None:
        self._fn = _c_fn("crypto_scalarmult_ristretto255", 3)
        self._from_hash = _c_fn("crypto_core_ristretto255_from_hash", 2)
        self._scalar_random = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(
            ("crypto_core_ristretto255_scalar_random", libsodium()))

    @property
    def _mult_fn(self) -> Callable[..., int]:
        return self._fn

    def new_scalar(self) -> SecretScalar:
        s = SecretScalar(32)
        self._scalar_random(s.address)
        return s

    def hash_to_group(self, values: Sequence[bytes], domain: bytes, workers: int = 1) -> bytearray:
        base = hashlib.sha512(b"fedpact/h2c/ristretto255/v1" + len(domain).to_bytes(2, "big")
                              + domain)
        copy = base.copy
        digests = bytearray(len(values) * 64)
        off = 0
        for v in values:
            h = copy()
            h.update(v)
            digests[off:off + 64] = h.digest()
            off += 64
        out = bytearray(len(values) * ELEMENT_BYTES)
        fn, out_addr, in_addr = self._from_hash, _address(out), _address(digests)

        def work(lo: int, hi: int) -> int:
            for i in range(lo, hi):
                fn(out_addr + ELEMENT_BYTES * i, in_addr + 64 * i)
            return 0

        _parallel(len(values), workers, work)
        return out


GROUPS: dict[str, type[CommutativeGroup]] = {
    X25519Group.name: X25519Group,
    Ristretto255Group.name: Ristretto255Group,
}
DEFAULT_GROUP = X25519Group.name


def group_named(name: str) -> CommutativeGroup:
    """The group registered under `name` (``x25519`` or ``ristretto255``)."""
    from fedpact.errors import ConfigurationError

    try:
        return GROUPS[name]()
    except KeyError:
        raise ConfigurationError(
            f"PSI group {name!r} is not supported; use one of: {', '.join(GROUPS)}"
        ) from None
