"""Job descriptions: what a task with files is, in its two written forms.

Owns the JSON form (a workload line that starts with ``{"``) and the classic JDL form
(``-j FILE.jdl``: ``Executable = "x"; InputSandbox = {"a", "b"};``), both read into a
``JobSpec`` and checked before anything is submitted: unknown fields, a missing
executable, an input that does not exist, a sandbox over MAX_INPUT_SANDBOX_BYTES are
WorkloadErrors naming the file and line.  How a spec runs (its sandbox, its staging)
is sandbox.py's business; docs/jobs.md documents both forms.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cloudkon.errors import WorkloadError
from cloudkon.tasks import MAX_TASK_TIMEOUT_SECONDS, check_task_timeout, task_line_numbers

# Bytes of local input files one task may stage (URL inputs are fetched by the worker).
MAX_INPUT_SANDBOX_BYTES = 512 * 1024 * 1024

# How a check reports a field that is wrong: the message, and the field (for its line in a JDL file).
_Fail = Callable[..., WorkloadError]

_FIELDS = ("executable", "arguments", "input_sandbox", "output_sandbox", "prologue", "env", "timeout")
# Classic JDL attribute names (case-insensitive) and their JSON field.
_JDL_NAMES = {"executable": "executable", "arguments": "arguments", "inputsandbox": "input_sandbox",
              "outputsandbox": "output_sandbox", "prologue": "prologue", "environment": "env",
              "timeout": "timeout"}


def is_url(item: str) -> bool:
    return item.startswith(("http://", "https://", "s3://"))


def is_job_description(line: str) -> bool:
    """A line starting with ``{`` followed by a JSON key (or ``}``), so that a shell brace
    group such as ``{ make; make install; }`` keeps its meaning."""
    return line.startswith("{") and line[1:].lstrip()[:1] in ('"', "}")


def url_name(url: str) -> str:
    """The file name a URL input gets in the sandbox."""
    return PurePosixPath(url.split("?", 1)[0].split("#", 1)[0]).name or "index.html"


@dataclass
class JobSpec:
    """One job: its command, the files it needs in its sandbox, the files it leaves there to bring back.

    Local inputs and prologue scripts are absolute paths (checked to exist); every input lands in
    the sandbox under its own file name.
    """

    executable: str
    arguments: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # absolute local paths
    urls: list[str] = field(default_factory=list)  # fetched by the worker
    outputs: list[str] = field(default_factory=list)  # file names or globs, relative to the sandbox
    prologue: list[str] = field(default_factory=list)  # absolute paths of scripts run first
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None

    def input_bytes(self) -> int:
        return sum(Path(path).stat().st_size for path in {*self.inputs, *self.prologue})


def workload_specs(path: str, text: str, tasks: list[str]) -> dict[int, JobSpec]:
    """The job descriptions among the tasks parsed from a workload's ``text``, by task id
    (paths relative to the file's folder)."""
    if not any(map(is_job_description, tasks)):
        return {}
    base = Path(path).resolve().parent
    numbers = task_line_numbers(text)
    return {task_id: parse_json_spec(task, base, (path, numbers[task_id]))
            for task_id, task in enumerate(tasks) if is_job_description(task)}


def read_jdl(path: str) -> JobSpec:
    """The job of a classic JDL file."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as exc:
        raise WorkloadError(f"cannot read job description: {exc.strerror or exc}", path) from exc
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"not UTF-8 (byte offset {exc.start})", path) from None
    return parse_jdl(text, Path(path).resolve().parent, path)


def parse_json_spec(text: str, base: Path, where: tuple[str, int | None]) -> JobSpec:
    """A JobSpec from a JSON workload line; paths are relative to ``base``."""
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise WorkloadError(f"not a JSON job description: {exc}", *where) from None
    except RecursionError:  # the decoder recurses per level: [[[[... runs out of stack
        raise WorkloadError("not a JSON job description: nested too deeply", *where) from None
    if not isinstance(values, dict):
        raise WorkloadError("a job description is a JSON object", *where)
    return build_spec(values, base, where)


def parse_jdl(text: str, base: Path, path: str) -> JobSpec:
    """A JobSpec from the classic JDL syntax; errors name ``path`` and the line."""
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    tokens = _tokens(text, path)
    position = 0
    if len(tokens) > 1 and tokens[0][0] == "[" and tokens[-1][0] == ";" and tokens[-2][0] == "]":
        tokens = tokens[:-1]  # [ ... ];
    if tokens and tokens[0][0] == "[":
        if tokens[-1][0] != "]":
            raise WorkloadError("'[' without its closing ']'", path, tokens[0][2])
        tokens = tokens[1:-1]
    while position < len(tokens):
        kind, name, line = tokens[position]
        if kind != "name":
            raise WorkloadError(f"expected an attribute name, found {name!r}", path, line)
        if position + 1 >= len(tokens) or tokens[position + 1][0] != "=":
            raise WorkloadError(f"expected '=' after {name}", path, line)
        value, position = _value(tokens, position + 2, path, line)
        if position >= len(tokens) or tokens[position][0] != ";":
            raise WorkloadError(f"expected ';' after the value of {name}", path, line)
        position += 1
        key = _JDL_NAMES.get(name.lower())
        if key is None:
            raise WorkloadError(f"unknown attribute {name!r} (known: {', '.join(_jdl_spellings())})",
                                path, line)
        if key in values:
            raise WorkloadError(f"{name} is set twice (first on line {lines[key]})", path, line)
        if key == "env":
            value = _environment(value, path, line)
        values[key], lines[key] = value, line
    return build_spec(values, base, (path, None), lines)


def build_spec(values: dict[str, Any], base: Path, where: tuple[str, int | None],
               lines: dict[str, int] | None = None) -> JobSpec:
    """Check the fields of a job description and resolve its local files against ``base``."""
    file, line = where

    def fail(message: str, key: str | None = None) -> WorkloadError:
        return WorkloadError(message, file, (lines or {}).get(key, line) if key else line)

    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise fail(f"unknown field {unknown[0]!r} (known: {', '.join(_FIELDS)})")
    executable = values.get("executable")
    if not isinstance(executable, str) or not executable.strip():
        raise fail("a job description needs an 'executable' (a non-empty string)", "executable")
    arguments = values.get("arguments", [])
    if isinstance(arguments, str):
        try:
            arguments = shlex.split(arguments)
        except ValueError as exc:
            raise fail(f"arguments: {exc}", "arguments") from None
    if not isinstance(arguments, list) or not all(isinstance(a, str) for a in arguments):
        raise fail("'arguments' is a string or a list of strings", "arguments")
    spec = JobSpec(executable, arguments)
    _add_files(spec, values, base, fail)
    spec.env = _checked_env(values, fail)
    timeout = values.get("timeout")
    if timeout is not None:
        try:
            check_task_timeout(timeout)
        except ValueError:
            raise fail(f"'timeout' is a positive number of seconds, at most {MAX_TASK_TIMEOUT_SECONDS:.0f} "
                       "(30 days)", "timeout") from None
    spec.timeout = timeout
    size = spec.input_bytes()
    if size > MAX_INPUT_SANDBOX_BYTES:
        raise fail(f"input sandbox of {size:,} bytes is over the limit of {MAX_INPUT_SANDBOX_BYTES:,}",
                   "input_sandbox")
    return spec


def _add_files(spec: JobSpec, values: dict[str, Any], base: Path, fail: _Fail) -> None:
    """Check the sandbox fields and add their files to ``spec``: inputs (local, checked to exist,
    or URLs), prologue scripts, output patterns (inside the sandbox)."""
    for key in ("input_sandbox", "output_sandbox", "prologue"):
        items = values.get(key, [])
        if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
            raise fail(f"{key!r} is a list of non-empty strings", key)
    for key in ("executable", "arguments", "input_sandbox", "output_sandbox", "prologue"):
        items = values.get(key, [])
        bad = next((i for i in ([items] if isinstance(items, str) else items) if not _is_text(i)), None)
        if bad is not None:
            raise fail(f"{key}: {bad!r} holds a NUL character or a lone surrogate", key)
    for item in values.get("input_sandbox", []):
        if is_url(item):
            spec.urls.append(item)
        else:
            spec.inputs.append(_existing_file(base, item, fail, "input_sandbox"))
    spec.prologue = [_existing_file(base, item, fail, "prologue") for item in values.get("prologue", [])]
    for pattern in values.get("output_sandbox", []):
        relative = PurePosixPath(pattern)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts or "\0" in pattern:
            raise fail(f"output_sandbox: {pattern!r} must name files inside the sandbox", "output_sandbox")
        spec.outputs.append(pattern)
    for url in spec.urls:
        if url.startswith("s3://") and not re.fullmatch(r"s3://[^/]+/.*[^/]", url):
            raise fail(f"input_sandbox: {url!r} is not s3://bucket/key", "input_sandbox")
    names = [Path(p).name for p in (*spec.inputs, *spec.prologue)] + [url_name(u) for u in spec.urls]
    clash = next((n for n in names if names.count(n) > 1 and not _same_file(spec, n)), None)
    if clash is not None:
        raise fail(f"two inputs would both be {clash!r} in the sandbox", "input_sandbox")


def _checked_env(values: dict[str, Any], fail: _Fail) -> dict[str, str]:
    env = values.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise fail("'env' is an object of strings", "env")
    bad_name = next((k for k, v in env.items() if not k or "=" in k or not _is_text(k + v)), None)
    if bad_name is not None:
        raise fail(f"env: {bad_name!r} cannot be an environment variable", "env")
    return dict(env)


def _existing_file(base: Path, item: str, fail: _Fail, key: str) -> str:
    """The absolute path of an input, as named (a symbolic link keeps its own name in the sandbox)."""
    path = os.path.abspath(base / item)
    try:
        is_file = Path(path).is_file()
    except OSError as exc:  # is_file() passes on all but "no such file": a name too long, a denied folder
        raise fail(f"{key}: {item!r} cannot be read (looked for {path}: {exc.strerror})", key) from None
    if not is_file:
        raise fail(f"{key}: {item!r} is not a file (looked for {path})", key)
    return path


def _is_text(value: str) -> bool:
    """True if ``value`` can be a file name, an argument or an environment entry: no NUL, and
    valid Unicode (JSON's ``\\ud800`` escape makes a lone surrogate, which no encoding can write)."""
    if "\0" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _same_file(spec: JobSpec, name: str) -> bool:
    """True if every input named ``name`` is the same local file (listed twice: harmless)."""
    paths = {p for p in (*spec.inputs, *spec.prologue) if Path(p).name == name}
    return len(paths) == 1 and not any(url_name(u) == name for u in spec.urls)


def _jdl_spellings() -> list[str]:
    return ["Executable", "Arguments", "InputSandbox", "OutputSandbox", "Prologue", "Environment", "Timeout"]


_TOKEN = re.compile(r"""
    (?P<space>[ \t\r\n]+) | (?P<comment>\#[^\n]*|//[^\n]*|/\*.*?\*/) |
    (?P<string>"(?:[^"\\\n]|\\.)*") | (?P<number>-?\d{1,30}(?:\.\d{1,30})?) |
    (?P<name>[A-Za-z_][A-Za-z0-9_]*) | (?P<punct>[=;{},\[\]])
""", re.VERBOSE | re.DOTALL)


def _tokens(text: str, path: str) -> list[tuple[str, Any, int]]:
    """(kind, value, line) of each token; kind is the punctuation itself for punctuation."""
    tokens: list[tuple[str, Any, int]] = []
    position, line = 0, 1
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise WorkloadError(_unexpected(text, position), path, line)
        kind, value = match.lastgroup, match.group()
        if kind == "string":
            try:
                tokens.append(("string", json.loads(value), line))
            except ValueError as exc:
                reason = exc.args[0].split(":")[0]
                raise WorkloadError(f"bad string {value[:40]!r}: {reason}", path, line) from None
        elif kind == "number":
            tokens.append(("number", float(value) if "." in value else int(value), line))
        elif kind == "name":
            tokens.append(("name", value, line))
        elif kind == "punct":
            tokens.append((value, value, line))
        line += value.count("\n")
        position = match.end()
    return tokens


def _unexpected(text: str, position: int) -> str:
    if text.startswith('"', position):
        return "a string without its closing '\"' (on the same line)"
    if text.startswith("/*", position):
        return "a comment '/*' without its closing '*/'"
    return f"unexpected character {text[position]!r}"


def _value(tokens: list[tuple[str, Any, int]], position: int, path: str, line: int) -> tuple[Any, int]:
    """The value starting at ``position`` (a string, a number or a {list}) and the position after it."""
    if position >= len(tokens):
        raise WorkloadError("a value is missing", path, line)
    kind, value, line = tokens[position]
    if kind in ("string", "number"):
        return value, position + 1
    if kind != "{":
        raise WorkloadError(f"expected a value, found {value!r}", path, line)
    items: list[Any] = []
    position += 1
    while position < len(tokens) and tokens[position][0] != "}":
        kind, value, line = tokens[position]
        if kind != "string":
            raise WorkloadError(f"a list holds strings, found {value!r}", path, line)
        items.append(value)
        position += 1
        if position < len(tokens) and tokens[position][0] == ",":
            position += 1
        elif position < len(tokens) and tokens[position][0] != "}":
            raise WorkloadError("expected ',' or '}' in a list", path, tokens[position][2])
    if position >= len(tokens):
        raise WorkloadError("'{' without its closing '}'", path, line)
    return items, position + 1


def _environment(value: Any, path: str, line: int) -> dict[str, str]:
    """JDL's Environment = {"NAME=value", ...} as an object."""
    if not isinstance(value, list):
        raise WorkloadError('Environment is a list of "NAME=value" strings', path, line)
    env = {}
    for item in value:
        name, sep, setting = item.partition("=")
        if not sep or not name:
            raise WorkloadError(f'Environment: {item!r} is not "NAME=value"', path, line)
        env[name] = setting
    return env
