"""Prime-order groups for commutative (Diffie-Hellman) encryption of identifiers, by name.

``x25519`` (the default): identifiers are hashed onto Curve25519 with RFC 9380's
``curve25519_XMD:SHA-512_ELL2_NU_`` (expand_message_xmd with SHA-512, Elligator 2; a point whose
discrete logarithm nobody knows) and raised to secret scalars with X25519, whose clamped scalars
are multiples of the cofactor 8: that clears the cofactor, so every value sent lies in the
prime-order subgroup (x-coordinate only), and k_a·(k_b·Q) = k_b·(k_a·Q). ``ristretto255``:
libsodium's ``from_hash`` map and ristretto255 scalar multiplication. Both multiply with libsodium
(bundled by ``rbcl``) through ctypes, which releases the GIL, so a thread pool uses every core.
docs/matching.md explains the choice (measured in bench/).
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

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

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
H2C_SUITE = "curve25519_XMD:SHA-512_ELL2_NU_"
"""RFC 9380 encoding used to hash identifiers onto Curve25519 (Elligator 2, expand_message_xmd)."""
_H2C_L = 48  # bytes per field element: ceil((ceil(log2(p)) + k) / 8) with k = 128


def h2c_dst(domain: bytes) -> bytes:
    """The RFC 9380 domain separation tag of one job (kept under 43 bytes: one SHA-512 block)."""
    dst = b"FEDPACT-PSI-V2:" + domain
    if not 0 < len(dst) <= 255:
        raise MatchProtocolError("hash-to-curve domain must give a tag of 1-255 bytes")
    return dst


def expand_message_xmd_sha512(msg: bytes, dst: bytes, len_in_bytes: int) -> bytes:
    """expand_message_xmd of RFC 9380 section 5.3.1 with SHA-512 (reference form, for tests)."""
    ell = -(-len_in_bytes // 64)
    if ell > 255 or len_in_bytes > 65535 or len(dst) > 255:
        raise ValueError("expand_message_xmd: requested length or DST too long")
    dst_prime = dst + bytes([len(dst)])
    b0 = hashlib.sha512(bytes(128) + msg + len_in_bytes.to_bytes(2, "big") + b"\x00"
                        + dst_prime).digest()
    b = [hashlib.sha512(b0 + b"\x01" + dst_prime).digest()]
    for i in range(2, ell + 1):
        mixed = bytes(x ^ y for x, y in zip(b0, b[-1], strict=True))
        b.append(hashlib.sha512(mixed + bytes([i]) + dst_prime).digest())
    return b"".join(b)[:len_in_bytes]


def hash_to_field_curve25519(msg: bytes, dst: bytes) -> int:
    """hash_to_field(msg, 1) of the suite: one element of GF(2^255 - 19)."""
    return int.from_bytes(expand_message_xmd_sha512(msg, dst, _H2C_L), "big") % _P25519


def elligator2_curve25519(u: int) -> int:
    """map_to_curve_elligator2 (RFC 9380 section 6.7.1, Z = 2) on Curve25519: the u-coordinate
    (Montgomery x) of the point; the sign of y is irrelevant to x-only arithmetic."""
    p, a = _P25519, _A25519
    d = (1 + 2 * u * u) % p  # never 0: 2 is not a square mod p, so -1/2 is not either
    x1 = (-a * pow(d, p - 2, p)) % p if d else (-a) % p
    gx1 = (x1 * (x1 * (x1 + a) + 1)) % p
    if pow(gx1, (p - 1) // 2, p) in (0, 1):  # is_square
        return x1
    return (-x1 - a) % p


def encode_to_curve25519_x(msg: bytes, dst: bytes) -> int:
    """u-coordinate of map_to_curve(hash_to_field(msg)) of curve25519_XMD:SHA-512_ELL2_NU_, before
    clear_cofactor: X25519's clamped scalars are multiples of 8, so k·Q = (k/8)·(8Q) with 8Q the
    suite's output P (the tests check this against the RFC 9380 vectors)."""
    return elligator2_curve25519(hash_to_field_curve25519(msg, dst))


class X25519Group(CommutativeGroup):
    """Curve25519's prime-order subgroup, x-coordinate only, with libsodium X25519."""

    name = "x25519"
    h2c_suite = H2C_SUITE

    def __init__(self) -> None:
        self._fn = _c_fn("crypto_scalarmult_curve25519", 3)
        try:
            from gmpy2 import invert, jacobi, mpz
        except ImportError as exc:  # pragma: no cover - gmpy2 is a declared dependency
            raise FedpactError("the x25519 PSI group needs the 'gmpy2' package") from exc
        self._jacobi, self._mpz, self._invert = jacobi, mpz, invert

    @property
    def _mult_fn(self) -> Callable[..., int]:
        return self._fn

    def new_scalar(self) -> SecretScalar:
        s = SecretScalar(32)
        ctypes.memmove(s.address, secrets.token_bytes(32), 32)  # X25519 clamps it
        return s

    def multiply(self, scalar: SecretScalar, points: bytes | bytearray, workers: int = 1,
                 what: str = "group elements") -> bytearray:
        """X25519(scalar, P) for each element: on one thread through OpenSSL (`cryptography`),
        on several through libsodium threads.

        Measured on the project machine (bench/test_bench_matching.py::test_group_primitives):
        OpenSSL's X25519 (mulx/adx assembly) takes about 26 us per element from Python, libsodium's
        about 30 us, but `cryptography` holds the GIL, so only libsodium (through ctypes, which
        releases it) spreads over cores. Both compute RFC 7748 X25519 and reject the same degenerate
        (small-order) inputs; tests/test_matching_protocol.py checks they agree byte for byte.
        """
        if workers > 1:
            return super().multiply(scalar, points, workers, what)
        n = _check_points(points, what)
        out = bytearray(n * ELEMENT_BYTES)
        if n == 0:
            return out
        key_buffer = (ctypes.c_char * scalar.size).from_address(scalar.address)
        key = X25519PrivateKey.from_private_bytes(memoryview(key_buffer).cast("B"))
        exchange, load = key.exchange, X25519PublicKey.from_public_bytes
        data = bytes(points)  # slices of bytes are bytes, which `from_public_bytes` insists on
        try:
            for off in range(0, n * ELEMENT_BYTES, ELEMENT_BYTES):
                out[off:off + ELEMENT_BYTES] = exchange(load(data[off:off + ELEMENT_BYTES]))
        except ValueError:
            raise MatchProtocolError(
                f"{what}: a degenerate group element was received (small order or not a valid "
                "encoding); the partner's message is malformed or malicious"
            ) from None
        finally:
            del key, exchange, data  # OpenSSL clears the private key when it frees it
        return out

    def hash_to_group(self, values: Sequence[bytes], domain: bytes, workers: int = 1) -> bytearray:
        """RFC 9380 curve25519_XMD:SHA-512_ELL2_NU_ under the job's tag `h2c_dst(domain)`."""
        return self.encode_batch(values, h2c_dst(domain))

    def encode_batch(self, values: Sequence[bytes], dst: bytes) -> bytearray:
        """`encode_to_curve25519_x(v, dst)` of each value, as 32 little-endian bytes each: the
        u-coordinate of Elligator 2 of hash_to_field(v), before cofactor clearing.

        The same arithmetic as the reference functions above, batched: SHA-512 resumed after the
        128-byte zero block, gmpy2 integers, and one modular inversion per chunk of values
        (Montgomery's trick) instead of one per value. Holds the GIL (about 5 us per value).
        """
        dst_prime = dst + bytes([len(dst)])
        tail0 = _H2C_L.to_bytes(2, "big") + b"\x00" + dst_prime
        tail1 = b"\x01" + dst_prime
        zpad = hashlib.sha512(bytes(128)).copy
        sha512 = hashlib.sha512
        mpz, jacobi, invert = self._mpz, self._jacobi, self._invert
        from_bytes = mpz.from_bytes
        p, a, two = mpz(_P25519), mpz(_A25519), mpz(2)
        n = len(values)
        out = bytearray(n * ELEMENT_BYTES)
        for lo in range(0, n, _CHUNK):
            ds = []
            append = ds.append
            for v in values[lo:lo + _CHUNK]:
                h = zpad()
                h.update(v + tail0)
                b1 = sha512(h.digest() + tail1).digest()
                u = from_bytes(b1[:_H2C_L], "big") % p
                append((two * u * u + 1) % p)
            # Montgomery's trick: prefix products, one inversion, then walk back.
            prefix = []
            acc = mpz(1)
            for d in ds:
                prefix.append(acc)
                acc = acc * d % p
            inv = invert(acc, p)  # acc != 0: no d is 0 (see elligator2_curve25519)
            xs = [0] * len(ds)
            for i in range(len(ds) - 1, -1, -1):
                x1 = -a * (inv * prefix[i]) % p
                inv = inv * ds[i] % p
                gx1 = x1 * (x1 * (x1 + a) + 1) % p
                xs[i] = x1 if jacobi(gx1, p) >= 0 else (-x1 - a) % p
            off = lo * ELEMENT_BYTES
            out[off:off + len(xs) * ELEMENT_BYTES] = b"".join(
                int(x).to_bytes(ELEMENT_BYTES, "little") for x in xs)
        return out


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
