"""``dwa-export``: write the kernel's artifacts and verify each one in its own runtime."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SUBCOMMANDS", "Subcommand", "main"]


@dataclass(frozen=True)
class Subcommand:
    """A ``dwa-export NAME ...`` command: ``module.main(argv)`` gets the arguments after NAME."""

    name: str
    usage: str  # the arguments after the name, as --help shows them
    summary: str
    module: str

    def run(self, argv: Sequence[str]) -> int:
        status: int = importlib.import_module(self.module).main(list(argv))
        return status


# Every subcommand, in the order --help lists them. Add one here and it is
# dispatched and documented.
SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "bench",
        "[--quick] [--artifacts DIR] [--json FILE]",
        "time the per-batch overhead, the kernel in every runtime, batched throughput and start-up",
        "dwa_export._bench",
    ),
    Subcommand(
        "plot",
        "STATE [-o FILE] [--csv]",
        "draw a checkpoint's per-epoch DWA weights and losses (needs dwa-export[plot]), or print them as CSV",
        "dwa_export._plot",
    ),
)

_CONTRACT = """\
I/O contract (K tasks, N rows; K and N are symbolic, chosen at run time):
  dwa_weights.pt            TorchScript  loss_t1 [..., K], loss_t2 [..., K], temperature broadcastable
                                         to [..., 1] -> weights [..., K]; any float dtype
  dwa_weights.onnx          ONNX         loss_t1 [K], loss_t2 [K], temperature [] -> weights [K]
  dwa_weights_batched.onnx  ONNX         loss_t1 [N, K], loss_t2 [N, K], temperature [1, 1] or [N, 1]
                                         -> weights [N, K]
  dwa_weights.pt2           torch.export loss_t1 [K], loss_t2 [K], temperature [] -> weights [K]
  dwa_weights_batched.pt2   torch.export loss_t1 [N, K], loss_t2 [N, K], temperature [N, 1]
                                         -> weights [N, K]
  weights = K * softmax(loss_t1 / loss_t2 / temperature) over the last axis; they sum to K.
  loss_t1/loss_t2 of different shapes are an error. Invalid temperatures (not finite and > 0)
  raise in TorchScript and give NaN rows elsewhere. A row whose losses include a zero, NaN or
  infinity, or change sign between the epochs, is NaN everywhere (every rate must be finite, > 0).
  float32 files by default; --dtype float64/float16 add *_float64 / *_float16 files.
Exit status: 0 when every artifact passed, 1 when any check failed, 2 on bad arguments
(an output folder that cannot be written included).
"""


def _subcommands_help() -> str:
    width = max(len(f"dwa-export {c.name} {c.usage}") for c in SUBCOMMANDS)
    lines = ["subcommands (dwa-export NAME --help for each one's options):"]
    lines += [f"  {f'dwa-export {c.name} {c.usage}':<{width}}  {c.summary}" for c in SUBCOMMANDS]
    return "\n".join(lines) + "\n"


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    from ._export import DEFAULT_OPSET, DTYPES, FORMATS, MAX_OPSET, MIN_OPSET

    parser = argparse.ArgumentParser(
        prog="dwa-export",
        description=(
            "Export the Dynamic Weight Average kernel as TorchScript, ONNX and torch.export "
            "artifacts, then load each in its own runtime and compare it with a float64 reference."
        ),
        epilog=_subcommands_help() + "\n" + _CONTRACT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.usage = "%(prog)s [options]\n" + "".join(f"       %(prog)s {c.name} {c.usage}\n" for c in SUBCOMMANDS)
    parser.add_argument("-o", "--out", type=Path, default=Path("exported"), help="output directory (default: exported)")
    parser.add_argument(
        "--formats",
        type=_csv(FORMATS),
        default=None,
        help=f"comma-separated subset of {','.join(FORMATS)} (default: all; with --check: all that the manifest lists)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: {DEFAULT_OPSET})",
    )
    parser.add_argument(
        "--dtype",
        dest="dtypes",
        type=_csv(DTYPES),
        default=None,
        help=(
            f"comma-separated dtypes of the ONNX/torch.export files: {','.join(DTYPES)} "
            "(default: float32; with --check: all that the manifest lists)"
        ),
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=(
            "verify the existing folder without rewriting it: every artifact manifest.json lists (in its runtime, "
            "and each manifest field against the file), manifest.json itself, and README.md"
        ),
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print only failures")
    verbosity.add_argument(
        "-v", "--verbose", action="store_true", help="also show the exporters' own output and every failing case"
    )
    return parser


def _format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.1f}"


def _us(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e6:.0f}"


_LEGEND = (
    "err/bound: worst |weights - float64 reference| / that case's bound (1e-6 float32, 1e-12 float64 "
    "where |r/T| ~ 1, wider when ill-conditioned); <= 1 passes, and NaN rows must match exactly."
)


# What a command needs beyond the base install, and the extra that brings it.
_OPTIONAL = {"torch", "onnx", "onnxscript", "onnxruntime"}


def main(argv: Sequence[str] | None = None) -> int:
    """``dwa-export``: export and verify (or run a subcommand); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except ModuleNotFoundError as error:  # an install without the extra this command needs: one line
        missing = (error.name or "").split(".")[0]
        if missing not in _OPTIONAL:
            raise
        extra = "torch" if argv[:1] == ["plot"] else "export"
        print(
            f'dwa-export: error: this needs {missing}, which is not installed: pip install "dwa-export[{extra}]" '
            "(on a machine without a CUDA GPU, install torch's CPU build first: see README.md)",
            file=sys.stderr,
        )
        return 2


def _main(argv: list[str]) -> int:
    for command in SUBCOMMANDS:
        if argv[:1] == [command.name]:
            return command.run(argv[1:])
    args = build_parser().parse_args(argv)
    from ._export import MAX_OPSET, MIN_OPSET

    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        build_parser().error(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {args.opset}")
    try:
        return _export_and_verify(args)
    except OSError as error:  # an unwritable or unreadable --out: one line, no traceback
        where = error.filename if error.filename is not None else args.out
        print(f"dwa-export: error: {where}: {error.strerror or error}", file=sys.stderr)
        return 2


def _export_and_verify(args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        if not args.quiet:
            try:
                print(message, flush=True)
            except BrokenPipeError:  # e.g. dwa-export | head: the reader has all it wants; the work goes on
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
                args.quiet = True

    from ._export import (
        DTYPES,
        FORMATS,
        MANIFEST,
        README,
        export_artifact,
        plan,
        quiet_exporters,
        read_manifest_text,
        toolchain,
        write_manifest,
        write_readme,
    )
    from ._verify import manifest_problems, readme_problems, verify

    out: Path = args.out
    if not args.check:
        artifacts = plan(args.formats or FORMATS, args.dtypes or ["float32"])
        out.mkdir(parents=True, exist_ok=True)
        for artifact in artifacts:
            start = time.perf_counter()
            with quiet_exporters(args.verbose):
                export_artifact(artifact, out, args.opset)
            detail = artifact.format + (f", {artifact.dtype}" if artifact.dtype else "")
            if artifact.format.startswith("onnx"):
                detail += f", opset {args.opset}"
            say(f"export  {out / artifact.filename}  ({detail})  {time.perf_counter() - start:.2f} s")
        say(f"wrote   {write_manifest(out, artifacts)}")
        say(f"wrote   {write_readme(out)}")

    try:
        read = read_manifest_text(out)
    except ValueError as error:  # json.JSONDecodeError, not UTF-8, or not an object
        print(f"dwa-export: error: {out / MANIFEST} is not a manifest dwa-export wrote: {error}", file=sys.stderr)
        return 1
    if read is None:
        print(f"dwa-export: error: {out / MANIFEST} not found; run dwa-export without --check first", file=sys.stderr)
        return 1
    text, manifest = read
    listed = list(manifest.get("artifacts", {}))
    if args.check:
        # Every file the manifest lists, and any other artifact in the folder (which
        # then fails as unlisted); --formats and --dtype narrow the choice only when given.
        present = {a.filename for a in plan(FORMATS, DTYPES) if os.path.lexists(out / a.filename)}
        artifacts = [
            a
            for a in plan(args.formats or FORMATS, args.dtypes or DTYPES)
            if a.filename in listed or a.filename in present
        ]
        if not artifacts:
            chosen = " matching --formats/--dtype" if args.formats or args.dtypes else ""
            print(f"dwa-export: error: {out / MANIFEST} lists no artifact{chosen}: nothing to verify", file=sys.stderr)
            return 1
    case_dtypes = args.dtypes or (DTYPES if args.check else ["float32"])

    def report(name: str, what: str, problems: list[str]) -> None:
        say(f"{what}  {'ok' if not problems else 'FAILED'}")
        shown = problems if args.verbose else problems[:5]
        for problem in shown:
            print(f"        {name}: {problem}", file=sys.stderr)
        if len(shown) < len(problems):
            print(f"        ... and {len(problems) - len(shown)} more (--verbose shows all)", file=sys.stderr)

    results = []
    for artifact in artifacts:
        result = verify(out, artifact, manifest, case_dtypes)
        results.append(result)
        report(
            artifact.filename,
            f"verify  {out / artifact.filename}  with {result.runtime}: {result.cases} cases",
            result.problems,
        )
    recorded = manifest.get("toolchain")
    exported_by = recorded.get("dwa_export") if isinstance(recorded, dict) else None
    manifest_failures = manifest_problems(text, manifest)
    report(MANIFEST, f"check   {out / MANIFEST}  fields and layout", manifest_failures)
    readme_failures = readme_problems(out, exported_by)
    report(README, f"check   {out / README}  against the packaged README", readme_failures)

    rows = [["artifact", "runtime", "cases passed", "err/bound", "load ms", "call us", "status"]]
    for r in results:
        rows.append(
            [
                r.filename,
                r.runtime,
                f"{r.cases - r.failed_cases}/{r.cases}",
                f"{r.worst_ratio:.2f}",
                _ms(r.load_s),
                _us(r.call_s),
                "ok" if r.ok else "FAILED",
            ]
        )
    say("")
    say(_format_table(rows))
    say(_LEGEND)
    failed = [r.filename for r in results if not r.ok]
    if failed or manifest_failures or readme_failures:
        print("", file=sys.stderr)
        if failed:
            print(f"{len(failed)} of {len(results)} artifacts FAILED: {', '.join(failed)}", file=sys.stderr)
        for path, failures in ((out / MANIFEST, manifest_failures), (out / README, readme_failures)):
            if failures:
                print(f"{path} FAILED", file=sys.stderr)
        return 1
    verified = {r.filename for r in results}
    skipped = [name for name in listed if name not in verified]
    if not args.check:
        which = "every file this run wrote"
        if skipped:
            earlier = f"listed in {MANIFEST} from an earlier run (--check verifies them)"
            which += f"; not verified: {', '.join(skipped)}, {earlier}"
    elif skipped:
        which = f"those --formats/--dtype chose; not verified: {', '.join(skipped)}"
    else:
        which = f"every file {out / MANIFEST} lists"
    say(f"\nall {len(results)} artifacts verified against the float64 reference, each in its own runtime: {which}")
    say(
        f"also verified: every field of their {MANIFEST} entries against the files, {MANIFEST}'s own fields "
        f"and layout, and {README} against the one dwa_export {toolchain()['dwa_export']} writes"
    )
    if args.check and isinstance(recorded, dict):
        versions = ", ".join(f"{name} {version}" for name, version in recorded.items() if name != "dwa_export")
        say(f"not verifiable: the toolchain {MANIFEST} records ({versions}); no file carries it")
        running = {name: version for name, version in toolchain().items() if recorded.get(name) != version}
        if running:
            say("note: this check ran with " + ", ".join(f"{name} {version}" for name, version in running.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
