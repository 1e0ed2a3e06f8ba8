"""TLS certificates for the coordinator and authentication keys for hospital SuperNodes.

The coordinator makes a CA and a SuperLink certificate; each hospital makes its own node key pair
and hands only the public key to the coordinator, who registers it (`flwr supernode register`).
Flower wants node keys as ECDSA keys in OpenSSH format.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fedseg.common.atomic import atomic_write_bytes


def write_server_certificates(out: str | Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """Write ``ca.crt``/``ca.key`` and ``server.pem``/``server.key`` for the SuperLink.

    Args:
        out: folder (created); private keys are written with mode 0600.
        hosts: IP addresses and DNS names the SuperLink is reached at (subject alternative names).
        days: validity.
    """
    if not hosts:
        raise ValueError("hosts: give at least one IP address or DNS name of the SuperLink")
    out = Path(out)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedseg federation CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca.key": _pem_private(ca_key),
        "server.pem": cert.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem_private(key),
    }
    return {name: _write(out / name, data, private=name.endswith(".key")) for name, data in files.items()}


def write_node_key(out: str | Path, name: str) -> tuple[Path, Path]:
    """Write a hospital's SuperNode key pair ``<name>`` (private, 0600) and ``<name>.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return (_write(Path(out) / name, private, private=True),
            _write(Path(out) / f"{name}.pub", public + b"\n", private=False))


def _pem_private(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool) -> Path:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600 if private else 0o644)
    return path
