"""A throwaway certificate authority for the mock servers, made with ``cryptography``.

The gateway verifies its upstreams (``ssl_verify_upstream_trusted_ca``), so the mocks need
certificates for the real names agents use (``api.openai.com``...). The few calls used here
mirror ``trustme``'s (``issue_cert(...).configure_cert(ctx)``,
``private_key_and_cert_chain_pem.write_to_path``, ``cert_pem.write_to_path``) so a mock written
against trustme in the tests runs unchanged in the demo, which cannot depend on a test tool.
EC P-256 keys: generated in milliseconds, unlike RSA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class Blob:
    """PEM bytes that can be written to a file (trustme's ``Blob``)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def bytes(self) -> bytes:
        return self.data

    def write_to_path(self, path: str | os.PathLike[str], append: bool = False) -> None:
        with open(path, "ab" if append else "wb") as f:
            f.write(self.data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class LeafCert:
    """A server certificate and its key."""

    def __init__(self, key_pem: bytes, cert_pem: bytes) -> None:
        self.private_key_pem = Blob(key_pem)
        self.cert_chain_pems = [Blob(cert_pem)]
        self.private_key_and_cert_chain_pem = Blob(key_pem + cert_pem)

    def configure_cert(self, ctx: ssl.SSLContext) -> None:
        """Load the certificate and key into a server-side ``ctx``."""
        with tempfile.TemporaryDirectory() as tmp:
            pem = Path(tmp) / "leaf.pem"
            self.private_key_and_cert_chain_pem.write_to_path(pem)
            ctx.load_cert_chain(pem)


class LocalCA:
    """A CA valid for a day; :meth:`issue_cert` signs leaves for host names and IPs."""

    def __init__(self, name: str = "fleetgate demo upstream CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._name = subject
        self._cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256()))
        self.cert_pem = Blob(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue_cert(self, *identities: str) -> LeafCert:
        """A leaf for ``identities`` (DNS names or IP addresses), signed by this CA."""
        if not identities:
            raise ValueError("issue_cert needs at least one name")
        sans: list[x509.GeneralName] = []
        for ident in identities:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(ident)))
            except ValueError:
                sans.append(x509.DNSName(ident))
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identities[0])]))
            .issuer_name(self._name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256()))
        return LeafCert(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))

    def server_context(self, *identities: str) -> ssl.SSLContext:
        """A server-side TLS context presenting a fresh leaf for ``identities``."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.issue_cert(*identities).configure_cert(ctx)
        return ctx
