"""Where the service keeps its state, all under ``<work>/service/``, and its two secrets.

```
<work>/service/token          bearer token of the API (made at first start, mode 0600)
<work>/service/signing.key    ed25519 key that signs every job's bundles (0600)
<work>/service/signing.pub    its public key (GET /key)
<work>/service/jobs.db        the job store (SQLite)
<work>/service/studies.db     the Optuna storage of the jobs' studies (default; --storage)
<work>/service/url            the API's address while it runs (``--port 0`` picks one)
<work>/service/jobs/<id>/     front.json, report.html, bundles/trial-<n>/, archives
<work>/service/runners/       one log per runner process
```
The corpus, base models, tuning records and builds stay where every voxfit command keeps
them (``<work>/corpus``, ``<work>/models``, ``<work>/tuning``, ...): a service on the
``work`` folder of ``make run`` reuses what it made.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from voxfit.errors import ConfigError

_TOKEN_BYTES = 32


@dataclass(frozen=True, slots=True)
class ServicePaths:
    work: Path

    @property
    def root(self) -> Path:
        return self.work / "service"

    @property
    def token(self) -> Path:
        return self.root / "token"

    @property
    def key(self) -> Path:
        return self.root / "signing.key"

    @property
    def public_key(self) -> Path:
        return self.root / "signing.pub"

    @property
    def jobs_db(self) -> Path:
        return self.root / "jobs.db"

    @property
    def url(self) -> Path:
        return self.root / "url"

    @property
    def runners(self) -> Path:
        return self.root / "runners"

    def default_storage(self) -> str:
        return f"sqlite:///{self.root.resolve() / 'studies.db'}"

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id


def ensure_token(paths: ServicePaths) -> str:
    """The API token: read from ``paths.token``, made (mode 0600) when there is none.

    Raises:
        ConfigError: the file is readable by group or others, or empty.
    """
    p = paths.token
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(_TOKEN_BYTES) + "\n")
        os.chmod(p, 0o600)  # whatever the umask
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{p}: mode {mode:o} lets others read the API token; chmod 600 it")
    token = p.read_text().strip()
    if len(token) < 16:
        raise ConfigError(f"{p}: no token in it (delete it: a new one is made at start)")
    return token


def ensure_key(paths: ServicePaths) -> Path:
    """The service's signing key pair (``voxfit.search.keygen`` at first start); returns
    the public key's path.

    Raises:
        ConfigError: only one of the two files is there.
    """
    key, pub = paths.key, paths.public_key
    if key.exists() and pub.exists():
        return pub
    if key.exists() or pub.exists():
        have = key if key.exists() else pub
        raise ConfigError(f"{have}: its pair is missing; restore it (keys are never remade)")
    from voxfit.search import keygen

    try:
        keygen(paths.root)
    except ConfigError:
        if not (key.exists() and pub.exists()):  # another process made it meanwhile: fine
            raise
    return pub
