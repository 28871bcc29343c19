"""Signed bundles: an ed25519 signature over ``manifest.json``, written as ``manifest.sig``.

``manifest.json`` holds the sha256 and size of every other file of a bundle, so signing its
exact bytes signs the whole bundle: a changed byte in any file changes its sha256 (a problem
against the manifest), and a changed manifest no longer matches the signature.
``manifest.sig`` is JSON: the algorithm, the manifest's sha256, the signer's public-key
fingerprint (``sha256:`` + hex of the raw 32-byte key), the signature (base64) and, when the
export wrote an audit event, the signed head of the study's audit log (see ``_audit``).

Keys are a local pair made by ``voxfit keygen``: ``signing.key`` (PKCS#8 PEM, mode 0600) and
``signing.pub`` (SubjectPublicKeyInfo PEM), readable by ``openssl pkey``.

Why ed25519 with ``cryptography`` rather than OpenSSF ``model-signing`` (inspected: 1.1.1,
``pip download --no-deps`` and its metadata/source): model-signing requires ``sigstore>=4``
unconditionally (which pulls ``cryptography>=47``, pydantic, requests, tuf, rfc3161-client,
pyjwt, id, sigstore-models, sigstore-rekor-types), plus blake3, in-toto-attestation, click and
asn1crypto, and its ``signing`` module imports the sigstore signer even for local keys. Its
default flow is keyless Sigstore signing (an OIDC login, Fulcio certificates, the Rekor
transparency log): online services a device team's or a CI machine's offline build cannot
reach. Its local-key mode takes only EC P-256/384/521 keys. What voxfit needs is smaller: a
key pair a team keeps offline and a signature over one file that already hashes every other
one; ``cryptography`` (one wheel, ~16 MB installed, with cffi) gives that in ~100 lines, and
its ed25519 signatures are deterministic (no nonce to get wrong) and 64 bytes. A bundle is
still plain files, so it can be re-signed with model-signing later if a team adopts Sigstore.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from voxfit._config import read_user_text
from voxfit.errors import ConfigError

log = logging.getLogger(__name__)
SIGNATURE = "manifest.sig"
SIGNED = "manifest.json"
PRIVATE_KEY = "signing.key"
PUBLIC_KEY = "signing.pub"
SIGNATURE_SCHEMA_VERSION = 1
_MAX_KEY_BYTES = 16 * 1024  # a PEM ed25519 key is ~120 bytes


def keygen(out_dir: str | Path) -> tuple[Path, Path]:
    """Write a new key pair: ``out_dir/signing.key`` (mode 0600) and ``signing.pub``.

    Raises:
        ConfigError: either file exists already (a key is never overwritten).
    """
    out = Path(out_dir)
    key, pub = out / PRIVATE_KEY, out / PUBLIC_KEY
    for p in (key, pub):
        if p.exists():
            raise ConfigError(f"{p}: exists; a key is never overwritten (choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    _write_new(
        key,
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    _write_new(
        pub,
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        0o644,
    )
    return key, pub


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{path}: exists; a key is never overwritten") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the mode asked for, whatever the umask


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The ed25519 private key in PEM at ``path``.

    Raises:
        ConfigError: missing, empty, binary or not an (unencrypted) ed25519 private key;
            one line naming the file.
    """
    p, text = read_user_text(path, max_bytes=_MAX_KEY_BYTES)
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except TypeError:
        raise ConfigError(f"{p}: the key is encrypted; voxfit keygen keys are not") from None
    except (ValueError, UnsupportedAlgorithm):
        hint = " (it is a public key)" if "PUBLIC KEY" in text else ""
        raise ConfigError(
            f"{p}: not a PEM private key{hint}; make one with voxfit keygen"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{p}: a {type(key).__name__}, not an ed25519 key (voxfit keygen)")
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o); chmod 600 it", p, mode)
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The ed25519 public key in PEM at ``path`` (``signing.pub``).

    Raises:
        ConfigError: missing, empty, binary, a private key, or not an ed25519 public key.
    """
    p, text = read_user_text(path, max_bytes=_MAX_KEY_BYTES)
    if "PRIVATE KEY" in text:
        raise ConfigError(f"{p}: a private key; verify takes the public one ({PUBLIC_KEY})")
    try:
        key = serialization.load_pem_public_key(text.encode())
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{p}: not a PEM public key; make a pair with voxfit keygen") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{p}: a {type(key).__name__}, not an ed25519 key (voxfit keygen)")
    return key


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """``sha256:<hex>`` of the raw 32-byte public key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _head_payload(head: dict[str, Any], manifest_sha256: str) -> bytes:
    body = {k: head[k] for k in ("study", "seq", "hash")} | {"manifest_sha256": manifest_sha256}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


_TOP = ("schema_version", "algorithm", "signed_file", "manifest_sha256", "key_fingerprint")
_HEAD = ("study", "seq", "hash", "signature")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _render(sig: dict[str, Any]) -> str:
    """The one text of ``manifest.sig`` for these values (fixed key order, canonical
    base64), so that verification can require the file to be exactly it: then no byte of
    the signature file can change unnoticed either."""
    out = {k: sig[k] for k in _TOP}
    out["signature"] = _b64(base64.b64decode(sig["signature"], validate=True))
    if "audit_head" in sig:
        h = sig["audit_head"]
        out["audit_head"] = {k: h[k] for k in _HEAD[:3]} | {
            "signature": _b64(base64.b64decode(h["signature"], validate=True))
        }
    return json.dumps(out, indent=2, ensure_ascii=False) + "\n"


def sign_bundle(
    bundle: str | Path, key: Ed25519PrivateKey, *, audit_head: dict[str, Any] | None = None
) -> Path:
    """Sign the bundle's ``manifest.json`` (exact bytes) into ``manifest.sig``.

    ``audit_head``: ``{"study", "seq", "hash"}`` of the study's audit log entry for this
    export; signed too (with the manifest's sha256), so the log cannot later be rewritten
    up to that entry without the bundle showing it.
    """
    b = Path(bundle)
    data = (b / SIGNED).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    sig: dict[str, Any] = {
        "schema_version": SIGNATURE_SCHEMA_VERSION,
        "algorithm": "ed25519",
        "signed_file": SIGNED,
        "manifest_sha256": digest,
        "key_fingerprint": fingerprint(key),
        "signature": _b64(key.sign(data)),
    }
    if audit_head is not None:
        head = {k: audit_head[k] for k in ("study", "seq", "hash")}
        sig["audit_head"] = head | {"signature": _b64(key.sign(_head_payload(head, digest)))}
    out = b / SIGNATURE
    out.write_text(_render(sig))
    return out


def read_signature(bundle: str | Path) -> dict[str, Any] | None:
    """``manifest.sig`` parsed (None when the bundle has none).

    Raises:
        ConfigError: it is not exactly what :func:`sign_bundle` writes (fields, their
            order, formatting): one line naming the file.
    """
    p = Path(bundle) / SIGNATURE
    if not p.exists():
        return None
    _, text = read_user_text(p, max_bytes=_MAX_KEY_BYTES)
    try:
        sig = json.loads(text)
        if not isinstance(sig, dict):
            raise TypeError("not an object")
        if set(sig) - {*_TOP, "signature", "audit_head"}:
            raise KeyError(f"unknown fields {sorted(set(sig) - {*_TOP, 'audit_head'})}")
        rendered = _render(sig)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ConfigError(f"{p}: unreadable ({type(e).__name__}: {str(e)[:100]})") from None
    if rendered != text:
        raise ConfigError(f"{p}: not as voxfit wrote it (edited)")
    return sig


def signature_problems(bundle: str | Path, public_key: str | Path) -> list[str]:
    """Why the bundle is not signed by ``public_key`` (empty when its ``manifest.sig`` is
    exactly a valid ed25519 signature of ``manifest.json`` by that key). The other files
    are checked against the manifest by ``check_bundle``; together they cover every byte.

    Raises:
        ConfigError: the key file is bad (one line naming it).
    """
    b = Path(bundle)
    pub = load_public_key(public_key)
    want = fingerprint(pub)
    try:
        sig = read_signature(b)
    except ConfigError as e:
        return [str(e)]
    if sig is None:
        return [f"{SIGNATURE}: missing (the bundle is unsigned)"]
    if sig["key_fingerprint"] != want:
        return [
            f"{SIGNATURE}: signed by another key ({str(sig['key_fingerprint'])[:23]}…), "
            f"not {public_key} ({want[:23]}…)"
        ]
    if (sig["schema_version"], sig["algorithm"], sig["signed_file"]) != (
        SIGNATURE_SCHEMA_VERSION,
        "ed25519",
        SIGNED,
    ):
        return [f"{SIGNATURE}: not an ed25519 signature of {SIGNED} (schema 1)"]
    try:
        data = (b / SIGNED).read_bytes()
    except OSError:
        return []  # the manifest's own problem is reported by the file check
    digest = hashlib.sha256(data).hexdigest()
    if digest != sig["manifest_sha256"]:
        return [f"{SIGNED}: changed since it was signed"]
    try:
        pub.verify(base64.b64decode(sig["signature"]), data)
    except InvalidSignature:
        return [f"{SIGNATURE}: the signature is not valid for {SIGNED} under {public_key}"]
    head = sig.get("audit_head")
    if head is not None:
        try:
            pub.verify(base64.b64decode(head["signature"]), _head_payload(head, digest))
        except (InvalidSignature, KeyError, TypeError):
            return [f"{SIGNATURE}: the audit head's signature is not valid"]
    return []


def describe_signature(bundle: str | Path) -> str:
    """One line for ``voxfit verify`` without ``--key``: what is there, not checked."""
    try:
        sig = read_signature(bundle)
    except ConfigError as e:
        return f"signature not checked (no --key), and {e}"
    if sig is None:
        return "signature not checked (no --key); the bundle is unsigned"
    return f"signature not checked (no --key); {SIGNATURE} names key {sig['key_fingerprint']}"
