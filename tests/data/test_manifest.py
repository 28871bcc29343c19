from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from voxfit.data import Utterance, load_manifest, write_manifest
from voxfit.errors import DataError


def _row(wav: Path, **over: object) -> str:
    row = {
        "path": str(wav),
        "speaker": "a",
        "split": "train",
        "phones": "h @ l oU",
        "text": "hello",
        "duration_s": 0.5,
    }
    row.update(over)
    return json.dumps(row)


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "manifest.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_loads_valid_manifest_with_relative_paths(tmp_path: Path, wav_file: Path) -> None:
    p = _write(
        tmp_path,
        [
            _row(Path(wav_file.name)),
            _row(wav_file, speaker="b", split="adapt"),
            _row(wav_file, speaker="b", split="eval"),
        ],
    )
    m = load_manifest(p)
    assert len(m.utterances) == 3
    assert m.utterances[0].path == str(tmp_path / wav_file.name)
    assert m.utterances[0].phones == ("h", "@", "l", "oU")
    assert m.speakers("adapt") == ["b"]
    assert list(m.by_speaker("eval")) == ["b"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"path": "x.wav"}), "missing key(s) speaker, split, phones"),
        (None, "unknown split 'test'"),
        (None, "audio file not found"),
        (None, "unknown key(s) extra"),
        (None, "'phones' must be a non-empty"),
        (None, "'duration_s' is not a number"),
        (None, "'duration_s' must be a finite number, got nan"),
        (None, "'duration_s' must be <= 3600, got 1e+300"),
        ('{"path": "x.wav", "speaker": [[[[' + "[" * 5000, "not valid JSON"),
    ],
)
def test_broken_line_names_file_and_line(
    tmp_path: Path, wav_file: Path, line: str | None, message: str
) -> None:
    if line is None:
        line = {
            "unknown split 'test'": _row(wav_file, split="test"),
            "audio file not found": _row(tmp_path / "missing.wav"),
            "unknown key(s) extra": _row(wav_file, extra=1),
            "'phones' must be a non-empty": _row(wav_file, phones="  "),
            "'duration_s' is not a number": _row(wav_file, duration_s="long"),
            "'duration_s' must be a finite number, got nan": _row(
                wav_file, duration_s=float("nan")
            ),
            "'duration_s' must be <= 3600, got 1e+300": _row(wav_file, duration_s=1e300),
        }[message]
    p = _write(tmp_path, [_row(wav_file), line])
    with pytest.raises(DataError) as e:
        load_manifest(p)
    assert str(e.value).startswith(f"{p}:2: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_speaker_in_training_and_heldout_splits_is_rejected(
    tmp_path: Path, wav_file: Path
) -> None:
    p = _write(tmp_path, [_row(wav_file), _row(wav_file, split="eval")])
    with pytest.raises(
        DataError, match=r":2: speaker 'a' is held-out here but training on line 1"
    ):
        load_manifest(p)


def test_manifest_without_training_data_is_rejected(tmp_path: Path, wav_file: Path) -> None:
    p = _write(tmp_path, [_row(wav_file, split="dev")])
    with pytest.raises(DataError, match="no utterance has split 'train'"):
        load_manifest(p)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", ": the file is empty"),
        (b"\x00\x01\x02" * 100, ":1: a binary file"),
        ('{"path": "caf\u00e9"}\n'.encode("latin-1"), ":1: not UTF-8 text"),
    ],
)
def test_unreadable_file_is_named(tmp_path: Path, data: bytes, message: str) -> None:
    p = tmp_path / "manifest.jsonl"
    p.write_bytes(data)
    with pytest.raises(DataError) as e:
        load_manifest(p)
    assert str(e.value).startswith(f"{p}{message}")


def test_write_then_load_round_trips(tmp_path: Path, wav_file: Path) -> None:
    utts = [
        Utterance(str(wav_file), "s1", "train", ("a", "b"), "ab", 0.5),
        Utterance(str(wav_file), "s2", "adapt", ("c",), "c", 0.25),
    ]
    p = tmp_path / "m.jsonl"
    write_manifest(p, utts)
    assert json.loads(p.read_text().splitlines()[0])["path"] == wav_file.name  # stored relative
    assert load_manifest(p).utterances == tuple(utts)


def test_cli_reports_a_broken_manifest_in_one_line(tmp_path: Path, wav_file: Path) -> None:
    p = _write(tmp_path, [_row(wav_file), _row(tmp_path / "gone.wav")])
    exe = shutil.which("voxfit") or str(Path(sys.executable).parent / "voxfit")
    res = subprocess.run(
        [exe, "train", "--manifest", str(p), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert f"{p}:2: audio file not found" in lines[0]
    assert "Traceback" not in res.stderr
