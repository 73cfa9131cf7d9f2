"""Deployment credentials: a consortium CA, the SuperLink's TLS certificate, partner node keys.

`fedpact node init` writes these with `cryptography` only (no openssl binary). The SuperLink's
certificate names every address nodes will dial (SANs), node keys are ECDSA P-384 in the OpenSSH
public format that Flower's SuperNode authentication registers. Private keys are written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpact.errors import ConfigurationError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertificateFiles:
    """Where the consortium's TLS material lives (PEM files)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file existed with a looser mode
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: tuple[str, ...] | list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if any(c.isspace() or c in "/:@" for c in host):
                raise ConfigurationError(f"TLS host name {host!r} is neither an IP address nor a "
                                         "DNS name") from None
            names.append(x509.DNSName(host))
    if not names:
        raise ConfigurationError("the SuperLink certificate needs at least one host name or IP")
    return x509.SubjectAlternativeName(names)


def create_certificates(directory: str | Path, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS,
                        *, organisation: str = "fedpact consortium",
                        days: int = 365) -> CertificateFiles:
    """A self-signed consortium CA and a SuperLink server certificate for `hosts` (SANs) plus
    the loopback names (the coordinator's own tools dial the SuperLink on 127.0.0.1)."""
    directory = Path(directory)
    hosts = list(dict.fromkeys([*hosts, *DEFAULT_HOSTS]))
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([
                       x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                       x509.NameAttribute(NameOID.COMMON_NAME, "fedpact superlink")]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(_san(tuple(hosts)), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))
    files = CertificateFiles(directory / "ca.crt", directory / "ca.key",
                             directory / "superlink.crt", directory / "superlink.key")
    directory.mkdir(parents=True, exist_ok=True)
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.ca_key, _pem_key(ca_key))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem_key(server_key))
    return files


def create_node_key(private_path: str | Path) -> Path:
    """An ECDSA P-384 key pair for SuperNode authentication; returns the `.pub` (OpenSSH) path."""
    private_path = Path(private_path)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private_path, key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH)
                            + b"\n")
    return public_path


def node_key_fingerprint(public_path: str | Path) -> str:
    """SHA-256 fingerprint of an OpenSSH public key (what the ledger records on registration)."""
    data = Path(public_path).read_bytes().strip()
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{public_path}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigurationError(f"{public_path}: SuperNode keys must be ECDSA (EC) keys")
    digest = hashes.Hash(hashes.SHA256())
    digest.update(key.public_bytes(serialization.Encoding.OpenSSH,
                                   serialization.PublicFormat.OpenSSH))
    return "SHA256:" + digest.finalize().hex()
