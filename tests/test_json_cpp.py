"""dwa/json.hpp against Python's json module: the same texts accepted, the same text written.

Python's side of every comparison is ``json.dumps(json.loads(data.decode("utf-8")))``,
the decode failing counting as a reject (Python parses text, not bytes). The C++
side is tests/cpp/json_driver, built in test_cpp.py's shared build directory.

- tests/json_corpus/{valid,invalid}/*.json: small hand-picked cases, exact bytes
  (some are invalid UTF-8 or hold raw control characters: see .gitattributes);
- nesting 100,000 deep, generated here: a clean error, no stack overflow;
- a differential fuzz (hypothesis): generated documents in many spellings, and
  those documents with bytes flipped, inserted, deleted or cut off.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_cpp import build_dir, cmake_build  # skips (or fails in CI) without cmake/g++

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "json_corpus"
CASES = sorted(CORPUS.glob("*/*.json"))
PYTHON_INT_DIGITS = 4300  # Python's default int_max_str_digits, which json.loads obeys, as does dwa::json::Options

if not hasattr(sys, "set_int_max_str_digits"):  # Python 3.10.0 to 3.10.6 read integers of any length
    pytest.skip("this Python has no int_max_str_digits limit for dwa::json to agree with", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def python_int_limit():
    """Pin Python's int digit limit to its default (PYTHONINTMAXSTRDIGITS could change it)."""
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(PYTHON_INT_DIGITS)
    yield
    sys.set_int_max_str_digits(before)


@pytest.fixture(scope="module")
def driver() -> Path:
    # The options of test_cpp.py's configure step: whichever test configures the shared directory first.
    build = cmake_build(build_dir(), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", target="json_driver")
    return build / "json_driver"


def repr_is_exact(value) -> bool:
    """Whether dwa::json::repr promises Python's repr for the value: it escapes what Python does
    up to U+00FF and lone surrogates, and writes everything else as is, as Python does if printable."""
    if isinstance(value, str):
        return all(ord(c) <= 0xFF or 0xD800 <= ord(c) <= 0xDFFF or c.isprintable() for c in value)
    if isinstance(value, list):
        return all(map(repr_is_exact, value))
    if isinstance(value, dict):
        return all(repr_is_exact(k) and repr_is_exact(v) for k, v in value.items())
    return True


def python_side(data: bytes) -> str | None:
    """json.dumps(json.loads(text)), or None where Python rejects the bytes."""
    try:
        return json.dumps(json.loads(data.decode("utf-8")))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None


def parse_line(line: bytes) -> tuple[str, str]:
    """("ok", canonical[\trepr]), ("error", message), or ("fail", message) if the writer threw (a bug)."""
    status, _, payload = line.rstrip(b"\n").partition(b" ")
    return status.decode(), payload.decode("utf-8")


def run_files(driver: Path, paths: list[Path], *flags: str) -> list[tuple[str, str]]:
    result = subprocess.run([str(driver), *flags, *map(str, paths)], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()  # a crash (e.g. a stack overflow) is -11 here
    lines = result.stdout.splitlines(keepends=True)
    assert len(lines) == len(paths), result.stdout[-2000:]
    return [parse_line(line) for line in lines]


class Stream:
    """One json_driver process for many texts: a record in, a line out."""

    def __init__(self, driver: Path, *flags: str):
        self.process = subprocess.Popen([str(driver), *flags], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def __call__(self, data: bytes) -> tuple[str, str]:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(b"%d\n" % len(data) + data)
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"json_driver died (exit status {self.process.wait()}) on {data!r}")
        return parse_line(line)

    def close(self) -> None:
        assert self.process.stdin
        self.process.stdin.close()
        assert self.process.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def stream(driver):
    process = Stream(driver, "--repr")
    yield process
    process.close()


# --------------------------------------------------------------------------- the shared corpus


@pytest.fixture(scope="module")
def corpus_results(driver) -> dict[Path, tuple[str, str]]:
    return dict(zip(CASES, run_files(driver, CASES, "--repr")))  # one process for the whole corpus


def test_the_corpus_has_both_kinds_of_case():
    valid = [p for p in CASES if p.parent.name == "valid"]
    invalid = [p for p in CASES if p.parent.name == "invalid"]
    assert len(valid) >= 40 and len(invalid) >= 60, (len(valid), len(invalid))
    assert {p.parent.name for p in CASES} == {"valid", "invalid"}


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_corpus_case(path, corpus_results):
    data = path.read_bytes()
    want = python_side(data)
    # The folder says what Python does; a case in the wrong folder tests nothing.
    assert (want is not None) == (path.parent.name == "valid"), f"Python {'accepts' if want else 'rejects'} {data!r}"
    status, payload = corpus_results[path]
    if want is None:
        assert status == "error", f"C++ accepts what Python rejects: {data[:200]!r} -> {status} {payload[:200]}"
        assert re.fullmatch(r"not valid JSON \(.+ at offset \d+\)", payload), payload
    else:
        assert status == "ok", f"C++ rejects what Python accepts: {data[:200]!r}: {payload}"
        canonical, _, cpp_repr = payload.partition("\t")
        assert canonical == want
        value = json.loads(data.decode("utf-8"))
        if repr_is_exact(value):
            assert cpp_repr == repr(value)


# --------------------------------------------------------------------------- errors


def test_errors_say_what_and_where_after_the_callers_prefix(driver, tmp_path):
    cases = {
        b"01": "extra data after the value at offset 1",
        b'{"a": "x\ny"}': "invalid control character in string at offset 8",
        b'"\\y"': "invalid \\escape at offset 1",
        b'"\\u00e"': "invalid \\uXXXX escape at offset 1",
        b'["ok", "caf\xe9"]': "invalid UTF-8 at offset 11",
        b"[1,]": "expected a value at offset 3",
        b"": "expected a value, got the end of the text at offset 0",
        b"1" * 4301: "integer literal with more than 4300 digits at offset 0",
    }
    paths = []
    for i, data in enumerate(cases):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_bytes(data)
    prefix = "malformed DWA history state_dict: "
    got = run_files(driver, paths, f"--prefix={prefix}")
    assert got == [("error", f"{prefix}not valid JSON ({what})") for what in cases.values()]


def test_nesting_is_bounded_with_a_clean_error(driver, tmp_path):
    deep = 100_000
    texts = {
        "arrays_unclosed": b"[" * deep,
        "arrays": b"[" * deep + b"]" * deep,
        "objects": b'{"a":' * deep + b"1" + b"}" * deep,
        "mixed": b'[{"a":' * (deep // 2) + b"[]" + b"}]" * (deep // 2),
        "at_the_bound": b"[" * 256 + b"]" * 256,
        "one_past_the_bound": b"[" * 257 + b"]" * 257,
    }
    paths = []
    for name, data in texts.items():
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_bytes(data)
    got = dict(zip(texts, run_files(driver, paths)))
    too_deep = ("error", "not valid JSON (nesting deeper than 256 arrays and objects at offset 256)")
    assert got["arrays_unclosed"] == got["arrays"] == too_deep
    assert got["objects"] == ("error", "not valid JSON (nesting deeper than 256 arrays and objects at offset 1280)")
    assert got["mixed"][0] == "error" and "nesting deeper than 256" in got["mixed"][1]
    assert got["at_the_bound"] == ("ok", "[" * 256 + "]" * 256)
    assert got["one_past_the_bound"] == ("error", "not valid JSON (nesting deeper than 256 arrays and objects at offset 256)")
    # Python rejects the deep texts too (RecursionError), so the two still agree on them;
    # between 257 and Python's recursion limit (about 1000) they differ on purpose.
    for name in ("arrays_unclosed", "arrays", "objects", "mixed"):
        assert python_side(texts[name]) is None, name
    # The bound is an option: the same text at a higher bound is fine.
    assert run_files(driver, paths[-1:], "--max-depth=300") == [("ok", "[" * 257 + "]" * 257)]


# --------------------------------------------------------------------------- numbers


def test_integers_are_exact_and_read_into_64_bits_only_when_they_fit(driver, tmp_path):
    literals = [
        "0", "-0", "1", "-1", "9007199254740993", "9223372036854775807", "9223372036854775808", "-9223372036854775808",
        "-9223372036854775809", "18446744073709551615", "18446744073709551616", "1" + "0" * 308, "1" + "0" * 309,
        "17976931348623158" + "0" * 292, "17976931348623159" + "0" * 292, "-" + "9" * 4300,
        "1.5", "-0.0", "1e400", "NaN",
    ]  # fmt: skip

    def expected(literal: str) -> tuple[str, str]:
        value = json.loads(literal)
        if isinstance(value, float):
            return ("ok", f"{json.dumps(value)}\t{value!r}\t-\t-\t{json.dumps(value)}")
        int64 = str(value) if -(2**63) <= value < 2**63 else "-"
        uint64 = str(value) if 0 <= value < 2**64 else "-"
        try:
            as_double = json.dumps(float(value))
        except OverflowError:  # Python's float(int) for ints beyond the double range
            as_double = "-"
        return ("ok", f"{value}\t{value}\t{int64}\t{uint64}\t{as_double}")

    paths = []
    for i, literal in enumerate(literals):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(literal)
    got = run_files(driver, paths, "--repr", "--numbers")
    for literal, line in zip(literals, got):
        assert line == expected(literal), literal[:40]


def test_the_default_integer_limit_is_pythons(driver, tmp_path):
    (tmp_path / "a.json").write_text("9" * 4300)
    (tmp_path / "b.json").write_text("9" * 4301)
    assert [s for s, _ in run_files(driver, [tmp_path / "a.json", tmp_path / "b.json"])] == ["ok", "error"]
    # Python's own default, in a fresh interpreter (this module pins it).
    fresh = subprocess.run([sys.executable, "-I", "-c", "import sys; print(sys.get_int_max_str_digits())"],
                           capture_output=True, text=True, check=True)  # fmt: skip  (-I: no PYTHON* variables)
    assert int(fresh.stdout) == PYTHON_INT_DIGITS


# --------------------------------------------------------------------------- differential fuzz

NON_FINITE = [math.nan, math.inf, -math.inf]
SPECIAL_FLOATS = [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 2.225073858507201e-308, 1.7976931348623157e308,
                  1e16, 9999999999999998.0, 1e-4, 9.999999999999999e-05, 1e22, 0.1, 1 / 3, *NON_FINITE]  # fmt: skip
BIG_INTS = [2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 10**400, -(10**400)]
ODD_CHARACTERS = list('\'"\\/\b\f\n\r\t\x00\x1f\x7f\x80\x9f\xa0\xad\xe9\xff\u2028\ud800\udbff\udc00\udfff\U0001f600')


class Obj(list):
    """An object as its (key, value) pairs, keys possibly repeated: JSON text can repeat them."""


# Lists joined rather than st.text, which never yields lone surrogates (Python's json.loads does).
strings = st.lists(st.one_of(st.characters(), st.sampled_from(ODD_CHARACTERS)), max_size=8).map("".join)
keys = st.one_of(st.sampled_from(["a", "b", "format", ""]), strings)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from(BIG_INTS),
    st.floats(),
    st.floats(min_value=-1e-300, max_value=1e-300),
    st.sampled_from(SPECIAL_FLOATS),
    strings,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.lists(st.tuples(keys, inner), max_size=4).map(Obj)),
    max_leaves=12,
)
SPACE = ["", " ", "\n", "\t", "\r\n", "  \t"]


def render_string(text: str, style: str) -> str:
    if style == "raw":  # UTF-8 as such (a lone surrogate becomes invalid UTF-8 below: a reject on both sides)
        return json.dumps(text, ensure_ascii=False)
    if style == "upper":
        return re.sub(r"\\u[0-9a-f]{4}", lambda m: m.group(0).upper().replace("\\U", "\\u"), json.dumps(text))
    if style == "raw_controls":  # a careless writer's output: raw tabs, newlines, ... (both sides reject it)
        controls = {"t": "\t", "n": "\n", "r": "\r", "b": "\b", "f": "\f"}

        def unescape(m: re.Match) -> str:  # each escape is matched whole: an escaped backslash stays one
            if m[1] in controls:
                return controls[m[1]]
            return chr(int(m[1][1:], 16)) if m[1].startswith("u00") and int(m[1][1:], 16) < 0x20 else m[0]

        return re.sub(r"\\(u[0-9a-f]{4}|.)", unescape, json.dumps(text))
    if style == "escape_all":
        units = text.encode("utf-16-le", "surrogatepass")
        return '"' + "".join(f"\\u{int.from_bytes(units[i:i + 2], 'little'):04x}" for i in range(0, len(units), 2)) + '"'
    return json.dumps(text)


def render_number(value: int | float, style: int) -> str:
    if isinstance(value, int):
        return "-0" if value == 0 and style % 2 else str(value)
    if not math.isfinite(value):
        return json.dumps(value)
    # Spellings that Python reads back as floats, exact or not; both sides read the same text.
    spellings = [repr(value), f"{value:.17e}", f"{value:.3E}", f"{value:.25g}", f"{value:.0e}"]
    if abs(value) < 1e30:
        spellings.append(f"{value:.40f}")
    text = spellings[style % len(spellings)]
    return text if re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", text) and ("." in text or "e" in text.lower()) else repr(value)


def render(value, draw) -> str:
    space = draw(st.sampled_from(SPACE))
    if isinstance(value, Obj):
        inner = [render_string(k, draw(st.sampled_from(["ascii", "raw", "upper"]))) + space + ":" + space + render(v, draw)
                 for k, v in value]  # fmt: skip
        return "{" + space + ("," + space).join(inner) + space + "}"
    if isinstance(value, list):
        return "[" + space + ("," + space).join(render(v, draw) for v in value) + space + "]"
    if isinstance(value, str):
        return render_string(value, draw(st.sampled_from(["ascii", "ascii", "raw", "upper", "escape_all", "raw_controls"])))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return render_number(value, draw(st.integers(0, 11)))
    return json.dumps(value)


@st.composite
def documents(draw) -> bytes:
    text = draw(st.sampled_from(SPACE)) + render(draw(values), draw) + draw(st.sampled_from(SPACE))
    return text.encode("utf-8", "surrogatepass")


INTERESTING = list(b'[]{}",:.-+eE0123456789\\u /bnrtfxNIy \t\n\r') + [0x00, 0x1F, 0x7F, 0x80, 0xBF, 0xC0, 0xC2, 0xE2, 0xED,
                                                                      0xEF, 0xF0, 0xF4, 0xF5, 0xFF]  # fmt: skip
# Insertions that make the cases a grammar gets wrong, after the byte that sets them up: "0" then a
# digit ("01"), a quote then a raw control byte, a backslash then an escape letter, "1." then "]".
AFTER = {b"0": b"0123456789", b'"': b"\t\n\r\x00\x1f\x7f\x80\xed\xff", b"\\": b"yxUu'0 a/", b".": b"e],5",
         b"e": b",]+-", b"-": b"-0 I+.", b"[": b",]", b"{": b",1}", b",": b",]}", b":": b",}:"}  # fmt: skip
ANCHORS = list(AFTER)
mutation = st.tuples(
    st.sampled_from(["flip", "insert", "insert_after", "delete", "truncate"]),
    st.integers(0, 1 << 16),
    st.one_of(st.sampled_from(INTERESTING), st.integers(0, 255)),
    st.integers(0, 15),  # which of AFTER's bytes
)
# Several mutants of each document (each a list of 1-3 changes), checked one by one: cheap, as the
# driver process stays up, and far more mutants than examples.
mutants = st.lists(st.lists(mutation, min_size=1, max_size=3), min_size=1, max_size=16)


def mutate(data: bytes, changes) -> bytes:
    out = bytearray(data)
    for kind, where, byte, pick in changes:
        at = where % (len(out) + 1)
        if kind == "insert_after":
            anchor = ANCHORS[where % len(ANCHORS)]
            found = [i for i, b in enumerate(out) if b == anchor[0]]
            if found:
                out.insert(found[(where // len(ANCHORS)) % len(found)] + 1, AFTER[anchor][pick % len(AFTER[anchor])])
        elif kind == "insert":
            out.insert(at, byte)
        elif kind == "truncate":
            del out[at:]
        elif out and kind == "flip":
            out[at % len(out)] = byte
        elif out:
            del out[at % len(out)]
    return bytes(out)


def assert_agrees(stream: Stream, data: bytes) -> bool:
    """C++ and Python agree on data; returns whether it was accepted."""
    status, payload = stream(data)
    want = python_side(data)
    if want is None:
        assert status == "error", f"C++ accepts what Python rejects: {data!r} -> {status} {payload}"
        return False
    assert status == "ok", f"C++ rejects what Python accepts: {data!r}: {payload}"
    canonical, _, cpp_repr = payload.partition("\t")
    assert canonical == want, data
    value = json.loads(data.decode("utf-8"))
    if repr_is_exact(value):
        assert cpp_repr == repr(value), data
    return True


@st.composite
def number_literals(draw) -> bytes:
    """Grammatical numbers, long mantissas and exponents near the double range's ends included."""
    digits = st.text("0123456789", min_size=1, max_size=40)
    head = draw(st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,39}", fullmatch=True)))
    fraction = draw(st.one_of(st.just(""), digits.map(lambda d: "." + d)))
    exponent = draw(st.one_of(st.just(0), st.integers(-400, 400), st.integers(-(10**25), 10**25)))
    text = draw(st.sampled_from(["", "-"])) + head + fraction
    if exponent or draw(st.booleans()):
        text += draw(st.sampled_from(["e", "E"])) + draw(st.sampled_from(["", "+"] if exponent >= 0 else [""])) + str(exponent)
    return text.encode()


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(documents())
def test_generated_documents_agree_with_python(stream, data):
    assert_agrees(stream, data)


# The valid corpus files seed the mutations too: each holds what a generated document rarely does.
SEEDS = [p.read_bytes() for p in CASES if p.parent.name == "valid"]


@FUZZ
@given(st.one_of(st.sampled_from(SEEDS), documents()), mutants)
def test_mutated_documents_agree_with_python(stream, data, changes):
    for change in changes:
        assert_agrees(stream, mutate(data, change))


@FUZZ
@given(number_literals())
def test_number_literals_round_like_python(stream, data):
    assert_agrees(stream, data)
