"""Writing the kernel as TorchScript, ONNX and ``torch.export`` artifacts.

The artifacts and their I/O contract (``K`` and ``N`` are symbolic):

=========================  =====================================  =====================
file                       inputs                                 output
=========================  =====================================  =====================
dwa_weights.pt             [..., K], [..., K], T broadcastable    weights [..., K]
dwa_weights.onnx           loss_t1 [K], loss_t2 [K], T []         weights [K]
dwa_weights_batched.onnx   loss_t1 [N, K], loss_t2 [N, K],        weights [N, K]
                           T [1, 1] or [N, 1]
dwa_weights.pt2            [K], [K], T []                         weights [K]
dwa_weights_batched.pt2    [N, K], [N, K], T [N, 1]               weights [N, K]
=========================  =====================================  =====================

float32 by default; other dtypes get a ``_float64`` / ``_float16`` suffix
(TorchScript is dtype-generic, one file serves all).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import platform
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._kernel import DWAWeights

__all__ = ["Artifact", "FORMATS", "DTYPES", "export_artifact", "plan", "write_atomically", "write_manifest"]

FORMATS = ("torchscript", "onnx", "onnx-batched", "pt2", "pt2-batched")
DTYPES = ("float32", "float64", "float16")
DEFAULT_OPSET = 18
# The dynamo exporter emits opset 18 and up; below 18 it silently leaves the model at 18.
MIN_OPSET = 18


def _max_opset() -> int:
    """The newest opset torch's ONNX exporter writes. No public API says it: this reads the private
    ``torch.onnx._constants`` (tests/test_export.py fails if torch moves it), else assumes 23."""
    return int(getattr(getattr(torch.onnx, "_constants", None), "ONNX_MAX_OPSET", 23))


MAX_OPSET = _max_opset()
MODEL_VERSION = 1  # bump when the kernel's I/O contract changes
INPUT_NAMES = ("loss_t1", "loss_t2", "temperature")
OUTPUT_NAMES = ("weights",)
MANIFEST = "manifest.json"
README = "README.md"

_ONNX_DOC = (
    "Dynamic Weight Average weights (Liu et al., CVPR 2019): "
    "w_k = K * exp(r_k / T) / sum_j exp(r_j / T), r_k = loss_t1[k] / loss_t2[k], over the last axis. "
    "Weights are positive and sum to K. A row is NaN when its temperature is not finite and > 0, when "
    "either loss has a zero, NaN or infinite entry, when a task's loss changed sign (one negative, one "
    "positive), or when a rate over- or underflows the dtype: every rate must be finite and > 0. "
    "loss_t1 and loss_t2 must have the same shape (they are concatenated, never broadcast). "
    "Produced by dwa_export."
)
_IO_DOCS = {
    "loss_t1": "Epoch-average task losses of epoch t-1, last axis K.",
    "loss_t2": "Epoch-average task losses of epoch t-2, same shape as loss_t1.",
    "temperature": "Softmax temperature T > 0 (paper default 2.0).",
    "weights": "DWA task weights, same shape as loss_t1, summing to K over the last axis.",
}
_BATCHED_TEMPERATURE_DOC = "Softmax temperature T > 0: shape [1, 1] (one T for all rows) or [N, 1] (one T per row)."
# ONNX needs a fixed input rank (onnx.checker's full check and ONNX Runtime reject
# a rank-free input), so the batched file takes T as [N_or_1, 1], not [].
_TEMPERATURE_ROWS = "N_or_1"


@dataclass(frozen=True)
class Artifact:
    """One file to write: its format, dtype (``None``: dtype-generic) and name."""

    format: str
    dtype: str | None

    @property
    def batched(self) -> bool:
        return self.format.endswith("-batched")

    @property
    def filename(self) -> str:
        if self.format == "torchscript":
            return "dwa_weights.pt"
        stem = "dwa_weights_batched" if self.batched else "dwa_weights"
        suffix = "" if self.dtype == "float32" else f"_{self.dtype}"
        return stem + suffix + (".onnx" if self.format.startswith("onnx") else ".pt2")


def plan(formats: Sequence[str] = FORMATS, dtypes: Sequence[str] = ("float32",)) -> list[Artifact]:
    """The artifacts for ``formats`` x ``dtypes``, in a stable order."""
    artifacts = []
    for fmt in FORMATS:
        if fmt not in formats:
            continue
        if fmt == "torchscript":
            artifacts.append(Artifact(fmt, None))
        else:
            artifacts.extend(Artifact(fmt, dtype) for dtype in DTYPES if dtype in dtypes)
    return artifacts


@contextlib.contextmanager
def quiet_exporters(verbose: bool = False) -> Iterator[None]:
    """Keep the exporters' progress lines and warnings off the user's terminal.

    Scoped to our own export and verification code: torch.jit's deprecation
    warnings (TorchScript is still what LibTorch loads; see README.md) and the
    dynamo exporter's internal warnings and logging are hidden here only.
    """
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def example_inputs(artifact: Artifact, for_export: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Distinct sizes >= 2 so that torch.export does not specialise N or K.
    dtype = getattr(torch, artifact.dtype or "float32")
    shape = (3, 4) if artifact.batched else (4,)
    loss_t2 = torch.linspace(1.0, 2.0, shape[-1], dtype=dtype).expand(shape).contiguous()
    loss_t1 = loss_t2 * 0.8
    temperature = torch.tensor(2.0, dtype=dtype)
    if artifact.batched:
        temperature = temperature.expand(shape[0], 1).contiguous()
    return loss_t1, loss_t2, temperature


def _exported_program(artifact: Artifact) -> torch.export.ExportedProgram:
    tasks = torch.export.Dim("K", min=1)
    if artifact.batched:
        rows = torch.export.Dim("N", min=1)
        losses: dict[int, Any] = {0: rows, 1: tasks}
        temperature = {0: rows}
    else:
        losses, temperature = {0: tasks}, None
    program = torch.export.export(
        DWAWeights().eval(),
        example_inputs(artifact),
        dynamic_shapes={"loss_t1": losses, "loss_t2": losses, "temperature": temperature},
    )
    for node in program.graph.nodes:  # source paths would make files depend on the checkout
        node.meta.pop("stack_trace", None)
    return program


def _finalize_onnx(model: Any, batched: bool) -> Any:
    """Document the model and strip everything path-, time- or exporter-dependent."""
    model.producer_name = "dwa_export"
    model.producer_version = __version__
    model.model_version = MODEL_VERSION
    model.doc_string = _ONNX_DOC
    del model.metadata_props[:]
    graph = model.graph
    graph.name = "dwa_weights"
    graph.doc_string = ""
    del graph.value_info[:]  # intermediate shapes; runtimes infer them
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    # The exporter names dynamic dims after its internal symbols (s53, ...).
    loss_t1 = next(value for value in graph.input if value.name == "loss_t1")
    names = dict(
        zip((d.dim_param for d in loss_t1.type.tensor_type.shape.dim), ("N", "K") if batched else ("K",), strict=True)
    )
    for value in (*graph.input, *graph.output):
        del value.metadata_props[:]
        value.doc_string = _IO_DOCS[value.name]
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = names[dim.dim_param]
    if batched:
        # One T for all rows ([1, 1]) or one per row ([N, 1]).
        temperature = next(value for value in graph.input if value.name == "temperature")
        temperature.type.tensor_type.shape.dim[0].dim_param = _TEMPERATURE_ROWS
        temperature.doc_string = _BATCHED_TEMPERATURE_DOC
    return model


def export_artifact(artifact: Artifact, out_dir: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write one artifact into ``out_dir`` and return its path.

    The bytes are built in memory first, then written with :func:`write_atomically`:
    an unwritable ``out_dir`` raises ``OSError`` and leaves the file as it was.
    """
    path = out_dir / artifact.filename
    if artifact.format == "torchscript":
        data = torchscript_bytes()
    elif artifact.format.startswith("pt2"):
        program = _exported_program(artifact)
        data = _saved_bytes(lambda target: torch.export.save(program, target), artifact.filename)
    else:
        data = onnx_bytes(artifact, opset)
    return write_atomically(path, data)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def write_atomically(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` by renaming a finished file over it.

    The bytes go to a temporary file in the same folder, which ``os.replace``
    then renames to ``path``: a symlink at ``path`` is replaced, never followed
    (its target is left alone), and an interrupted or failed write leaves
    ``path`` as it was, old or new, never half-written. The file gets the mode
    a plain write would give it (0o666 less the umask). ``OSError`` names ``path``.
    """
    temporary: str | None = None
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
        temporary = None
    except OSError as error:  # the temporary file's name would only confuse: name the file
        if error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from None
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
    return path


def _saved_bytes(save: Callable[[str], object], filename: str) -> bytes:
    """What ``save(path)`` writes, via a scratch file named ``filename``.

    torch's archive writers name the archive's top folder after the file (e.g.
    ``dwa_weights_batched/``), so saving under the final name keeps the bytes
    independent of where they are written.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / filename
        save(str(path))
        return path.read_bytes()


def _binunicode(text: str) -> bytes:
    """A string as pickle's BINUNICODE opcode writes it: ``X``, uint32 length, UTF-8."""
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _portable_debug_info(data: bytes) -> bytes | None:
    """TorchScript's source-range record with our source files named relative to the package's parent.

    The record (``*.debug_pkl``) keeps the original source for tracebacks, and
    each file's absolute path on the exporting machine. Each such path is one
    string in the record's string table, so replacing that one opcode keeps the
    pickle valid (its memo counts opcodes, not bytes). ``None`` when that is not
    possible (a torch that changed the format): then the record is dropped,
    which TorchScript allows (tracebacks then show the serialized code).
    """
    try:
        kind, table, _ = pickle.loads(data)  # our own fresh record: tuples, strings, ints
    except Exception:  # noqa: BLE001 - any unpickling problem means: drop the record
        return None
    if kind != "FORMAT_WITH_STRING_TABLE":
        return None
    package_parent = Path(__file__).resolve().parent.parent
    for text in sorted({t for t in table if isinstance(t, str) and t and not t.endswith("\n")}):
        try:
            source = Path(text).resolve()
            relative = source.relative_to(package_parent)
        except (OSError, ValueError):
            continue
        if not source.is_file():
            continue
        old = _binunicode(text)
        if data.count(old) != 1:
            return None
        data = data.replace(old, _binunicode(relative.as_posix()))
    if str(package_parent).encode() in data:
        return None
    return data


def torchscript_bytes() -> bytes:
    """The scripted kernel as a ``.pt`` archive, byte-reproducible for a given torch.

    ``torch.jit.save`` stores the exporting machine's source path in the
    ``*.debug_pkl`` records, and a serialization id derived from the records'
    contents (so from that path too). The archive is rewritten record by record
    with torch's own writer (``PyTorchFileWriter``, which computes the id from
    the new contents): the same records, with the path made relative to the
    package's parent (``dwa_export/_kernel.py``). The archive's folder name is
    ``dwa_weights``, whatever file the bytes end up in.
    """
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(DWAWeights()), buffer)
    reader = torch._C.PyTorchFileReader(io.BytesIO(buffer.getvalue()))

    def rewrite(target: str) -> None:
        writer = torch._C.PyTorchFileWriter(target)
        for name in reader.get_all_records():
            if name in (".data/serialization_id", "byteorder"):  # written by write_end_of_file
                continue
            data = reader.get_record(name)
            if name.endswith(".debug_pkl"):
                portable = _portable_debug_info(data)
                if portable is None:
                    continue
                data = portable
            writer.write_record(name, data, len(data))
        writer.write_end_of_file()

    return _saved_bytes(rewrite, "dwa_weights.pt")


def onnx_bytes(artifact: Artifact, opset: int = DEFAULT_OPSET) -> bytes:
    """The serialised ONNX model: deterministic for a given toolchain."""
    import onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"ONNX opset {opset} is not supported: the dynamo exporter writes opsets "
            f"{MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})"
        )
    program = torch.onnx.export(
        _exported_program(artifact),
        dynamo=True,
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        opset_version=opset,
        optimize=True,
        verbose=False,
        external_data=False,
    )
    assert program is not None  # dynamo=True always returns the program
    model = _finalize_onnx(program.model_proto, artifact.batched)
    onnx.checker.check_model(model, full_check=True)
    serialized: bytes = model.SerializeToString(deterministic=True)
    return serialized


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache  # reading a distribution's metadata scans sys.path; --check asks often
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def toolchain() -> dict[str, str | None]:
    """The versions of what produces the artifacts, as manifest.json records them."""
    return {
        "dwa_export": __version__,
        "torch": torch.__version__,
        "onnx": _version("onnx"),
        "onnxscript": _version("onnxscript"),
        "onnxruntime": _version("onnxruntime"),
        "python": platform.python_version(),
    }


def describe(artifact: Artifact, path: Path) -> dict[str, Any]:
    """The manifest entry of one written artifact, read back from the file where possible."""
    entry: dict[str, Any] = {"sha256": sha256(path), "format": artifact.format, "dtype": artifact.dtype}
    if artifact.format.startswith("onnx"):
        import onnx

        model = onnx.load(str(path))
        entry["opset"] = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        entry["ir_version"] = model.ir_version
        entry["model_version"] = model.model_version

        def io(values: Any) -> list[dict[str, Any]]:
            out = []
            for value in values:
                tensor = value.type.tensor_type
                shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
                out.append(
                    {
                        "name": value.name,
                        "shape": shape,
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                    }
                )
            return out

        entry["inputs"], entry["outputs"] = io(model.graph.input), io(model.graph.output)
    elif artifact.format.startswith("pt2"):
        entry["inputs"], entry["outputs"] = _program_io(path)
    else:  # TorchScript is dtype- and rank-generic: the file records neither
        dtype = "float16 | bfloat16 | float32 | float64"
        shapes = (["...", "K"], ["...", "K"], "broadcastable to [..., 1]", ["...", "K"])
        entry["inputs"] = [
            {"name": n, "shape": s, "dtype": dtype} for n, s in zip(INPUT_NAMES, shapes[:3], strict=True)
        ]
        entry["outputs"] = [{"name": OUTPUT_NAMES[0], "shape": shapes[3], "dtype": dtype}]
    return entry


def _program_io(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The inputs and outputs of a saved ``torch.export`` program, read from its graph.

    Symbolic sizes are named as in the contract: loss_t1's are ``N, K`` (batched)
    or ``K``, and the same symbols elsewhere get the same names.
    """
    with quiet_exporters():
        program = torch.export.load(str(path))
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    inputs = [(name, placeholders[name].meta["val"]) for name in program.graph_signature.user_inputs]
    output = next(node for node in program.graph.nodes if node.op == "output")
    outputs = [(OUTPUT_NAMES[0], value.meta["val"]) for value in output.args[0]]
    first = [dim for dim in inputs[0][1].shape if not isinstance(dim, int)] if inputs else []
    names = {str(dim): name for dim, name in zip(first, ("N", "K") if len(first) == 2 else ("K",), strict=True)}

    def describe_values(values: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "shape": [dim if isinstance(dim, int) else names.get(str(dim), str(dim)) for dim in value.shape],
                "dtype": str(value.dtype).removeprefix("torch."),
            }
            for name, value in values
        ]

    return describe_values(inputs), describe_values(outputs)


def write_manifest(out_dir: Path, artifacts: Sequence[Artifact]) -> Path:
    """Record what was written, with hashes and the producing toolchain.

    Entries already in the manifest for files not rewritten now are kept.
    """
    path = out_dir / MANIFEST
    try:
        manifest = read_manifest(out_dir) or {}
    except ValueError:  # not one we wrote: start afresh
        manifest = {}
    entries = dict(manifest.get("artifacts", {}))
    for artifact in artifacts:
        entries[artifact.filename] = describe(artifact, out_dir / artifact.filename)
    manifest = {
        "generator": f"dwa_export {__version__}",
        "contract": "see README.md beside this file",
        "toolchain": toolchain(),
        "artifacts": dict(sorted(entries.items())),
    }
    return write_atomically(path, manifest_text(manifest).encode())


def manifest_text(manifest: dict[str, Any]) -> str:
    """``manifest.json``'s exact text for ``manifest``: --check compares the file with it."""
    return json.dumps(manifest, indent=2) + "\n"


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The manifest in ``out_dir``; ``None`` if there is none, ``ValueError`` if it is malformed."""
    read = read_manifest_text(out_dir)
    return None if read is None else read[1]


def read_manifest_text(out_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """The manifest in ``out_dir`` as text and as read; ``None`` if there is none, ``ValueError`` if it is malformed."""
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    text = path.read_bytes().decode("utf-8")  # UnicodeDecodeError is a ValueError
    try:
        manifest = json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts", {}), dict):
        raise ValueError("expected a JSON object with an 'artifacts' object")
    return text, manifest


def write_readme(out_dir: Path) -> Path:
    """Copy the artifacts' README (I/O contract and loading snippets) beside them."""
    return write_atomically(out_dir / README, packaged_readme())


def packaged_readme() -> bytes:
    """The README that ``dwa-export`` writes beside the artifacts, as packaged."""
    return resources.files("dwa_export").joinpath("exported_readme.md").read_bytes()
