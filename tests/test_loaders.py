"""Every loader of a user file fails in one line naming the file (and the field), never a
traceback, and loaders stay light.

One contract suite (:class:`LoaderContract`) runs the classes of bad input a user or a broken
disk produces -- binary, non-UTF-8, empty and truncated files, NaN/inf and absurd numbers
where a count or a budget goes -- over every loader: hardware profiles, search spaces, plans
and corpus manifests. Checkpoints and the CLI's exit status are checked below it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxfit.data import load_manifest
from voxfit.errors import ConfigError, DataError, ModelError, VoxfitError
from voxfit.hw_profiles import load_profile
from voxfit.plan import AdapterPlan, Candidate, GroupPlan, LayerPlan
from voxfit.spaces import load_space

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "hw_profiles" / "x86-avx2-2core.yaml"
SPACE = ROOT / "spaces" / "tdnn-default.yaml"
BAD_NUMBERS = [math.nan, math.inf, -math.inf, 1e300, 10**12, -(10**12)]
Path_ = tuple[Any, ...]  # a path into the parsed document: keys and list indices


def _one_line_naming(e: VoxfitError, path: Path, *fields: str) -> str:
    msg = str(e)
    assert msg.startswith(str(path)), msg
    assert "\n" not in msg, msg
    for f in fields:
        assert f in msg, msg
    return msg


def _set(doc: Any, where: Path_, value: Any) -> None:
    for k in where[:-1]:
        doc = doc[k]
    doc[where[-1]] = value


# The property tests are inherited by every loader's class, so hypothesis sees one function
# run by several classes; each run depends on its class only through the loader it calls.
_SHARED = [HealthCheck.differing_executors, HealthCheck.too_slow]


class LoaderContract:
    """What every loader of a user file promises. Subclasses say how to load and what a good
    file and its numeric fields look like."""

    error: ClassVar[type[VoxfitError]] = ConfigError
    suffix: ClassVar[str] = ".yaml"
    # (where in the document, how the message names it, wrap the value in a list)
    numeric_fields: ClassVar[list[tuple[Path_, str, bool]]] = []

    def load(self, path: Path) -> object:
        raise NotImplementedError

    def good_text(self) -> str:
        raise NotImplementedError

    def parse(self, text: str) -> Any:
        return yaml.safe_load(text)

    def dump(self, doc: Any) -> str:
        return str(yaml.safe_dump(doc, sort_keys=False))

    # -- helpers ---------------------------------------------------------------------------
    def _write(self, folder: Path, data: bytes) -> Path:
        p = folder / f"user-file{self.suffix}"
        p.write_bytes(data)
        return p

    def _fails(self, path: Path, *fields: str) -> str:
        with pytest.raises(self.error) as e:
            self.load(path)
        return _one_line_naming(e.value, path, *fields)

    # -- the contract ----------------------------------------------------------------------
    def test_good_file_loads(self, tmp_path: Path) -> None:
        self.load(self._write(tmp_path, self.good_text().encode()))

    def test_missing_file(self, tmp_path: Path) -> None:
        self._fails(tmp_path / f"nope{self.suffix}")

    def test_folder_instead_of_file(self, tmp_path: Path) -> None:
        d = tmp_path / f"dir{self.suffix}"
        d.mkdir()
        self._fails(d)

    @pytest.mark.parametrize("data", [b"", b"\n\n  \n"], ids=["empty", "blank"])
    def test_empty_file(self, tmp_path: Path, data: bytes) -> None:
        assert "empty" in self._fails(self._write(tmp_path, data))

    def test_binary_file(self, tmp_path: Path) -> None:
        data = bytes(range(256)) * 4  # what a checkpoint or a wav given by mistake looks like
        assert "binary" in self._fails(self._write(tmp_path, data))

    def test_non_utf8_file(self, tmp_path: Path) -> None:
        text = self.good_text().encode()
        cut = text.index(b"\n") + 1
        p = self._write(tmp_path, text[:cut] + "caf\xe9\n".encode("latin-1") + text[cut:])
        assert "not UTF-8" in self._fails(p, f"{p}:2:")

    @settings(max_examples=40, deadline=None, suppress_health_check=_SHARED)
    @given(frac=st.floats(0.0, 0.98))
    def test_truncated_file(self, frac: float) -> None:
        # a disk that filled up or a copy cut short: whatever is left loads or fails in one
        # line naming the file
        text = self.good_text().encode()
        with tempfile.TemporaryDirectory() as d:
            p = self._write(Path(d), text[: int(frac * len(text))])
            try:
                self.load(p)
            except self.error as e:
                _one_line_naming(e, p)

    @settings(max_examples=60, deadline=None, suppress_health_check=_SHARED)
    @given(data=st.binary(min_size=1, max_size=400))
    def test_random_bytes_never_raise_anything_else(self, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = self._write(Path(d), data)
            try:
                self.load(p)
            except self.error as e:
                _one_line_naming(e, p)

    @pytest.mark.parametrize("bad", BAD_NUMBERS, ids=repr)
    def test_absurd_numbers_name_the_field(self, tmp_path: Path, bad: float) -> None:
        for where, name, as_list in self.numeric_fields:
            doc = self.parse(self.good_text())
            _set(doc, where, [bad] if as_list else bad)
            self._fails(self._write(tmp_path, self.dump(doc).encode()), name)


class TestProfileLoader(LoaderContract):
    numeric_fields: ClassVar[list[tuple[Path_, str, bool]]] = [
        (("cores",), "cores", False),
        (("latency_budget_ms",), "latency_budget_ms", False),
        (("memory_budget_mb",), "memory_budget_mb", False),
        (("channel_multiple",), "channel_multiple", False),
        (("peak_gflops",), "peak_gflops", False),
        (("memory_bandwidth_gbs",), "memory_bandwidth_gbs", False),
        (("inputs", 0, "frames"), "inputs[0].frames", False),
        (("measurement", "warmup"), "measurement.warmup", False),
        (("measurement", "repeats"), "measurement.repeats", False),
        (("measurement", "min_repeat_ms"), "measurement.min_repeat_ms", False),
        (("tuning", "trials_per_task"), "tuning.trials_per_task", False),
        (("tuning", "trials_per_iter"), "tuning.trials_per_iter", False),
        (("tuning", "builder_timeout_s"), "tuning.builder_timeout_s", False),
        (("target", "num-cores"), "target.num-cores", False),
    ]

    def load(self, path: Path) -> object:
        return load_profile(path)

    def good_text(self) -> str:
        return PROFILE.read_text()

    @pytest.mark.parametrize(
        ("line", "field"),
        [
            ("trials_per_task: 1e300", "tuning.trials_per_task"),  # YAML 1.1: a string
            ("trials_per_task: 1.0e+300", "tuning.trials_per_task"),
            ("latency_budget_ms: .nan", "latency_budget_ms"),
            ("latency_budget_ms: .inf", "latency_budget_ms"),
            ("cores: 1000000000000", "cores"),
            ("cores: 2.5", "cores"),
            ("memory_budget_mb: 1" + "0" * 400, "memory_budget_mb"),
        ],
    )
    def test_hand_written_absurd_values(self, tmp_path: Path, line: str, field: str) -> None:
        key = line.split(":")[0]
        lines = [
            (ln[: len(ln) - len(ln.lstrip())] + line) if ln.strip().startswith(key + ":") else ln
            for ln in self.good_text().splitlines()
        ]
        self._fails(self._write(tmp_path, "\n".join(lines).encode()), field)

    @pytest.mark.parametrize(
        ("text", "says"),
        [
            ("schema_version: 1\nname: [unclosed\n", ":3: invalid YAML"),
            ("schema_version: 1\nwhen: 2001-02-30\n", "invalid YAML"),  # a date that is not
            ("[" * 5000 + "]" * 5000, "invalid YAML"),
            ("- just\n- a list\n", "expected a mapping"),
            (PROFILE.read_text() + "\n1: x\n", "1: unknown key"),  # an int key among str keys
        ],
    )
    def test_yaml_that_is_not_a_profile(self, tmp_path: Path, text: str, says: str) -> None:
        assert says in self._fails(self._write(tmp_path, text.encode()))

    def test_oversized_file_is_refused_unread(self, tmp_path: Path) -> None:
        p = self._write(tmp_path, self.good_text().encode() + b"#" * (2 * 1024 * 1024))
        assert "too large" in self._fails(p)


class TestSpaceLoader(LoaderContract):
    numeric_fields: ClassVar[list[tuple[Path_, str, bool]]] = [
        (("recovery_steps",), "recovery_steps", True),
        (("pruning", "groups", "blocks.*.hidden"), "pruning.groups.blocks.*.hidden", True),
        (("adapters", "slots", "blocks.*"), "adapters.slots.blocks.*", True),
        (("quantization", "weight_bits", "head"), "quantization.weight_bits.head", True),
    ]

    def load(self, path: Path) -> object:
        return load_space(path)

    def good_text(self) -> str:
        return SPACE.read_text()


class TestPlanLoader(LoaderContract):
    numeric_fields: ClassVar[list[tuple[Path_, str, bool]]] = [
        (("groups", "g", "keep_ratio"), "groups.g.keep_ratio", False),
        (("layers", "l", "weight_bits"), "layers.l.weight_bits", False),
        (("adapters", "s", "dim"), "adapters.s.dim", False),
        (("recovery_steps",), "recovery_steps", False),
    ]

    def load(self, path: Path) -> object:
        return Candidate.load(path)

    def good_text(self) -> str:
        return Candidate(
            groups=(GroupPlan("g", 0.5),),
            layers=(LayerPlan("l", 8, 32),),
            adapters=(AdapterPlan("s", 8),),
            importance="adaptation",
            recovery_steps=500,
        ).dump_yaml()

    def test_round_trip_through_a_file(self, tmp_path: Path) -> None:
        c = Candidate.load(self._write(tmp_path, self.good_text().encode()))
        assert c.dump_yaml() == self.good_text()


class TestManifestLoader(LoaderContract):
    error = DataError
    suffix = ".jsonl"
    numeric_fields: ClassVar[list[tuple[Path_, str, bool]]] = [
        ((1, "duration_s"), "duration_s", False),
    ]

    def load(self, path: Path) -> object:
        return load_manifest(path, check_audio=False)

    def good_text(self) -> str:
        rows = [
            {"path": f"wavs/{s}/{i}.wav", "speaker": s, "split": split, "phones": "h @ l oU"}
            | {"text": "hello", "duration_s": 1.25}
            for i, (s, split) in enumerate([("a", "train"), ("a", "dev"), ("b", "eval")])
        ]
        return "".join(json.dumps(r) + "\n" for r in rows)

    def parse(self, text: str) -> Any:
        return [json.loads(line) for line in text.splitlines()]

    def dump(self, doc: Any) -> str:
        return "".join(json.dumps(r) + "\n" for r in doc)  # NaN and Infinity as Python writes

    def test_bad_line_is_named(self, tmp_path: Path) -> None:
        rows = self.parse(self.good_text())
        rows[1]["duration_s"] = math.nan
        p = self._write(tmp_path, self.dump(rows).encode())
        assert "must be a finite number" in self._fails(p, f"{p}:2:", "duration_s")

    @pytest.mark.parametrize(
        ("key", "value"), [("path", 7), ("path", ""), ("split", ["train"]), ("text", None)]
    )
    def test_wrong_types_name_the_key(self, tmp_path: Path, key: str, value: object) -> None:
        rows = self.parse(self.good_text())
        rows[0][key] = value
        self._fails(self._write(tmp_path, self.dump(rows).encode()), f"{tmp_path}", ":1:")


# -- checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from voxfit.data import PhoneInventory
    from voxfit.models import build_model, default_config
    from voxfit.train import save_checkpoint

    inv = PhoneInventory(("<blank>", "a", "b"))
    cfg = default_config("tdnn", inv.size, "tiny")
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, build_model(cfg), cfg, inv, {})
    return path


def _bad_checkpoints(good: Path, folder: Path) -> dict[str, Path]:
    import torch

    data = good.read_bytes()
    raw = torch.load(good, map_location="cpu", weights_only=True)
    out = {}
    for name, blob in {
        "half": data[: len(data) // 2],
        "empty": b"",
        "yaml": PROFILE.read_bytes(),
        "random": bytes(range(256)) * 64,
    }.items():
        out[name] = folder / f"{name}.pt"
        out[name].write_bytes(blob)
    for name, change in {
        "config": lambda r: r["model_config"].update(hidden=[1, 2]),
        "extra-config": lambda r: r["model_config"].update(colour="red"),
        "weights": lambda r: r["state_dict"].pop(next(iter(r["state_dict"]))),
        "no-config": lambda r: r.pop("model_config"),
    }.items():
        r = dict(raw, model_config=dict(raw["model_config"]), state_dict=dict(raw["state_dict"]))
        change(r)
        out[name] = folder / f"{name}.pt"
        torch.save(r, out[name])
    return out


def test_broken_checkpoints_fail_in_one_line(checkpoint: Path, tmp_path: Path) -> None:
    from voxfit.train import load_checkpoint

    load_checkpoint(checkpoint)
    for name, p in _bad_checkpoints(checkpoint, tmp_path).items():
        with pytest.raises(ModelError) as e:
            load_checkpoint(p)
        _one_line_naming(e.value, p)
        assert name  # the loop names the case in a failure's locals


# -- the CLI: exit 2, one line, nothing written ---------------------------------------------

EXE = shutil.which("voxfit") or str(Path(sys.executable).parent / "voxfit")


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def _assert_one_line_exit_2(res: subprocess.CompletedProcess[str], *names: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    for n in names:
        assert n in lines[0], lines[0]


def _bad_profiles(folder: Path) -> dict[str, tuple[Path, str]]:
    good = PROFILE.read_text()
    cases = {
        "binary": (bytes(range(256)) * 8, "binary"),
        "nan-budget": (
            good.replace("latency_budget_ms: 4.0", "latency_budget_ms: .nan").encode(),
            "latency_budget_ms",
        ),
        "markup": (good.replace("cores: 2", 'cores: "[/x] [bold]"').encode(), "cores"),
        "truncated": (good.encode()[: len(good) // 2], ""),
    }
    out = {}
    for name, (data, field) in cases.items():
        p = folder / f"{name}.yaml"
        p.write_bytes(data)
        out[name] = (p, field)
    return out


def test_cli_bad_profile_exits_2_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for p, field in _bad_profiles(inputs).values():
        _assert_one_line_exit_2(
            _run(run_dir, "profile", "check", "--no-tvm", str(p)), str(p), field
        )
        if p.stem not in ("binary", "nan-budget"):
            continue
        # a search with this profile stops before it makes a corpus, a model or a study
        _assert_one_line_exit_2(
            _run(run_dir, "search", "--profile", str(p), "--preset", "tiny"), str(p), field
        )
    assert list(run_dir.iterdir()) == []


def test_cli_broken_checkpoint_exits_2_in_one_line_and_writes_nothing(
    checkpoint: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    man = inputs / "manifest.jsonl"
    man.write_text(TestManifestLoader().good_text())
    half = _bad_checkpoints(checkpoint, inputs)["half"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    res = _run(run_dir, "evaluate", str(half), "--manifest", str(man), "--out", "o")
    # the manifest's wavs do not exist: that line or the checkpoint's, never a traceback
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    man.write_text(TestManifestLoader().good_text().replace("wavs/", str(inputs) + "/"))
    for row in TestManifestLoader().parse(man.read_text()):
        Path(row["path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(row["path"]).write_bytes(b"")
    res = _run(run_dir, "evaluate", str(half), "--manifest", str(man), "--out", "o")
    _assert_one_line_exit_2(res, str(half))
    assert list(run_dir.iterdir()) == []


# -- layering: loaders are light ------------------------------------------------------------


def test_spaces_profiles_and_plans_import_without_torch_tvm_or_optuna() -> None:
    # a fresh interpreter, so modules other tests imported do not hide a leak (STYLE: loading
    # a YAML must be instant)
    code = (
        "import sys, voxfit.spaces, voxfit.hw_profiles, voxfit.plan, voxfit.structure\n"
        "heavy = sorted(m for m in ('torch', 'tvm', 'optuna') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"importing the loaders imported {out}"


def test_bounds_live_in_one_place() -> None:
    # every loader reads its limits from voxfit._config: no loader has its own copy
    import voxfit._config as config

    bounds: dict[str, config.Bound] = {
        k: v for k, v in vars(config).items() if isinstance(v, config.Bound)
    }
    assert {"CORES", "LATENCY_MS", "TRIALS", "ADAPTER_DIM", "UTTERANCE_S"} <= set(bounds)
    for b in bounds.values():
        assert math.isfinite(b.hi)
        assert b.problem(math.nan) is not None
