"""The test bed's mesh identities, as istiod's CA hands them out: one CA per
bed, and per meshed pod a workload certificate whose only name is the SPIFFE
URI of its service account (spiffe://cluster.local/ns/<ns>/sa/<sa>).

Keys are RSA 2048, Istio's default for workload certificates (and for its
self-signed root). Files are laid out as Istio mounts them for its proxy
(cert-chain.pem, key.pem, root-cert.pem) in a directory only the proxy's uid
can read; the CA key stays root's. Everything lives in the bed's work
directory, which `down` removes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

TRUST_DOMAIN = "cluster.local"
KEY_BITS = 2048
VALIDITY = datetime.timedelta(days=1)     # a bed lives minutes; Istio's workload default is 24 h
CA_DIR = "ca"
CERT_CHAIN, KEY, ROOT_CERT = "cert-chain.pem", "key.pem", "root-cert.pem"


def spiffe_id(namespace: str, service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)     # O_CREAT's mode is filtered by the umask
    if owner is not None:
        os.chown(path, *owner)


@dataclass
class CertificateAuthority:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    @classmethod
    def create(cls, directory: Path) -> "CertificateAuthority":
        """A self-signed root, written to `directory` (key readable by root only)."""
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write(directory / ROOT_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(directory / KEY, _pem_key(key), 0o600)
        return cls(cert, key)

    @classmethod
    def load(cls, directory: Path) -> "CertificateAuthority":
        cert = x509.load_pem_x509_certificate((directory / ROOT_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / KEY).read_bytes(), password=None)
        return cls(cert, key)

    def issue(self, directory: Path, identity: str, owner: tuple[int, int]) -> None:
        """A workload certificate for `identity` (a SPIFFE URI) with its key and
        the root, in `directory`, readable by `owner` (uid, gid) only."""
        key = _new_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        # No subject: Istio's workload certificates carry the identity in the
        # URI SAN only (Envoy accepts that; it refuses a certificate with
        # neither a CN nor a SAN).
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                               critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                             content_commitment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=False, crl_sign=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                      x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        pem = serialization.Encoding.PEM
        _write(directory / CERT_CHAIN, cert.public_bytes(pem), 0o400, owner)
        _write(directory / KEY, _pem_key(key), 0o400, owner)
        _write(directory / ROOT_CERT, self.cert.public_bytes(pem), 0o400, owner)
