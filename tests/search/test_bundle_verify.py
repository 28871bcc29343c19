"""``verify_bundle`` on intact, changed and damaged bundles: problems, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from voxfit.search import verify_bundle, write_manifest


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    b = tmp_path / "trial-3"
    (b / "tvm").mkdir(parents=True)
    (b / "plan.yaml").write_text("schema_version: 1\n")
    (b / "tvm" / "lib.so").write_bytes(bytes(range(256)))
    write_manifest(b)
    return b


def test_an_intact_bundle_has_no_problems(bundle: Path) -> None:
    assert verify_bundle(bundle) == []


def test_a_changed_byte_a_missing_and_an_unlisted_file_are_each_named(bundle: Path) -> None:
    lib = bundle / "tvm" / "lib.so"
    data = bytearray(lib.read_bytes())
    data[100] ^= 1
    lib.write_bytes(bytes(data))
    (bundle / "plan.yaml").unlink()
    (bundle / "extra.txt").write_text("x")
    problems = verify_bundle(bundle)
    assert "tvm/lib.so: sha256 differs from manifest.json" in problems
    assert "plan.yaml: missing" in problems
    assert "extra.txt: not listed in manifest.json" in problems


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"\xff\xfe not utf-8", "UTF-8"),
        (b"", "empty"),
        (b'{"files": ["plan.yaml"]}', "not a mapping"),
        (b'{"files": {"plan.yaml": "abc"}}', "not a mapping"),
        (b'{"schema_version": 1', "unreadable"),
        (b'{"other": 1}', "unreadable"),
        (b"[" * 100_000, "unreadable"),
    ],
)
def test_a_damaged_manifest_is_one_problem_naming_it(
    bundle: Path, content: bytes, expect: str
) -> None:
    (bundle / "manifest.json").write_bytes(content)
    (problem,) = verify_bundle(bundle)
    assert "manifest.json" in problem
    assert expect in problem
    assert "\n" not in problem


def test_a_manifest_cannot_point_outside_the_bundle(bundle: Path) -> None:
    (bundle.parent / "secret").write_text("x")
    (bundle / "manifest.json").write_text('{"files": {"../secret": {"sha256": "0"}}}')
    assert "../secret: outside the bundle" in verify_bundle(bundle)
