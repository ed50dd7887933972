"""OPC UA security of the station's server: its application certificate (made once with
``cryptography``, through asyncua's OPC 10000-6 certificate builder, and kept), the client
certificates it trusts, and who may log in."""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path
from typing import Any, Callable

from asyncua import ua
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgead.runtime.line.uri import Credentials
from edgead.runtime.sinks import SinkError

CERT_DAYS = 5 * 365  # a station's certificate is trusted once by the SCADA: it should not expire soon


def default_pki_dir() -> Path:
    """Where a generated certificate is kept: ``$EDGEAD_PKI``, else ``~/.local/share/edgead/opcua``
    (not a cache: a new certificate would have to be trusted again by every client)."""
    root = os.environ.get("EDGEAD_PKI")
    return Path(root) if root else Path.home() / ".local" / "share" / "edgead" / "opcua"


def ensure_certificate(pki: Path, name: str, app_uri: str, host: str, say: Callable[[str], Any],
                       server: bool = True) -> tuple[Path, Path]:
    """``pki/NAME_cert.der`` and ``pki/NAME_key.pem``: loaded if both exist, else made (never
    overwritten). The certificate names ``app_uri`` and ``host`` (DNS, or IP for an address)."""
    cert_path, key_path = pki / f"{name}_cert.der", pki / f"{name}_key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    if cert_path.exists() or key_path.exists():
        raise SinkError(f"{pki}: only one of {cert_path.name} and {key_path.name} exists; restore the other "
                        "or move both away to make a new pair")
    pki.mkdir(parents=True, exist_ok=True)
    key = cert_gen.generate_private_key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(app_uri)]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    use = [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = cert_gen.generate_self_signed_app_certificate(key, name, {"organizationName": "edgead"}, names, extended=use,
                                                         days=CERT_DAYS)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(cert_gen.dump_private_key_as_pem(key))
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    say(f"opc.tcp: made a self-signed certificate {cert_path} (valid {CERT_DAYS} days, {app_uri}); "
        "trust it in the clients")
    return cert_path, key_path


def load_x509(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        return x509.load_pem_x509_certificate(data)


def certificate_uri(path: Path) -> str | None:
    """The application URI a certificate names (its SAN URI), which the server must announce."""
    try:
        san = load_x509(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def trusted_certificates(folder: Path | None) -> set[bytes]:
    """DER bytes of every client certificate (.der, .pem, .crt) in ``folder``."""
    if folder is None:
        return set()
    found = set()
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in (".der", ".pem", ".crt"):
            try:
                found.add(load_x509(path).public_bytes(Encoding.DER))
            except ValueError as err:
                raise SinkError(f"trust={folder}: {path.name} is not a certificate ({err})") from err
    if not found:
        raise SinkError(f"trust={folder}: no client certificate (.der, .pem, .crt) in it")
    return found


def der_of(certificate: Any) -> bytes:
    return certificate if isinstance(certificate, bytes) else certificate.public_bytes(Encoding.DER)


class StationUsers(UserManager):
    """Who may log in: with security on, a username/password from the credentials, or a user
    certificate from the trust folder; anonymous only when the server runs without security."""

    def __init__(self, secure: bool, credentials: Credentials | None, trusted: set[bytes]) -> None:
        self.secure, self.credentials, self.trusted = secure, credentials, trusted

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        # The identity token type was checked before (no anonymous token with security on), so
        # without a username the certificate is a verified X509 user token's.
        if username is not None:
            c = self.credentials
            ok = c is not None and hmac.compare_digest(username.encode(), c.username.encode()) and \
                hmac.compare_digest((password or "").encode(), c.password.encode())
        elif not self.secure:
            ok = True
        else:
            ok = certificate is not None and der_of(certificate) in self.trusted
        return User(role=UserRole.User, name=username) if ok else None


def identity_tokens(secure: bool, credentials: Credentials | None, trusted: set[bytes]) -> list[type]:
    if not secure:
        return [ua.AnonymousIdentityToken]
    tokens: list[type] = []
    if credentials:
        tokens.append(ua.UserNameIdentityToken)
    if trusted:
        tokens.append(ua.X509IdentityToken)
    return tokens


def channel_validator(trusted: set[bytes]):
    """With a trust folder, only its client certificates may open a secure channel."""
    async def validate(certificate: x509.Certificate, app_description: Any) -> None:
        if der_of(certificate) not in trusted:
            raise ua.uaerrors.BadCertificateUntrusted()
    return validate
