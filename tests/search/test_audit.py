"""The audit log: a hash chain that concurrent appenders extend without losing an entry,
and in which an edited, deleted or moved line is named at its seq."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from tests._cli import run_voxfit as _voxfit
from voxfit.errors import ConfigError, VoxfitError
from voxfit.plan import Candidate
from voxfit.search import (
    AccuracyRecord,
    AuditLog,
    TrialRecord,
    audit_path,
    check_head,
    verify_log,
)
from voxfit.search._audit import GENESIS, entry_hash

STUDY = "cpu-tiny"


def _fill(work: Path, n: int) -> AuditLog:
    log = AuditLog.of_study(work, STUDY)
    for i in range(n):
        log.append("trial_completed", {"trial": i, "plan_hash": f"p{i}", "speakers": ["s1"]})
    return log


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines(keepends=True)


def test_entries_chain_from_genesis(tmp_path: Path) -> None:
    log = _fill(tmp_path, 5)
    assert log.path == tmp_path / "audit" / f"{STUDY}.jsonl"
    entries = list(log.entries())
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev_hash"] == GENESIS
    for a, b in zip(entries, entries[1:], strict=False):
        assert b["prev_hash"] == a["hash"]
    assert all(entry_hash(e) == e["hash"] for e in entries)
    check = verify_log(log.path)
    assert check.ok
    assert (check.entries, check.head) == (5, entries[-1]["hash"])


def test_study_names_become_safe_distinct_file_names(tmp_path: Path) -> None:
    a, b = audit_path(tmp_path, "a/b"), audit_path(tmp_path, "a_b")
    assert a != b
    assert a.parent == b.parent == tmp_path / "audit"
    assert "/" not in a.name


def _append_many(path: str, who: str, n: int, start: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    log = AuditLog(path, STUDY)
    for i in range(n):
        log.append("trial_completed", {"trial": i, "worker": who})


def test_two_processes_appending_at_once_lose_nothing(tmp_path: Path) -> None:
    path = str(audit_path(tmp_path, STUDY))
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_append_many, args=(path, w, 150, start)) for w in "ab"]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    check = verify_log(path)
    assert check.ok, check.problem
    assert check.entries == 300
    got = [(e["data"]["worker"], e["data"]["trial"]) for e in AuditLog(path, STUDY).entries()]
    assert sorted(got) == sorted((w, i) for w in "ab" for i in range(150))


def _edit(line: str) -> str:
    e = json.loads(line)
    e["data"]["speakers"] = ["someone-else"]
    return json.dumps(e) + "\n"


@pytest.mark.parametrize(
    ("damage", "line", "why"),
    [
        (lambda ls: ls[:3] + [_edit(ls[3])] + ls[4:], 4, "edited"),
        (lambda ls: ls[:3] + ls[4:], 4, "deleted, inserted or moved"),
        (lambda ls: ls[:2] + [ls[3], ls[2]] + ls[4:], 3, "deleted, inserted or moved"),
        (lambda ls: ls[:5] + [ls[5][:40]], 6, "not JSON"),
        (lambda ls: ls[:2] + ["[1, 2]\n"] + ls[2:], 3, "not an audit entry"),
        (lambda ls: ls[1:], 1, "deleted, inserted or moved"),
    ],
    ids=["edited", "deleted", "reordered", "torn-tail", "inserted", "first-deleted"],
)
def test_a_broken_link_is_named_at_its_line(
    tmp_path: Path, damage: object, line: int, why: str
) -> None:
    log = _fill(tmp_path, 6)
    log.path.write_text("".join(damage(_lines(log))))  # type: ignore[operator]
    check = verify_log(log.path)
    assert not check.ok
    assert check.entries == line - 1
    assert f"line {line} (seq {line} expected)" in (check.problem or "")
    assert why in (check.problem or "")
    assert "\n" not in (check.problem or "")


def test_a_replaced_entry_with_a_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    log = _fill(tmp_path, 4)
    ls = _lines(log)
    e = json.loads(ls[1])
    e["data"]["speakers"] = ["someone-else"]
    e["hash"] = entry_hash(e)
    ls[1] = json.dumps(e) + "\n"
    log.path.write_text("".join(ls))
    check = verify_log(log.path)
    assert "line 3 (seq 3 expected): prev_hash" in (check.problem or "")


def test_a_rewritten_or_truncated_log_misses_its_signed_head(tmp_path: Path) -> None:
    log = _fill(tmp_path, 4)
    head = list(log.entries())[2]
    assert check_head(log.path, 3, head["hash"]) is None
    # rewrite the whole chain from seq 2 on: the chain holds, the signed head does not
    ls = _lines(log)
    prev = json.loads(ls[0])["hash"]
    for i in range(1, 4):
        e = json.loads(ls[i])
        e["data"]["speakers"], e["prev_hash"] = ["someone-else"], prev
        e["hash"] = prev = entry_hash(e)
        ls[i] = json.dumps(e) + "\n"
    log.path.write_text("".join(ls))
    assert verify_log(log.path).ok
    assert "does not carry the signed hash" in (check_head(log.path, 3, head["hash"]) or "")
    log.path.write_text("".join(ls[:2]))
    assert "truncated" in (check_head(log.path, 3, head["hash"]) or "")


def test_append_refuses_to_extend_a_torn_last_line(tmp_path: Path) -> None:
    log = _fill(tmp_path, 2)
    with log.path.open("a") as f:
        f.write('{"seq": 3, "ti')
    with pytest.raises(VoxfitError, match="last line is not an audit entry"):
        log.append("trial_failed", {"trial": 9})
    with pytest.raises(VoxfitError, match="unknown event"):
        log.append("coffee", {})


def test_search_and_trial_events_record_whose_data_was_used(tmp_path: Path) -> None:
    study = optuna.create_study(study_name=STUDY, directions=["minimize"])
    study.set_user_attr("profile", {"name": "cpu"})
    sets = {"spk3": {"adapt": ["a.wav"], "eval": ["e.wav"]}}
    ctx = SimpleNamespace(
        adaptation_data=lambda: {"speakers": ["spk3"], "sets": sets, "sha256": "d" * 64}
    )
    log = AuditLog.of_study(tmp_path, STUDY)
    created = log.search_started(study, ctx, "postgresql://u:secret@db/voxfit")
    assert created["event"] == "study_created"
    assert created["data"]["storage"] == "postgresql://u:***@db/voxfit"
    assert created["data"]["adaptation_data"]["sets"] == sets
    cand = Candidate()
    for fail in (False, True):
        t = study.ask()
        rec = TrialRecord(
            number=t.number,
            state="COMPLETE",
            plan=cand,
            plan_hash=cand.stable_hash(),
            accuracy=AccuracyRecord(per_speaker={} if fail else {"spk3": (30.0, 20.0)}),
            failure="ValueError: x" if fail else None,
        )
        t.set_user_attr("record", rec.to_attr())
        if fail:
            study.tell(t, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(t, 1.0)
        log.trial_finished(study.trials[-1], ctx)
    ok, failed = list(log.entries())[1:]
    assert ok["event"] == "trial_completed"
    assert ok["data"]["speakers"] == ["spk3"]
    assert ok["data"]["plan_hash"] == cand.stable_hash()
    assert ok["data"]["adaptation_sets_sha256"] == "d" * 64
    assert failed["event"] == "trial_failed"
    assert failed["data"]["failure"] == "ValueError: x"
    assert failed["data"]["speakers"] == ["spk3"]  # may have been used before it failed
    assert log.search_started(study, ctx, "sqlite:///x.db")["event"] == "search_started"
    assert verify_log(log.path).ok


def test_audit_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    args = ["--study", STUDY, "--work", str(work)]
    code, _, err = _voxfit(["audit", "verify", *args], capsys, monkeypatch)
    assert code == 2
    assert "no audit log" in err
    log = _fill(work, 5)
    code, out, _ = _voxfit(["audit", "verify", *args], capsys, monkeypatch)
    assert code == 0
    assert "5 entries, chain intact" in " ".join(out.split())
    code, out, _ = _voxfit(["audit", "show", *args], capsys, monkeypatch)
    assert code == 0
    assert "trial_completed" in out
    assert "chain intact: 5 entries" in out
    code, out, _ = _voxfit(["audit", "show", *args, "--json", "--last", "2"], capsys, monkeypatch)
    assert [json.loads(x)["seq"] for x in out.splitlines()] == [4, 5]
    ls = _lines(log)
    log.path.write_text("".join(ls[:1] + [_edit(ls[1])] + ls[2:]))
    code, _, err = _voxfit(["audit", "verify", *args], capsys, monkeypatch)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "line 2 (seq 2 expected)" in err
    assert "edited" in err
    code, out, _ = _voxfit(["audit", "show", *args], capsys, monkeypatch)
    assert code == 0
    assert "broken:" in out


def test_a_missing_log_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no audit log"):
        verify_log(tmp_path / "none.jsonl")
