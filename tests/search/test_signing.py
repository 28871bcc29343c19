"""Signed bundles: keygen, ``export --sign-key``'s signature, ``verify --key`` on intact,
changed, re-keyed and unsigned bundles, and bad key files (one line naming the file)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests._cli import run_voxfit as _voxfit
from voxfit.errors import ConfigError
from voxfit.search import (
    fingerprint,
    keygen,
    load_private_key,
    load_public_key,
    read_signature,
    sign_bundle,
    verify_bundle,
    write_manifest,
)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return keygen(tmp_path / "keys")


@pytest.fixture
def bundle(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    b = tmp_path / "trial-3"
    (b / "tvm").mkdir(parents=True)
    (b / "plan.yaml").write_text("schema_version: 1\n")
    (b / "tvm" / "lib.so").write_bytes(bytes(range(256)))
    (b / "report.json").write_text(json.dumps({"trial": 3}) + "\n")
    write_manifest(b)
    sign_bundle(b, load_private_key(keys[0]), audit_head={"study": "s", "seq": 4, "hash": "ab"})
    return b


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(
    tmp_path: Path,
) -> None:
    key, pub = keygen(tmp_path / "k")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert fingerprint(load_private_key(key)) == fingerprint(load_public_key(pub))
    before = key.read_bytes()
    with pytest.raises(ConfigError, match="signing.key: exists"):
        keygen(tmp_path / "k")
    assert key.read_bytes() == before
    pub.unlink()  # a lone public key file is not overwritten either
    (tmp_path / "k2").mkdir()
    (tmp_path / "k2" / "signing.pub").write_text("mine\n")
    with pytest.raises(ConfigError, match="signing.pub: exists"):
        keygen(tmp_path / "k2")
    assert not (tmp_path / "k2" / "signing.key").exists()


def test_keygen_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = _voxfit(["keygen", "--out", str(tmp_path / "keys")], capsys, monkeypatch)
    assert code == 0
    assert "sha256:" in out
    code, _, err = _voxfit(["keygen", "--out", str(tmp_path / "keys")], capsys, monkeypatch)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "signing.key: exists" in err


def test_a_signed_bundle_verifies_with_its_key(bundle: Path, keys: tuple[Path, Path]) -> None:
    assert verify_bundle(bundle, key=keys[1]) == []
    sig = read_signature(bundle)
    assert sig is not None
    assert sig["key_fingerprint"] == fingerprint(load_public_key(keys[1]))
    assert sig["audit_head"]["seq"] == 4
    # manifest.sig is not itself in the manifest, and the manifest lists every other file
    listed = json.loads((bundle / "manifest.json").read_text())["files"]
    assert set(listed) == {"plan.yaml", "tvm/lib.so", "report.json"}


def test_one_changed_byte_anywhere_in_the_bundle_fails(
    bundle: Path, keys: tuple[Path, Path]
) -> None:
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"manifest.json", "manifest.sig", "lib.so"}
    tried = 0
    for f in files:
        data = f.read_bytes()
        for i in range(len(data)):
            changed = bytearray(data)
            changed[i] ^= 0x01
            f.write_bytes(bytes(changed))
            problems = verify_bundle(bundle, key=keys[1], run_models=False)
            assert problems, f"{f.name} byte {i} changed, not caught"
            tried += 1
        f.write_bytes(data)
    assert tried > 1000
    assert verify_bundle(bundle, key=keys[1]) == []


def test_a_missing_or_an_added_file_fails(bundle: Path, keys: tuple[Path, Path]) -> None:
    (bundle / "extra.txt").write_text("x")
    assert "extra.txt: not listed in manifest.json" in verify_bundle(bundle, key=keys[1])
    (bundle / "extra.txt").unlink()
    (bundle / "plan.yaml").unlink()
    assert "plan.yaml: missing" in verify_bundle(bundle, key=keys[1])


def test_a_signature_by_another_key_fails(
    bundle: Path, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    _, other_pub = keygen(tmp_path / "other")
    (problem,) = verify_bundle(bundle, key=other_pub)
    assert "signed by another key" in problem
    # re-signed by the other key after a change: the owner's key refuses it
    other_key = load_private_key(tmp_path / "other" / "signing.key")
    (bundle / "plan.yaml").write_text("schema_version: 1\n# changed\n")
    write_manifest(bundle)
    sign_bundle(bundle, other_key)
    assert verify_bundle(bundle, key=other_pub) == []
    (problem,) = verify_bundle(bundle, key=keys[1])
    assert "signed by another key" in problem


def test_a_missing_signature_fails_with_key_and_is_named_without(
    bundle: Path,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, _ = _voxfit(["verify", str(bundle), "--key", str(keys[1])], capsys, monkeypatch)
    assert code == 0, out
    assert "signed by" in out
    (bundle / "manifest.sig").unlink()
    assert verify_bundle(bundle, key=keys[1]) == ["manifest.sig: missing (the bundle is unsigned)"]
    code, _, err = _voxfit(["verify", str(bundle), "--key", str(keys[1])], capsys, monkeypatch)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "unsigned" in err
    # without --key the sha256 check still runs and says the signature was not checked
    code, out, _ = _voxfit(["verify", str(bundle)], capsys, monkeypatch)
    assert code == 0
    assert "signature not checked" in " ".join(out.split())
    (bundle / "plan.yaml").write_text("changed\n")
    code, _, err = _voxfit(["verify", str(bundle)], capsys, monkeypatch)
    assert code == 2
    assert "plan.yaml: sha256 differs" in err


def _rsa_free_foreign_keys(d: Path) -> tuple[Path, Path]:
    """An EC P-256 pair in PEM: valid keys, not ed25519."""
    k = ec.generate_private_key(ec.SECP256R1())
    priv, pub = d / "ec.key", d / "ec.pub"
    priv.write_bytes(
        k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub.write_bytes(
        k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"", "empty"),
        (b"\x00\x01\x02binary", "binary"),
        (b"\xff\xfe\xfd not utf-8", "UTF-8"),
        (b"hello, not a key\n", "not a PEM"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM"),
    ],
)
def test_a_bad_key_file_is_one_line_naming_it(
    tmp_path: Path,
    bundle: Path,
    content: bytes,
    expect: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(content)
    for load in (load_private_key, load_public_key):
        with pytest.raises(ConfigError, match=expect) as e:
            load(bad)
        assert str(bad) in str(e.value)
        assert "\n" not in str(e.value)
    code, _, err = _voxfit(["verify", str(bundle), "--key", str(bad)], capsys, monkeypatch)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "bad.key" in err


def test_keys_of_the_wrong_kind_are_named(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="a private key; verify takes the public one"):
        load_public_key(keys[0])
    with pytest.raises(ConfigError, match="it is a public key"):
        load_private_key(keys[1])
    priv, pub = _rsa_free_foreign_keys(tmp_path)
    with pytest.raises(ConfigError, match="not an ed25519 key"):
        load_private_key(priv)
    with pytest.raises(ConfigError, match="not an ed25519 key"):
        load_public_key(pub)
    (tmp_path / "missing.pub").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="missing.pub: cannot read"):
        load_public_key(tmp_path / "missing.pub")


def test_export_refuses_a_bad_sign_key_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "empty.key"
    bad.write_text("")
    code, _, err = _voxfit(
        ["export", "--storage", f"sqlite:///{tmp_path}/none.db", "--study", "x", "--trial", "0",
         "--sign-key", str(bad)],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 2
    assert "empty.key" in err
