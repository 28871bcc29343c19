"""The job API over real HTTP (httpx) against a real ``voxfit serve`` (no runners here:
jobs stay queued): the token, the strict loaders behind 422, the body bound, the job list,
the schema, and jobs that outlive a restart."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.service._server import Server, running
from voxfit.service import MAX_BODY_BYTES

ROOT = Path(__file__).resolve().parents[2]
PROFILE = (ROOT / "hw_profiles" / "x86-avx2-2core.yaml").read_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("api") / "work", "--runners", "0") as s:
        yield s


# a space over a model defined only in the tests, named by its factory (the server runs in
# the repository's root, so it imports it as a user's own module beside the service)
USER_SPACE = """
schema_version: 1
name: mine
model: tests._user_model:build
pruning:
  groups: {"layers.*.inner": [0.5, 1.0]}
quantization:
  weight_bits: {"*": [8, 32]}
"""


def _profile(**changes: object) -> str:
    raw = yaml.safe_load(PROFILE)
    raw.update(changes)
    return yaml.safe_dump(raw)


def test_token_file_is_0600_and_every_request_needs_it(server: Server) -> None:
    token = server.work / "service" / "token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    for path in ("/jobs", "/openapi.json", "/key", "/jobs/job-20260101-000000-abcdef", "/x"):
        for tok in (None, "wrong", server.token + "x", "Basic " + server.token):
            with server.client(tok) as c:
                r = c.get(path)
            assert r.status_code == 401, (path, tok, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    with server.client(None) as c:
        r = c.post("/jobs", json={"profile": "x86-avx2-2core", "trials": 1})
    assert r.status_code == 401
    assert "no token" in r.json()["detail"]
    with server.client() as c:
        assert c.get("/jobs").status_code == 200


def test_openapi_schema_is_served(server: Server) -> None:
    with server.client() as c:
        schema = c.get("/openapi.json").raise_for_status().json()
    for path in ("/jobs", "/jobs/{job_id}", "/jobs/{job_id}/front", "/jobs/{job_id}/report",
                 "/jobs/{job_id}/bundles.{fmt}", "/key"):  # fmt: skip
        assert path in schema["paths"], path
    assert "post" in schema["paths"]["/jobs"]
    assert "JobRequest" in schema["components"]["schemas"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"profile_yaml": _profile(latency_budget_sm=3.0)}, "profile: latency_budget_sm: unknown"),
        ({"profile_yaml": _profile(cores="two")}, "profile: cores: expected int"),
        ({"profile_yaml": _profile(memory_budget_mb=-1)}, "profile: memory_budget_mb: must be"),
        ({"profile_yaml": PROFILE.replace("tuning:", "tuning: [")}, "profile:"),
        ({"profile_yaml": "- a list"}, "profile: expected a mapping"),
        (
            {"profile_yaml": _profile(cross_compiler="gcc")},
            "profile: cross_compiler: not accepted",
        ),
        ({"profile": "no-such-device"}, "profile: no shipped profile 'no-such-device' (have: "),
        ({"profile": "../../../etc/passwd"}, "profile: no shipped profile"),
        ({"profile": "Makefile"}, "profile: no shipped profile"),
        (
            {
                "profile": "x86-avx2-2core",
                "space_yaml": "schema_version: 1\nname: s\nmodel: tdnn\n"
                "pruning: {groups: {straem: [0.5]}}\n",
            },
            "space: pruning.groups.straem",
        ),  # fmt: skip
        (
            {
                "profile": "x86-avx2-2core",
                "space_yaml": USER_SPACE.replace("tests._user_model", "no_such_pkg.mod"),
            },
            "space: model: model factory no_such_pkg.mod:build: cannot import no_such_pkg",
        ),  # fmt: skip
        (
            {"profile": "x86-avx2-2core", "space_yaml": USER_SPACE.replace(":build", ":ConvCtc")},
            "space: model: model factory tests._user_model:ConvCtc: must accept",
        ),
        (
            {"profile": "x86-avx2-2core", "space_yaml": USER_SPACE.replace("inner", "outer")},
            "space: pruning.groups",
        ),
        ({"profile": "x86-avx2-2core", "trials": None}, "budget: give trials, timeout_s or both"),
        ({"profile": "x86-avx2-2core", "trials": 0}, "trials: must be in 1..100000"),
        ({"profile": "x86-avx2-2core", "timeout_s": float("1e300")}, "timeout_s: must be <="),
        ({"profile": "x86-avx2-2core", "trials": "many"}, "trials: Input should be a valid int"),
        ({"profile": "x86-avx2-2core", "trails": 3}, "trails: Extra inputs are not permitted"),
        ({"profile": "x86-avx2-2core", "preset": "huge"}, "preset: 'huge' is not one of"),
    ],
)
def test_malformed_submission_is_422_naming_the_field(
    server: Server, body: dict[str, object], named: str
) -> None:
    body = {"trials": 1, **body}
    body = {k: v for k, v in body.items() if v is not None}
    with server.client() as c:
        r = c.post("/jobs", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    assert "\n" not in detail
    assert named in detail, detail


def test_oversized_body_is_413(server: Server) -> None:
    big = {"profile": "x86-avx2-2core", "trials": 1, "space_yaml": "#" * MAX_BODY_BYTES}
    with server.client() as c:
        r = c.post("/jobs", json=big)
        assert r.status_code == 413, r.text
        assert "over" in r.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"profile": "x86-avx2-2core", "trials": 1, "space_yaml": "'
            for _ in range(MAX_BODY_BYTES // 65536 + 2):
                yield b"#" * 65536
            yield b'"}'

        r = c.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert c.get("/jobs").status_code == 200  # the server is fine


def test_submit_list_show_and_not_ready(server: Server) -> None:
    with server.client() as c:
        r = c.post("/jobs", json={"profile": "x86-avx2-2core", "space": "tdnn-default",
                                  "trials": 3, "preset": "tiny"})  # fmt: skip
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["state"] == "queued"
        assert (job["profile"], job["space"], job["preset"]) == (
            "x86-avx2-2core",
            "tdnn-default",
            "tiny",
        )
        listed = {j["id"]: j for j in c.get("/jobs").raise_for_status().json()}
        assert listed[job["id"]]["progress"] == {"trials_finished": 0, "trials_budget": 3,
                                                 "fraction": 0.0}  # fmt: skip
        assert [j["id"] for j in c.get("/jobs", params={"state": "queued"}).json()].count(
            job["id"]
        ) == 1
        spec = c.get(f"/jobs/{job['id']}/spec").raise_for_status().json()
        assert spec["profile_yaml"] == PROFILE  # the job keeps the text it was made with
        for what in ("front", "report", "bundles.tar.gz", "bundles.zip"):
            r = c.get(f"/jobs/{job['id']}/{what}")
            assert r.status_code == 409, (what, r.text)
            assert "is queued" in r.json()["detail"]
        assert c.get("/jobs/job-20200101-000000-abcdef").status_code == 404
        assert c.get("/jobs/../../service/token").status_code in (401, 404)
        assert c.get(f"/jobs/{job['id']}/bundles.rar").status_code == 404
        pem = c.get("/key").raise_for_status().text
        assert pem == (server.work / "service" / "signing.pub").read_text()
        assert "x86-avx2-2core" in c.get("/shipped").json()["profiles"]


def test_a_space_over_a_factory_model_is_accepted(server: Server) -> None:
    with server.client() as c:
        r = c.post("/jobs", json={"profile": "x86-avx2-2core", "space_yaml": USER_SPACE,
                                  "trials": 2, "preset": "tiny"})  # fmt: skip
        assert r.status_code == 201, r.text
        spec = c.get(f"/jobs/{r.json()['id']}/spec").raise_for_status().json()
    assert "model: tests._user_model:build" in spec["space_yaml"]


def test_jobs_survive_a_restart(tmp_path: Path) -> None:
    work = tmp_path / "work"
    with running(work, "--runners", "0") as s, s.client() as c:
        job = c.post("/jobs", json={"profile": "x86-avx2-2core", "timeout_s": 60}).json()
        token = s.token
    assert not (work / "service" / "url").exists()  # removed on a clean stop
    with running(work, "--runners", "0") as s, s.client() as c:
        assert s.token == token  # made once
        again = c.get(f"/jobs/{job['id']}").raise_for_status().json()
    assert again["state"] == "queued"
    assert again["budget"] == {"trials": None, "timeout_s": 60.0}
