"""``voxfit keygen`` and ``voxfit audit ...``: the key pair that signs bundles, and the
study's tamper-evident log of what was done with users' voice data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from voxfit.cli._common import app, console
from voxfit.errors import ConfigError

audit_app = typer.Typer(
    no_args_is_help=True,
    help="Check or show a study's hash-chained log of what was done with users' data.",
)
app.add_typer(audit_app, name="audit")

AuditStudy = Annotated[str, typer.Option("--study", help="Study name (its log's file name).")]
Work = Annotated[Path, typer.Option(help="Work folder; the log is WORK/audit/<study>.jsonl.")]


@app.command("keygen")
def keygen_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for signing.key and signing.pub.")],
) -> None:
    """Make an ed25519 key pair for `voxfit export --sign-key` / `voxfit verify --key`."""
    from voxfit.search import fingerprint, keygen, load_public_key

    key, pub = keygen(out)
    console.print(f"private key {key} (mode 0600; keep it secret, never put it in a bundle)")
    console.print(
        f"public key {pub} ({fingerprint(load_public_key(pub))})", highlight=False, soft_wrap=True
    )


@audit_app.command("verify")
def audit_verify(
    study: AuditStudy,
    work: Work = Path("work"),
    bundle: Annotated[
        list[Path] | None,
        typer.Option(help="A signed bundle whose signed log head must be in the log."),
    ] = None,
    key: Annotated[
        Path | None, typer.Option("--key", help="Public key that signed --bundle.")
    ] = None,
) -> None:
    """Recompute the log's hash chain; the first broken entry (edited, deleted, moved) is
    named in one line and the exit code is 2."""
    from voxfit.search import audit_path, check_head, read_signature, signature_problems

    path = audit_path(work, study)
    check = _verified(path)
    for b in bundle or []:
        if key is None:
            raise ConfigError("--bundle needs --key: the log head in it is trusted once signed")
        problems = signature_problems(b, key)
        if problems:
            raise ConfigError(f"{b}: " + "; ".join(problems))
        head = (read_signature(b) or {}).get("audit_head")
        if head is None:
            raise ConfigError(f"{b}: its signature carries no audit log head")
        if head["study"] != study:
            raise ConfigError(f"{b}: signed a head of study {head['study']!r}, not {study!r}")
        why = check_head(path, head["seq"], head["hash"])
        if why:
            raise ConfigError(f"{b}: {why}")
        console.print(
            f"{b}: signed head seq {head['seq']} is in the log", highlight=False, soft_wrap=True
        )
    console.print(
        f"{path}: {check.entries} entries, chain intact, head {(check.head or '')[:16]}",
        highlight=False,
        soft_wrap=True,
    )


def _verified(path: Path):  # type: ignore[no-untyped-def]
    from voxfit.search import verify_log

    check = verify_log(path)
    if check.problem:
        raise ConfigError(check.problem)
    return check


@audit_app.command("show")
def audit_show(
    study: AuditStudy,
    work: Work = Path("work"),
    last: Annotated[int | None, typer.Option(min=1, help="Only the last N entries.")] = None,
    raw: Annotated[bool, typer.Option("--json", help="The entries as JSON lines.")] = False,
) -> None:
    """The log's entries (seq, time, event, what it touched), then whether the chain holds."""
    from voxfit.search import AuditLog, audit_path, verify_log

    log = AuditLog(audit_path(work, study), study)
    check = verify_log(log.path)  # raises (one line) when there is no log
    entries = list(log.entries())
    shown = entries[-last:] if last else entries
    if raw:
        for e in shown:
            print(json.dumps(e, ensure_ascii=False))
        return
    t = Table(title=f"audit log of {study} ({log.path})")
    for col in ("seq", "time", "event", "what"):
        t.add_column(col, justify="right" if col == "seq" else "left")
    for e in shown:
        t.add_row(str(e.get("seq")), str(e.get("time")), str(e.get("event")), _summary(e))
    console.print(t)
    if check.problem:
        console.print(f"[bold red]broken:[/] {escape(check.problem)}", highlight=False)
    else:
        console.print(f"chain intact: {check.entries} entries", highlight=False)


def _summary(e: dict) -> str:  # type: ignore[type-arg]
    d = e.get("data")
    if not isinstance(d, dict):
        return ""
    parts = []
    if "trial" in d:
        parts.append(f"trial {d['trial']}")
    if d.get("plan_hash"):
        parts.append(f"plan {str(d['plan_hash'])[:12]}")
    if "speakers" in d:
        parts.append("speakers " + ",".join(map(str, d["speakers"])))
    if isinstance(d.get("adaptation_data"), dict):
        spk = d["adaptation_data"].get("speakers", [])
        parts.append("proxy speakers " + ",".join(map(str, spk)))
    if d.get("manifest_sha256"):
        parts.append(f"manifest {str(d['manifest_sha256'])[:12]}")
    if d.get("signed_by"):
        parts.append(f"signed {str(d['signed_by'])[:19]}")
    if d.get("voxfit"):
        parts.append(f"voxfit {d['voxfit']}")
    if d.get("failure"):
        parts.append(str(d["failure"])[:80])
    return escape("; ".join(parts))
