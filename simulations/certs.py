"""Credentials for a TLS deployment with SuperNode authentication, made with Python ``cryptography``.

* :func:`make_credentials`: a CA and a SuperLink certificate signed by it (what the SuperLink
  serves and every SuperNode and the operator's CLI verify);
* :func:`make_node_key`: a site's own key pair in OpenSSH format (the private key stays at the
  site, the SuperLink operator registers the public one).

Private keys and secrets are written 0600 (:func:`write_private`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOSTS = ("127.0.0.1", "localhost")  # what the SuperLink certificate is valid for: loopback


@dataclass(frozen=True)
class Credentials:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file only its owner can read (0600), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_credentials(out: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS, days: int = 30) -> Credentials:
    """A CA and a SuperLink certificate signed by it, valid for ``hosts`` (names or IPs).

    EC P-384 keys; the CA carries key usage (critical) and a subject key identifier, the
    leaf an authority key identifier and serverAuth, so strict verifiers (Python 3.13's
    default ``VERIFY_X509_STRICT``) accept the chain. Private keys are written 0600.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgen"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedgen federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgen"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    pkcs8, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    creds = Credentials(out / "ca.crt", out / "ca.key", out / "superlink.crt", out / "superlink.key")
    creds.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    write_private(creds.ca_key, ca_key.private_bytes(pem, pkcs8, none))
    creds.server_cert.write_bytes(cert.public_bytes(pem))
    write_private(creds.server_key, key.private_bytes(pem, pkcs8, none))
    return creds


def make_node_key(private_path: Path) -> tuple[Path, Path]:
    """A SuperNode's EC P-384 key pair in OpenSSH format (``ssh-keygen -t ecdsa -b 384``).

    The private key stays at the site (``--auth-supernode-private-key``); the public key
    (``<name>.pub``) is what the SuperLink operator registers with ``flwr supernode register``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH) + b"\n")
    return private_path, public_path
