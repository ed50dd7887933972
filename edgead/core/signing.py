"""Optional bundle signatures: Ed25519 from ``cryptography`` over the manifest digest.

``edgead export --sign KEY`` writes ``<bundle>/signature.json``; ``edgead-run --trust KEYS``
(a public-key file or a folder of them) refuses a bundle that is unsigned, signed by a key that is
not trusted, or whose manifest changed after signing. The digest covers the manifest, and the
manifest the SHA-256 of every file, so one signature covers every byte of the bundle.

Why not ``model-signing``: its offline key mode pulls sigstore with it (35 wheels, 15 MB here:
sigstore, tuf, pydantic, requests, protobuf 7, rfc3161-client...); a station needs only
``cryptography`` (3 wheels, 5 MB), which ``model-signing`` uses underneath anyway.

Keys are PEM: ``edgead keygen --out NAME`` writes ``NAME.key`` (private, PKCS#8, mode 0600) and
``NAME.pub``; OpenSSL makes the same files::

    openssl genpkey -algorithm ed25519 -out signer.key
    openssl pkey -in signer.key -pubout -out signer.pub
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from edgead.core.manifest import BundleError

SIGNATURE = "signature.json"
ALGORITHM = "Ed25519"
CONTEXT = b"edgead bundle manifest v2\n"  # domain separation: a signature of anything else never verifies
INSTALL = "signing needs the 'cryptography' package: pip install 'edgead[sign]'"


class SignatureError(BundleError):
    """Unsigned, untrusted or broken signature; the message names the bundle and the key."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise SignatureError(INSTALL) from exc
    return serialization, ed25519


def _raw_public(public_key: Any) -> bytes:
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Any) -> str:
    """First 16 hex digits of the SHA-256 of the raw public key: how keys are named in messages."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def load_private_key(path: str | Path) -> Any:
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a readable unencrypted PEM private key ({exc}); make one with "
                             "`edgead keygen --out NAME`") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: an {type(key).__name__}, edgead signs with Ed25519 keys (`edgead keygen`)")
    return key


def load_public_key(path: Path) -> Any:
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{path}: not a PEM public key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path}: an {type(key).__name__}, not an Ed25519 public key")
    return key


def trusted_keys(path: str | Path) -> dict[str, Any]:
    """key id -> public key, from one ``.pub``/``.pem`` file or every such file in a folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".pub", ".pem") and p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise SignatureError(f"--trust {path}: no such key file or folder")
    if not files:
        raise SignatureError(f"--trust {path}: the folder holds no .pub/.pem public key")
    keys = [load_public_key(p) for p in files]
    return {key_id(k): k for k in keys}


def sign_bundle(bundle_dir: str | Path, key_path: str | Path) -> Path:
    """Sign the (already written) manifest digest of a bundle; returns the signature file."""
    root = Path(bundle_dir)
    digest = json.loads((root / "manifest.json").read_text())["digest"]
    key = load_private_key(key_path)
    signature = key.sign(CONTEXT + digest.encode())
    record = {"algorithm": ALGORITHM, "key_id": key_id(key.public_key()),
              "public_key": base64.b64encode(_raw_public(key.public_key())).decode(),
              "manifest_digest": digest, "signature": base64.b64encode(signature).decode()}
    out = root / SIGNATURE
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out


def verify_signature(root: Path, digest: str, trusted: dict[str, Any]) -> str:
    """The signing key's id, if ``root``'s signature is valid and made by a trusted key."""
    path = root / SIGNATURE
    names = ", ".join(sorted(trusted)) or "none"
    if not path.is_file():
        raise SignatureError(f"{root}: the bundle is unsigned, but --trust demands a signature by {names}; "
                             "export it with `edgead export ... --sign KEY`")
    try:
        record = json.loads(path.read_text())
        signer, signature = str(record["key_id"]), base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{path}: unreadable signature ({exc}); re-sign the bundle") from exc
    if signer not in trusted:
        raise SignatureError(f"{root}: signed by key {signer}, which is not trusted (trusted: {names})")
    from cryptography.exceptions import InvalidSignature

    try:
        trusted[signer].verify(signature, CONTEXT + digest.encode())
    except InvalidSignature as exc:
        raise SignatureError(f"{path}: the signature by {signer} does not match the manifest: the bundle changed "
                             "after it was signed; re-export and sign it") from exc
    return signer


def keygen(out: str | Path) -> tuple[Path, Path]:
    """Write ``<out>.key`` (private, 0600, never overwritten) and ``<out>.pub``."""
    serialization, ed25519 = _crypto()
    private, public = Path(f"{out}.key"), Path(f"{out}.pub")
    for path in (private, public):
        if path.exists():
            raise SignatureError(f"{path} exists; keys are never overwritten: choose another --out")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def keygen_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgead keygen", description="Make an Ed25519 key pair to sign bundles.")
    parser.add_argument("--out", required=True, help="writes OUT.key (keep it secret) and OUT.pub (give it to stations)")
    args = parser.parse_args(argv)
    try:
        private, public = keygen(args.out)
    except (SignatureError, OSError) as exc:
        print(f"edgead keygen: error: {exc}", file=sys.stderr)
        return 2
    print(f"private key: {private} (sign with `edgead export RUN --sign {private} ...`)")
    print(f"public key:  {public} (stations: `edgead-run --trust {public} ...`, or a folder of .pub files)")
    return 0
