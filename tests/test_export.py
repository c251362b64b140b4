"""The export pipeline: ONNX graph quality, opsets, dynamic shapes, reproducibility, manifest, CLI."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import types
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import dwa_export._cli as cli
from dwa_export import DWAWeights
from dwa_export._cli import SUBCOMMANDS, Subcommand, main
from dwa_export._conformance import case_inputs
from dwa_export._export import (
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    Artifact,
    onnx_bytes,
    quiet_exporters,
    read_manifest_text,
    toolchain,
    torchscript_bytes,
)
from dwa_export._verify import entry_problems, manifest_problems
from reference import dwa_weights

ROOT = Path(__file__).resolve().parents[1]
EXPORTED = ROOT / "exported"
COMMITTED = [
    "dwa_weights.pt",
    "dwa_weights.onnx",
    "dwa_weights_batched.onnx",
    "dwa_weights.pt2",
    "dwa_weights_batched.pt2",
]
MANIFEST = json.loads((EXPORTED / "manifest.json").read_text())


def session(model: bytes | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # some calls below fail on purpose
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(sess, l1, l2, t):
    return sess.run(["weights"], {"loss_t1": l1, "loss_t2": l2, "temperature": t})[0]


PACKAGED_README = resources.files("dwa_export").joinpath("exported_readme.md").read_bytes()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> types.SimpleNamespace:
    """One CLI export of TorchScript and single ONNX files in every dtype, shared by the tests that read them.

    Exporting is what costs here (about 1.5 s a file): the files are made once,
    by the command users run, and each test reads the bytes it needs.
    """
    out = tmp_path_factory.mktemp("cli") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["--out", str(out), "--formats", "torchscript,onnx", "--dtype", "float32,float64,float16"])
    return types.SimpleNamespace(out=out, code=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


@pytest.fixture(scope="module")
def fresh_onnx(cli_run) -> dict[str, bytes]:
    """The float32 ONNX files the current kernel exports at the default opset (the single one from ``cli_run``)."""
    with quiet_exporters():
        batched = onnx_bytes(Artifact("onnx-batched", "float32"))
    return {"dwa_weights.onnx": (cli_run.out / "dwa_weights.onnx").read_bytes(), "dwa_weights_batched.onnx": batched}


# Tests that run a command in a new process, which spends seconds importing torch
# before it does anything, start it when this module's first test starts (if the
# test is selected): it then runs on another core while the tests in this process
# run, and the test, at the end of this module, waits for it and checks it.


@dataclass
class Started:
    """A command started early: its process, and the folder with its stdout, stderr and anything else."""

    process: subprocess.Popen
    folder: Path

    def result(self) -> tuple[int, bytes, bytes]:
        """(exit status, stdout, stderr) once it has finished."""
        code = self.process.wait(timeout=600)
        return code, (self.folder / "stdout").read_bytes(), (self.folder / "stderr").read_bytes()


def start(folder: Path, command: list[str], **options) -> Started:
    with open(folder / "stdout", "wb") as stdout, open(folder / "stderr", "wb") as stderr:
        return Started(
            subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, **options), folder
        )


@pytest.fixture(scope="module", autouse=True)
def started_early(request, tmp_path_factory) -> Iterator[dict[str, Started | None]]:
    mine = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    selected = {getattr(item, "originalname", item.name) for item in mine}
    started = {name: begin(tmp_path_factory.mktemp(name[5:30])) for name, begin in EARLY.items() if name in selected}
    yield started
    for early in started.values():
        if early is not None and early.process.poll() is None:
            early.process.kill()
            early.process.wait()


# --------------------------------------------------------------------------- ONNX graph


@pytest.mark.parametrize("name", ["dwa_weights.onnx", "dwa_weights_batched.onnx"])
def test_onnx_model_is_documented_clean_and_small(name):
    model = onnx.load(str(EXPORTED / name))
    onnx.checker.check_model(model, full_check=True)
    assert model.producer_name == "dwa_export" and model.producer_version
    assert model.model_version >= 1 and "Dynamic Weight Average" in model.doc_string
    assert [i.name for i in model.graph.input] == ["loss_t1", "loss_t2", "temperature"]
    assert [o.name for o in model.graph.output] == ["weights"]
    assert all(v.doc_string for v in (*model.graph.input, *model.graph.output))
    ops = Counter(node.op_type for node in model.graph.node)
    plumbing = {"Cast", "Shape", "Reshape", "Expand", "ConstantOfShape", "Size", "Range", "If", "Loop", "Identity"}
    assert not plumbing & set(ops), ops
    assert sum(ops.values()) <= 20, ops
    assert not any(node.metadata_props for node in model.graph.node)
    # Nothing path- or machine-dependent.
    raw = (EXPORTED / name).read_bytes()
    assert str(ROOT).encode() not in raw and b"site-packages" not in raw


def test_onnx_io_shapes_are_symbolic():
    def dims(model, index, output=False):
        values = model.graph.output if output else model.graph.input
        return [d.dim_param or d.dim_value for d in values[index].type.tensor_type.shape.dim]

    single = onnx.load(str(EXPORTED / "dwa_weights.onnx"))
    assert dims(single, 0) == dims(single, 1) == ["K"] and dims(single, 2) == [] and dims(single, 0, True) == ["K"]
    batched = onnx.load(str(EXPORTED / "dwa_weights_batched.onnx"))
    assert dims(batched, 0) == dims(batched, 1) == ["N", "K"] == dims(batched, 0, True)
    assert dims(batched, 2) == ["N_or_1", 1]


def test_dynamic_k_and_n_really_vary_at_run_time():
    single, batched = session(EXPORTED / "dwa_weights.onnx"), session(EXPORTED / "dwa_weights_batched.onnx")
    program = torch.export.load(str(EXPORTED / "dwa_weights.pt2")).module()
    rng = np.random.default_rng(0)
    for k in (1, 2, 5, 1000):
        l1, l2 = rng.uniform(0.5, 2, k).astype(np.float32), rng.uniform(0.5, 2, k).astype(np.float32)
        expected = dwa_weights(l1, l2, 2.0)
        np.testing.assert_allclose(run(single, l1, l2, np.array(2.0, np.float32)), expected, atol=1e-5)
        np.testing.assert_allclose(
            program(torch.from_numpy(l1), torch.from_numpy(l2), torch.tensor(2.0)), expected, atol=1e-5
        )
        for n in (1, 4):
            b1, b2 = rng.uniform(0.5, 2, (n, k)).astype(np.float32), rng.uniform(0.5, 2, (n, k)).astype(np.float32)
            per_row = rng.uniform(0.5, 3, (n, 1)).astype(np.float32)
            np.testing.assert_allclose(run(batched, b1, b2, per_row), dwa_weights(b1, b2, per_row), atol=1e-5)
            shared = np.full((1, 1), 2.0, np.float32)
            np.testing.assert_allclose(run(batched, b1, b2, shared), dwa_weights(b1, b2, 2.0), atol=1e-5)


@pytest.mark.parametrize("name", ["dwa_weights.onnx", "dwa_weights_batched.onnx"])
def test_onnxruntime_rejects_mismatched_shapes(name):
    sess = session(EXPORTED / name)
    batched = "batched" in name
    l1 = np.ones((2, 3) if batched else (3,), np.float32)
    t = np.ones((2, 1) if batched else (), np.float32)
    for l2 in (np.ones(l1.shape[:-1] + (1,), np.float32), np.ones(l1.shape[:-1] + (4,), np.float32)):
        with pytest.raises(Exception, match="Concat|dimension"):
            run(sess, l1, l2, t)


def _opsets_worth_exporting() -> list[int]:
    """The supported opsets at which the exported graph can differ from the one before.

    The exporter writes the graph at opset 18 and converts each node to the
    target opset; a node changes only where its operator's schema has a new
    version. So the graph at any other opset equals the one at the newest
    change point below it, and exporting it proves nothing new: the range's
    ends, the default, and each opset where one of the graph's operators
    changes (20 for ReduceMax/ReduceMin, 21 and 23 for Unsqueeze with onnx
    1.23) cover every graph there is. The operators are the committed file's;
    the test below checks that each export uses the same ones.
    """
    ops = {node.op_type for node in onnx.load(str(EXPORTED / "dwa_weights.onnx")).graph.node}
    changes = {
        opset
        for opset in range(MIN_OPSET + 1, MAX_OPSET + 1)
        for op in ops
        if onnx.defs.get_schema(op, opset, "").since_version == opset
    }
    return sorted({MIN_OPSET, DEFAULT_OPSET, MAX_OPSET} | changes)


@pytest.mark.parametrize("opset", _opsets_worth_exporting())
def test_every_supported_opset_exports_checks_and_runs(opset, fresh_onnx):
    if opset == DEFAULT_OPSET:
        model_bytes = fresh_onnx["dwa_weights.onnx"]  # already exported, by the CLI at its default
    else:
        with quiet_exporters():
            model_bytes = onnx_bytes(Artifact("onnx", "float32"), opset)
    model = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset
    committed = onnx.load(str(EXPORTED / "dwa_weights.onnx"))
    assert {n.op_type for n in model.graph.node} == {n.op_type for n in committed.graph.node}  # see above
    l1, l2 = np.array([0.75, 0.86, 0.5], np.float32), np.ones(3, np.float32)
    np.testing.assert_allclose(
        run(session(model_bytes), l1, l2, np.array(2.0, np.float32)), dwa_weights(l1, l2, 2.0), atol=1e-6
    )


def test_the_newest_opset_comes_from_torch_itself():
    # No public API names it: dwa_export reads torch.onnx._constants, which must still be there.
    assert MAX_OPSET == torch.onnx._constants.ONNX_MAX_OPSET >= MIN_OPSET


def test_an_unsupported_opset_is_a_clear_error():
    with pytest.raises(ValueError, match=f"opset 17 is not supported.*{MIN_OPSET} to {MAX_OPSET}"):
        onnx_bytes(Artifact("onnx", "float32"), 17)


def test_float16_onnx_runs_in_onnxruntime(cli_run):
    sess = session(cli_run.out / "dwa_weights_float16.onnx")
    l1, l2 = np.array([0.75, 0.86], np.float16), np.ones(2, np.float16)
    out = run(sess, l1, l2, np.array(2.0, np.float16))
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float64), dwa_weights(l1, l2, 2.0), atol=2e-3)


# --------------------------------------------------------------------------- reproducibility


def test_torchscript_file_keeps_its_source_for_tracebacks_under_a_relative_name(tmp_path):
    path = tmp_path / "k.pt"
    with quiet_exporters():
        path.write_bytes(torchscript_bytes())
        kernel = torch.jit.load(str(path))
    with pytest.raises(torch.jit.Error) as info:
        kernel(torch.ones(2), torch.ones(2), torch.tensor(-1.0))
    message = str(info.value)
    assert 'File "dwa_export/_kernel.py", line' in message and "temperature must be finite and > 0" in message
    assert str(ROOT) not in message


def test_committed_onnx_matches_what_the_current_kernel_exports(fresh_onnx):
    for name, fresh in fresh_onnx.items():
        committed = (EXPORTED / name).read_bytes()
        if (
            toolchain()["torch"] == MANIFEST["toolchain"]["torch"]
            and toolchain()["onnxscript"] == MANIFEST["toolchain"]["onnxscript"]
        ):
            assert committed == fresh, f"exported/{name} is stale: run dwa-export and commit exported/"
        # Whatever the toolchain: the same graph (ops, wiring, attributes, constants, I/O).
        a, b = onnx.load_from_string(committed), onnx.load_from_string(fresh)
        assert [(n.op_type, list(n.input), list(n.output), str(n.attribute)) for n in a.graph.node] == [
            (n.op_type, list(n.input), list(n.output), str(n.attribute)) for n in b.graph.node
        ], f"exported/{name} is stale: run dwa-export and commit exported/"
        assert a.graph.initializer == b.graph.initializer and a.graph.input == b.graph.input


def test_committed_torchscript_and_torch_export_match_the_current_kernel():
    with quiet_exporters():
        fresh_code = torch.jit.script(DWAWeights()).code
        committed_code = torch.jit.load(str(EXPORTED / "dwa_weights.pt")).code
    assert committed_code == fresh_code, "exported/dwa_weights.pt is stale: run dwa-export"
    from dwa_export._export import _exported_program

    for name, fmt in (("dwa_weights.pt2", "pt2"), ("dwa_weights_batched.pt2", "pt2-batched")):
        committed = torch.export.load(str(EXPORTED / name))
        fresh = _exported_program(Artifact(fmt, "float32"))
        assert committed.graph_module.code == fresh.graph_module.code, f"exported/{name} is stale: run dwa-export"
        assert str(committed.range_constraints) == str(fresh.range_constraints)


def test_manifest_describes_every_committed_file():
    entries = MANIFEST["artifacts"]
    assert sorted(entries) == sorted(COMMITTED)
    for name, entry in entries.items():
        assert entry["sha256"] == hashlib.sha256((EXPORTED / name).read_bytes()).hexdigest(), name
        assert {"format", "dtype", "inputs", "outputs"} <= entry.keys()
        assert [i["name"] for i in entry["inputs"]] == ["loss_t1", "loss_t2", "temperature"]
    assert entries["dwa_weights.onnx"]["opset"] == 18 and entries["dwa_weights.onnx"]["ir_version"] >= 8
    assert entries["dwa_weights_batched.onnx"]["inputs"][0]["shape"] == ["N", "K"]
    assert {"torch", "onnx", "onnxruntime", "onnxscript"} <= MANIFEST["toolchain"].keys()


def test_exported_readme_is_the_packaged_one():
    assert (EXPORTED / "README.md").read_bytes() == PACKAGED_README


# --------------------------------------------------------------------------- the CLI


def test_cli_exports_and_verifies(cli_run):
    out = cli_run.out
    assert cli_run.code == 0, cli_run.stderr
    text = cli_run.stdout
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        [
            "README.md",
            "manifest.json",
            "dwa_weights.pt",
            "dwa_weights.onnx",
            "dwa_weights_float64.onnx",
            "dwa_weights_float16.onnx",
        ]
    )
    for name in ("dwa_weights.pt", "dwa_weights_float16.onnx"):
        assert f"export  {out / name}" in text and f"verify  {out / name}" in text
    table = text[text.index("artifact  ") :]
    assert "err/bound" in table and "load ms" in table and "call us" in table
    assert table.count(" ok") == 4 and "FAILED" not in table
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:6]}
    every = sum(len(case_inputs(dtype)) for dtype in ("float32", "float64", "float16"))
    assert rows["dwa_weights.pt"][2] == f"{every}/{every}"
    assert 0 < float(rows["dwa_weights.onnx"][3]) <= 1  # err/bound of a passing file
    # One line says what the numbers mean (issue 13: "max abs err 1.26e-02" next to "about 1e-6").
    assert "err/bound: worst |weights - float64 reference| / that case's bound" in table and "<= 1 passes" in table
    assert (
        json.loads((out / "manifest.json").read_text())["artifacts"]["dwa_weights_float16.onnx"]["dtype"] == "float16"
    )


def test_cli_check_passes_on_the_committed_artifacts(tmp_path, capsys):
    out = tmp_path / "exported"
    shutil.copytree(EXPORTED, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["--check", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert (
        "all 5 artifacts verified against the float64 reference, each in its own runtime: "
        f"every file {out / 'manifest.json'} lists" in text
    )
    assert f"check   {out / 'manifest.json'}  fields and layout  ok" in text
    assert f"check   {out / 'README.md'}  against the packaged README  ok" in text
    assert "not verifiable: the toolchain manifest.json records (torch " in text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing rewritten
    # Narrowed, it says what it left out.
    assert main(["--check", "--out", str(out), "--formats", "onnx"]) == 0
    text = capsys.readouterr().out
    assert "all 1 artifacts verified" in text
    assert (
        "those --formats/--dtype chose; not verified: "
        "dwa_weights.pt, dwa_weights.pt2, dwa_weights_batched.onnx, dwa_weights_batched.pt2" in text
    )


def test_cli_check_catches_a_tampered_file(tmp_path, capsys):
    out = tmp_path / "exported"
    shutil.copytree(EXPORTED, out)
    model = onnx.load(str(out / "dwa_weights.onnx"))
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    concat.input[0], concat.input[1] = concat.input[1], concat.input[0]  # swaps t-1 and t-2
    onnx.save(model, str(out / "dwa_weights.onnx"))
    assert main(["--check", "--out", str(out), "--formats", "onnx"]) == 1
    err = capsys.readouterr().err
    assert "sha256 differs from manifest.json" in err and "1 of 1 artifacts FAILED: dwa_weights.onnx" in err

    # Even with the manifest updated to match, the numbers give it away.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"]["dwa_weights.onnx"]["sha256"] = hashlib.sha256(
        (out / "dwa_weights.onnx").read_bytes()
    ).hexdigest()
    write_manifest_as_dwa_export_does(out, manifest)
    assert main(["--check", "--out", str(out), "--formats", "onnx", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "exceeds the bound" in captured.err and captured.out == ""


# --------------------------------------------------------------------------- writing: by rename, never through a link


def _plain_file_mode(folder: Path) -> int:
    """The mode a plain ``open(..., "w")`` gives a new file here (0o666 less the umask)."""
    probe = folder / "probe"
    probe.write_bytes(b"")
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


def test_export_replaces_links_in_the_output_folder_and_never_writes_through_them(tmp_path, capsys):
    # Issue 8: with --out/dwa_weights.pt a symlink, its target used to be overwritten.
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    names = ("dwa_weights.pt", "manifest.json", "README.md")  # an artifact and both other files it writes
    for name in names:
        (elsewhere / name).write_bytes(b"not dwa-export's to overwrite\n")
        (out / name).symlink_to(elsewhere / name)
    assert main(["--out", str(out), "--formats", "torchscript", "-q"]) == 0, capsys.readouterr().err
    for name in names:
        assert (elsewhere / name).read_bytes() == b"not dwa-export's to overwrite\n", name
        assert not (out / name).is_symlink(), name
        assert stat.S_IMODE((out / name).stat().st_mode) == _plain_file_mode(tmp_path), name
    with quiet_exporters():
        assert (out / "dwa_weights.pt").read_bytes() == torchscript_bytes()
    assert (out / "README.md").read_bytes() == PACKAGED_README
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary file left behind


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG (File too large), as a full disk or a quota would fail them."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's SIGXFSZ ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_write_that_fails_half_way_leaves_the_old_file_whole(tmp_path, capsys):
    # Issue 8: each file is either the old one or the new one, never a mix. Here the
    # README (6.9 kB) cannot be written past half its size; the ONNX file (2.2 kB)
    # and the manifest (1.2 kB) fit and are written whole.
    out = tmp_path / "out"
    out.mkdir()
    old = b"# the README of an earlier export\n"
    (out / "README.md").write_bytes(old)
    limit = len(PACKAGED_README) // 2
    with file_size_limit(limit):
        code = main(["--out", str(out), "--formats", "onnx", "-q"])
    captured = capsys.readouterr()
    assert (out / "README.md").read_bytes() == old
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "dwa_weights.onnx", "manifest.json"]
    assert code == 2 and captured.err == f"dwa-export: error: {out / 'README.md'}: File too large\n"
    onnx.checker.check_model(onnx.load(str(out / "dwa_weights.onnx")), full_check=True)
    assert json.loads((out / "manifest.json").read_text())["artifacts"].keys() == {"dwa_weights.onnx"}


# ------------------------------------------------------ --check: every listed file, every field, the README


def test_check_verifies_every_file_the_manifest_lists_whatever_its_dtype(cli_run, exported_copy, capsys):
    # Issue 9: the committed folder plus a float64 ONNX file that manifest.json lists:
    # `--check` verified only the --dtype given (float32 by default), so with that
    # file corrupted it still printed "all 5 artifacts verified".
    out = exported_copy
    shutil.copy(cli_run.out / "dwa_weights_float64.onnx", out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"]["dwa_weights_float64.onnx"] = json.loads((cli_run.out / "manifest.json").read_text())[
        "artifacts"
    ]["dwa_weights_float64.onnx"]
    manifest["artifacts"] = dict(sorted(manifest["artifacts"].items()))
    write_manifest_as_dwa_export_does(out, manifest)
    data = bytearray((out / "dwa_weights_float64.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "dwa_weights_float64.onnx").write_bytes(bytes(data))
    assert main(["--check", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "dwa_weights_float64.onnx: sha256 differs from manifest.json" in captured.err
    assert "1 of 6 artifacts FAILED: dwa_weights_float64.onnx" in captured.err
    for name in manifest["artifacts"]:  # each listed file verified: a line and a table row
        assert f"verify  {out / name}  " in captured.out and captured.out.count(f"\n{name} ") == 1, name


def test_check_compares_every_manifest_field_with_the_file(exported_copy, capsys):
    # Issue 9: only the sha256 was compared, so forged opset, dtype, shape or format passed.
    out = exported_copy
    manifest = json.loads((out / "manifest.json").read_text())
    entries = manifest["artifacts"]
    entries["dwa_weights.onnx"]["opset"] = 19
    entries["dwa_weights_batched.onnx"]["dtype"] = "float64"
    entries["dwa_weights.pt2"]["inputs"][0]["shape"] = ["N", "K"]
    entries["dwa_weights_batched.pt2"]["format"] = "pt2"
    entries["dwa_weights.pt"]["outputs"][0]["shape"] = ["K"]
    write_manifest_as_dwa_export_does(out, manifest)
    assert main(["--check", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    for line in (
        "dwa_weights.onnx: manifest.json says opset is 19, the file has 18",
        "dwa_weights_batched.onnx: manifest.json says dtype is 'float64', the file has 'float32'",
        "dwa_weights.pt2: manifest.json says inputs[0]['shape'] is ['N', 'K'], the file has ['K']",
        "dwa_weights_batched.pt2: manifest.json says format is 'pt2', the file has 'pt2-batched'",
        "dwa_weights.pt: manifest.json says outputs[0]['shape'] is ['K'], the file has ['...', 'K']",
    ):
        assert line in err, line
    assert "sha256" not in err and "5 of 5 artifacts FAILED" in err


def _toolchain_versions(text: str) -> set[int]:
    """The offsets of the toolchain's version strings in a manifest's text."""
    start = text.index('"toolchain": {')
    block = text[start : text.index("}", start)]
    offsets = set()
    for line_start in (start + i + 1 for i, c in enumerate(block) if c == "\n"):
        line = text[line_start : text.index("\n", line_start)]
        if '": "' in line and '"dwa_export"' not in line:
            value = line_start + line.index('": "') + 4
            offsets |= set(range(value, line_start + line.rindex('"')))
    return offsets


def test_every_single_byte_flip_of_a_manifest_is_noticed(exported_copy):
    # Issue 9: 1,174 of 1,625 single-byte flips of a manifest went unnoticed. Each
    # flip of a one-file manifest is now found by the checks --check runs on it,
    # except inside the recorded toolchain versions, which no file carries (--check says so).
    out = exported_copy
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"] = {"dwa_weights.onnx": manifest["artifacts"]["dwa_weights.onnx"]}
    write_manifest_as_dwa_export_does(out, manifest)
    artifact = Artifact("onnx", "float32")
    raw = (out / "manifest.json").read_bytes()

    def noticed() -> bool:
        try:
            text, read = read_manifest_text(out)
        except ValueError:
            return True
        if manifest_problems(text, read):
            return True
        entry = read.get("artifacts", {}).get("dwa_weights.onnx")
        return entry is None or bool(entry_problems(artifact, out / "dwa_weights.onnx", entry))

    assert not noticed()
    missed = []
    for offset in range(len(raw)):
        flipped = bytearray(raw)
        flipped[offset] ^= 1
        (out / "manifest.json").write_bytes(bytes(flipped))
        if not noticed():
            missed.append(offset)
    assert set(missed) <= _toolchain_versions(raw.decode()), [raw[m - 20 : m + 20] for m in missed]
    assert len(raw) > 1000 and len(missed) < 40


def test_check_wants_the_manifest_as_dwa_export_writes_it(exported_copy, capsys):
    # The same fields, re-serialised by another tool: --check says it is not dwa-export's file.
    out = exported_copy
    (out / "manifest.json").write_text(json.dumps(json.loads((out / "manifest.json").read_text())))
    assert main(["--check", "--out", str(out), "--formats", "torchscript", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert (
        "manifest.json: line 1 is not laid out as dwa-export writes it" in err
        and f"{out / 'manifest.json'} FAILED" in err
    )


def test_check_catches_a_rewritten_readme(exported_copy, capsys):
    # Issue 9: exported/README.md was not checked at all.
    out = exported_copy
    (out / "README.md").write_text(PACKAGED_README.decode().replace("ONNX Runtime", "onnxruntime (any version)"))
    # The README is checked whatever --formats chooses: one artifact keeps the test short.
    assert main(["--check", "--out", str(out), "--formats", "torchscript", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert (
        "README.md: differs from the README that dwa_export 0.1.0 writes" in err
        and f"{out / 'README.md'} FAILED" in err
    )
    assert "artifacts FAILED" not in err  # the artifacts themselves passed
    (out / "README.md").unlink()
    assert main(["--check", "--out", str(out), "--formats", "torchscript", "--quiet"]) == 1
    assert "README.md: missing" in capsys.readouterr().err


def test_cli_check_without_artifacts_fails_clearly(tmp_path, capsys):
    assert main(["--check", "--out", str(tmp_path)]) == 1
    assert "manifest.json not found" in capsys.readouterr().err


def test_cli_help_documents_the_io_contract_and_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for fragment in ("dwa_weights_batched.onnx", "temperature [1, 1] or [N, 1]", "--opset", "--check", "Exit status"):
        assert fragment in text
    # Every subcommand, in the usage and the list, with its arguments.
    assert SUBCOMMANDS and "dwa-export bench [--quick] [--artifacts DIR] [--json FILE]" in text
    for command in SUBCOMMANDS:
        assert text.count(f"dwa-export {command.name} {command.usage}") == 2, command.name
        assert command.summary in text
    for bad in (["--opset", "17"], ["--formats", "tflite"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit) as info:
            main(bad)
        assert info.value.code == 2


def test_a_new_subcommand_is_listed_and_dispatched_from_one_place(monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(sys.modules, "fake_module", types.SimpleNamespace(main=lambda argv: calls.append(argv) or 7))
    fake = Subcommand("fake", "STATE [--out FILE]", "do something with a saved state", "fake_module")
    monkeypatch.setattr(cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, fake))
    assert main(["fake", "state.json", "--out", "x.png"]) == 7 and calls == [["state.json", "--out", "x.png"]]
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "dwa-export fake STATE [--out FILE]" in text and "do something with a saved state" in text
    assert "dwa-export bench" in text and "dwa-export plot STATE" in text


@pytest.mark.parametrize("out", ["/proc/dwa-export-test", "/dev/null"])
def test_an_unwritable_output_folder_is_a_one_line_error(out, capsys):
    assert main(["--out", out, "--formats", "onnx"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"dwa-export: error: {out}") and "Traceback" not in captured.err
    assert not Path("/proc/dwa-export-test").exists()


class ClosedPipe(io.StringIO):
    """stdout of `dwa-export | head -0`: the reader has gone."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_does_not_stop_the_export(tmp_path):
    # `dwa-export | head -2` used to end the export at the third line, with exit status 2.
    out = tmp_path / "out"
    with contextlib.redirect_stdout(ClosedPipe()):
        assert main(["--out", str(out), "--formats", "torchscript"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "dwa_weights.pt", "manifest.json"]


def test_cli_check_with_a_malformed_manifest_fails_clearly(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("[1, 2")
    assert main(["--check", "--out", str(tmp_path)]) == 1
    assert "manifest.json is not a manifest dwa-export wrote" in capsys.readouterr().err


# --------------------------------------------------------------------------- the verifier catches wrong artifacts


def write_manifest_as_dwa_export_does(out: Path, manifest: dict) -> None:
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _commit_to_manifest(out: Path, name: str) -> None:
    """Pretend the tampered file is what was exported: only the numbers can give it away."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"][name]["sha256"] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    write_manifest_as_dwa_export_does(out, manifest)


def _scaled_onnx(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """The model with its output multiplied by ``factor``."""
    graph = model.graph
    last = next(node for node in graph.node if "weights" in node.output)
    last.output[list(last.output).index("weights")] = "weights_unscaled"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(factor, np.float32), "scale"))
    graph.node.append(onnx.helper.make_node("Mul", ["weights_unscaled", "scale"], ["weights"]))
    onnx.checker.check_model(model, full_check=True)
    return model


def _unpoisoned_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the NaN poisoning of invalid rows replaced by 0: plausible weights for bad input."""
    graph = model.graph
    last = next(node for node in graph.node if "weights" in node.output)  # Div(exp, mean + poison)
    add = next(node for node in graph.node if node.output[0] == last.input[1])
    assert add.op_type == "Add"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.0, np.float32), "no_poison"))
    add.input[1] = "no_poison"
    onnx.checker.check_model(model, full_check=True)
    return model


class ScaledKernel(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.kernel = DWAWeights()
        self.factor = factor

    def forward(self, loss_t1: torch.Tensor, loss_t2: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        return self.kernel(loss_t1, loss_t2, temperature) * self.factor


class TextbookKernel(torch.nn.Module):
    """K * softmax(r / T) with the temperature check but without the kernel's NaN rows."""

    def forward(self, loss_t1: torch.Tensor, loss_t2: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        if not bool(((temperature > 0) & (temperature < float("inf"))).all()):
            raise ValueError("DWAWeights: temperature must be finite and > 0")
        if loss_t1.shape != loss_t2.shape:
            raise ValueError("same shape")
        rates = loss_t1 / loss_t2
        return torch.softmax(rates / temperature, -1) * rates.size(-1)


@pytest.fixture
def exported_copy(tmp_path) -> Path:
    out = tmp_path / "exported"
    shutil.copytree(EXPORTED, out)
    return out


@pytest.mark.parametrize("name", ["dwa_weights.onnx", "dwa_weights_batched.onnx", "dwa_weights.pt"])
def test_check_fails_on_an_artifact_off_by_1e_4_relative(exported_copy, name, capsys):
    out = exported_copy
    if name.endswith(".onnx"):
        onnx.save(_scaled_onnx(onnx.load(str(out / name)), 1.0001), str(out / name))
        formats = "onnx-batched" if "batched" in name else "onnx"
    else:
        with quiet_exporters():
            torch.jit.save(torch.jit.script(ScaledKernel(1.0001)), str(out / name))
        formats = "torchscript"
    _commit_to_manifest(out, name)
    assert main(["--check", "--out", str(out), "--formats", formats]) == 1
    captured = capsys.readouterr()
    assert "exceeds the bound" in captured.err and f"1 of 1 artifacts FAILED: {name}" in captured.err
    assert "sha256" not in captured.err  # the numbers caught it, not the hash
    row = next(line for line in captured.out.splitlines() if line.startswith(name))
    passed, total = map(int, row.split()[2].split("/"))
    assert passed < total and float(row.split()[3]) > 50 and row.endswith("FAILED")  # 1e-4 / 1e-6: about 100
    # The same file unscaled passes: the factor, nothing else, is what fails.
    if name.endswith(".onnx"):
        shutil.copy(EXPORTED / name, out / name)
        _commit_to_manifest(out, name)
        assert main(["--check", "--out", str(out), "--formats", formats, "--quiet"]) == 0


@pytest.mark.parametrize("name", ["dwa_weights.onnx", "dwa_weights_batched.onnx", "dwa_weights.pt"])
def test_check_fails_on_an_artifact_with_nan_rows_in_the_wrong_places(exported_copy, name, capsys):
    out = exported_copy
    if name.endswith(".onnx"):
        onnx.save(_unpoisoned_onnx(onnx.load(str(out / name))), str(out / name))
        formats = "onnx-batched" if "batched" in name else "onnx"
    else:
        with quiet_exporters():
            torch.jit.save(torch.jit.script(TextbookKernel()), str(out / name))
        formats = "torchscript"
    _commit_to_manifest(out, name)
    assert main(["--check", "--out", str(out), "--formats", formats]) == 1
    err = capsys.readouterr().err
    assert "NaN pattern" in err and f"1 of 1 artifacts FAILED: {name}" in err
    assert "special/loss_t1=0/first" in err  # the first of issue 11's cases that gave plausible weights


# --------------------------------------------------------------------------- commands in new processes (started early)


def start_export_in_another_checkout(folder: Path) -> Started:
    copy = folder / "elsewhere"
    shutil.copytree(ROOT / "dwa_export", copy / "dwa_export")
    script = (
        "import sys, warnings; warnings.simplefilter('ignore');"
        "from dwa_export._export import torchscript_bytes;"
        "sys.stdout.buffer.write(torchscript_bytes())"
    )
    return start(folder, [sys.executable, "-c", script], cwd=folder, env=dict(os.environ, PYTHONPATH=str(copy)))


def test_torchscript_export_is_byte_identical_from_another_checkout(started_early):
    early = started_early["test_torchscript_export_is_byte_identical_from_another_checkout"]
    code, elsewhere, stderr = early.result()
    assert code == 0, stderr.decode()
    copy = early.folder / "elsewhere"
    with quiet_exporters():
        here = torchscript_bytes()
    assert elsewhere == here
    for raw in (here, elsewhere):
        assert str(ROOT).encode() not in raw and str(copy).encode() not in raw and b"site-packages" not in raw
    if toolchain()["torch"] == MANIFEST["toolchain"]["torch"]:
        assert (EXPORTED / "dwa_weights.pt").read_bytes() == here, "exported/dwa_weights.pt is stale: run dwa-export"


def start_main_command_in_a_fresh_clone(folder: Path) -> Started | None:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return None
    clone = folder / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # `python -m dwa_export` is `dwa-export`; from the clone's root it imports the clone's package.
    env = dict(os.environ, PYTHONPATH=str(clone))  # belt and braces: not this checkout's package
    return start(folder, [sys.executable, "-m", "dwa_export"], cwd=clone, env=env)


def test_the_main_command_leaves_a_fresh_clone_clean(started_early):
    # README's main command ends in `dwa-export`: in a fresh clone (of the last
    # commit) it must rewrite exported/ with exactly the committed bytes (manifest included).
    early = started_early["test_the_main_command_leaves_a_fresh_clone_clean"]
    if early is None:
        pytest.skip("not a git checkout")
    code, stdout, stderr = early.result()
    output = stdout.decode() + stderr.decode()
    assert code == 0, output
    assert "all 5 artifacts verified" in stdout.decode()
    assert f"export  exported{os.sep}dwa_weights.pt " in stdout.decode()
    # torch's own progress lines and warnings stay out of the user's terminal.
    for noise in ("[torch.onnx]", "Warning", "torchvision"):
        assert noise not in output, noise
    clone = early.folder / "clone"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True)
    assert status.stdout == "", status.stdout


def start_an_unwritable_export(folder: Path) -> Started:
    return start(folder, [sys.executable, "-m", "dwa_export", "--out", "/proc/x"], cwd=ROOT)


def test_the_cli_process_prints_no_traceback_for_an_os_error(started_early):
    code, stdout, stderr = started_early["test_the_cli_process_prints_no_traceback_for_an_os_error"].result()
    assert code == 2 and stdout == b""
    assert stderr.decode() == "dwa-export: error: /proc/x: No such file or directory\n"


EARLY = {
    "test_torchscript_export_is_byte_identical_from_another_checkout": start_export_in_another_checkout,
    "test_the_main_command_leaves_a_fresh_clone_clean": start_main_command_in_a_fresh_clone,
    "test_the_cli_process_prints_no_traceback_for_an_os_error": start_an_unwritable_export,
}
