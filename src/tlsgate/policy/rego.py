"""Policy as code: a Rego query decides whether a peer certificate is allowed (ghostunnel's OPA flags).

``--allow-policy BUNDLE --allow-query QUERY`` (server mode) and ``--verify-policy BUNDLE --verify-query QUERY``
(client mode) load Rego from BUNDLE and, for each peer, evaluate QUERY with the input ghostunnel gives its
policies: ``{"certificate": <the peer's leaf certificate>}``, the certificate laid out as Go's
``encoding/json`` writes an ``x509.Certificate`` (``input.certificate.Subject.CommonName``,
``input.certificate.DNSNames``, ``input.certificate.URIs[0].Host``, ...), so a policy written for ghostunnel
runs here unchanged. As in ghostunnel (OPA's ``ResultSet.Allowed``), the peer is allowed only when the query
has exactly one result whose one expression is the boolean ``true``; undefined, ``false``, ``"yes"``, several
results, or an error all refuse.

BUNDLE is, as in ghostunnel, a single ``.rego`` file, or an OPA bundle: a directory or a ``.tar.gz`` holding
``.rego`` modules and ``data.json`` documents (each placed under ``data`` at its directory's path).

Rego runs in `regopy`_ (the rego-cpp interpreter), an optional dependency (``pip install 'tlsgate[opa]'``).
Its calls are synchronous, and the engine checks certificates on the event loop, so evaluation is kept off the
loop's critical path two ways: decisions are cached per certificate (by the SHA-256 of its DER) for the life of
the loaded policy, which a reload replaces; and an evaluation runs on one worker thread, which the loop waits
for at most `EVALUATION_BUDGET` seconds. A slower evaluation refuses that peer, and every peer after it is
refused at once (not cached) until the runaway one finishes: the loop stalls at most one budget per runaway.

.. _regopy: https://pypi.org/project/regopy/
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
import tarfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from queue import SimpleQueue
from typing import Any

from cryptography import x509

from tlsgate.errors import ConfigError, shown
from tlsgate.policy.decision import shorten
from tlsgate.policy.rego_input import certificate_input

__all__ = ["EVALUATION_BUDGET", "Evaluation", "RegoPolicy", "load_policy"]

EVALUATION_BUDGET = 0.5
"""Seconds the event loop waits for one evaluation. A simple policy takes about 0.15 ms (docs/performance.md)."""

_CACHE_SIZE = 1024
_MAX_BUNDLE_BYTES = 64 * 1024 * 1024  # a bundle is the operator's file, but a mistaken path should not eat memory


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One run of the query: allowed (exactly one result, one expression, ``true``), the result, or the error."""

    allowed: bool
    result: str
    """The query's value as JSON (``true``, ``false``, ``undefined``, ``[true, 1]`` for several expressions)."""
    error: str | None = None


def load_policy(path: str, query: str, *, flag_prefix: str = "allow") -> RegoPolicy:
    """Read and compile BUNDLE with QUERY; ConfigError (one line, exit 2 at start-up) names the flag and problem."""
    return RegoPolicy.load(path, query, flag_prefix=flag_prefix)


class RegoPolicy:
    """A compiled Rego query over the modules and data of one bundle, evaluated per peer certificate."""

    def __init__(self, path: str, query: str, interpreter: Any, bundle: Any, *, flag_prefix: str) -> None:
        """Use `load`. ``interpreter`` and ``bundle`` are regopy objects, owned by the worker thread from now on."""
        self.path = path
        self.query = query
        self.flag_prefix = flag_prefix
        self.budget = EVALUATION_BUDGET
        self.evaluator = _Evaluator(interpreter, bundle, name=f"rego {query}")
        self._cache: OrderedDict[bytes, Evaluation] = OrderedDict()
        self._runaway: concurrent.futures.Future[Evaluation] | None = None
        # A reload replaces the policy; its thread must not outlive it (one per reload would pile up).
        weakref.finalize(self, self.evaluator.stop)

    @classmethod
    def load(cls, path: str, query: str, *, flag_prefix: str = "allow") -> RegoPolicy:
        policy_flag, query_flag = f"--{flag_prefix}-policy", f"--{flag_prefix}-query"
        try:
            import regopy
        except ImportError:
            raise ConfigError(f"{policy_flag} needs the optional regopy package: pip install 'tlsgate[opa]'") from None
        if not query.strip():
            raise ConfigError(f"{query_flag}: empty query (use a rule such as data.tlsgate.allow)")
        modules, data = _read_bundle(path, policy_flag)
        interpreter = regopy.Interpreter()
        # rego-cpp prints compile errors to stdout at its default level; we report them ourselves, on one line.
        interpreter.log_level = regopy.LogLevel.NONE
        for name, source in modules:
            try:
                interpreter.add_module(name, source)
            except regopy.RegoError as err:
                raise ConfigError(f"{policy_flag}: {path}: {_rego_problem(err, {name: source})}") from None
        try:
            if data:
                interpreter.add_data_json(json.dumps(data))
            bundle = interpreter.build(query)
        except regopy.RegoError as err:
            raise ConfigError(f"{query_flag} {shown(query)}: {_rego_problem(err, dict(modules))}") from None
        if not bundle.ok():
            raise ConfigError(f"{query_flag} {shown(query)}: does not compile against {path}")
        return cls(path, query, interpreter, bundle, flag_prefix=flag_prefix)

    # -- evaluation -------------------------------------------------------------------------------------------

    def check(self, der: bytes) -> tuple[bool, str]:
        """(allowed, a reason naming the query and its outcome) for the peer certificate ``der``. Never raises."""
        outcome = self.evaluate(der)
        if outcome.error is not None:
            return False, f"{self.query} failed: {outcome.error}"
        if outcome.allowed:
            return True, f"{self.query} is true"
        return False, f"{self.query} is {outcome.result}, not true"

    def evaluate(self, der: bytes) -> Evaluation:
        """Run the query for ``der`` (cached), waiting at most `budget` seconds. Never raises."""
        key = hashlib.sha256(der).digest()
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        if self._runaway is not None:
            if not self._runaway.done():
                return Evaluation(False, "undefined", "an earlier evaluation is still running (over the time budget)")
            self._runaway = None
        try:
            future = self.evaluator.submit(der)
            outcome = future.result(timeout=self.budget)
        except concurrent.futures.TimeoutError:
            self._runaway = future
            return Evaluation(False, "undefined", f"evaluation took longer than {self.budget:g}s")
        except Exception as err:
            return Evaluation(False, "undefined", f"internal error: {err!r}"[:200])
        if outcome.error is None:
            # Only verdicts are cached: an error or a timeout may not recur, and costs a retry, not a wrong answer.
            self._cache[key] = outcome
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return outcome

    def summary(self) -> str:
        return f"{self.flag_prefix}-policy {self.path} query {self.query}"

    def __repr__(self) -> str:
        return f"RegoPolicy({self.path!r}, {self.query!r})"


class _Evaluator:
    """One thread that owns a regopy interpreter and runs the compiled query for each certificate handed to it.

    rego-cpp's interpreter is not thread-safe, so after `RegoPolicy.load` only this thread touches it. regopy
    calls rego-cpp through ctypes, which releases the GIL, so the event loop keeps running (and can stop waiting)
    while Rego evaluates.
    """

    def __init__(self, interpreter: Any, bundle: Any, *, name: str) -> None:
        self._interpreter = interpreter
        self._bundle = bundle
        self._name = name
        self._jobs: SimpleQueue[tuple[bytes, concurrent.futures.Future[Evaluation]] | None] = SimpleQueue()
        self.thread: threading.Thread | None = None

    def submit(self, der: bytes) -> concurrent.futures.Future[Evaluation]:
        # Started on first use, not at load: check-config and the parent of --workers load a policy only to check it.
        if self.thread is None:
            self.thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self.thread.start()
        future: concurrent.futures.Future[Evaluation] = concurrent.futures.Future()
        self._jobs.put((der, future))
        return future

    def stop(self) -> None:
        """Let the thread end once the job in hand (if any) is done."""
        self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            der, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.run(der))
            except BaseException as err:  # never let the thread die: the next peer would wait a budget for nothing
                future.set_result(Evaluation(False, "undefined", f"internal error: {err!r}"[:200]))

    def run(self, der: bytes) -> Evaluation:
        """Evaluate the query with ``der`` as ``input.certificate``, in this thread."""
        try:
            cert = x509.load_der_x509_certificate(der)
            document = json.dumps({"certificate": certificate_input(cert)}, ensure_ascii=False)
        except (ValueError, TypeError) as err:
            return Evaluation(False, "undefined", f"certificate cannot be given to the policy: {err}"[:200])
        self._interpreter.set_input_term(document)
        output = self._interpreter.query_bundle(self._bundle)
        if not output.ok():
            # rego-cpp's evaluation errors read only "<error>" through regopy; more would be kept if it said more.
            detail = str(output).strip()
            problem = "the policy returned an error" + (f": {detail}" if detail not in ("", "<error>") else "")
            return Evaluation(False, "undefined", shorten(problem, 200))
        # rego-cpp gives an undefined query as one result with no expressions, OPA as an empty result set.
        results = [result for result in output.results if result.expressions]
        if not results:
            return Evaluation(False, "undefined")
        values = [result.expressions for result in results]
        shown = values[0][0] if len(values) == 1 and len(values[0]) == 1 else values
        allowed = len(values) == 1 and len(values[0]) == 1 and values[0][0] is True
        return Evaluation(allowed, shorten(json.dumps(shown), 120))


# --- the bundle ----------------------------------------------------------------------------------------------


def _read_bundle(path: str, flag: str) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """The modules (name, source) and the merged data document of a .rego file, bundle directory or tarball."""
    where = Path(path)
    try:
        if where.is_dir():
            files = list(_directory_files(where))
        elif path.endswith(".rego"):
            files = [(where.name, where.read_bytes())]
        elif path.endswith((".tar.gz", ".tgz")):
            files = list(_tarball_files(where))
        elif where.exists():
            raise ConfigError(f"{flag}: {path} is not a .rego file, a bundle directory or a .tar.gz bundle")
        else:
            raise ConfigError(f"{flag}: {path}: no such file or directory")
    except OSError as err:
        raise ConfigError(f"{flag}: cannot read {path}: {err.strerror or err}") from None
    except tarfile.TarError as err:
        raise ConfigError(f"{flag}: {path} is not a readable .tar.gz bundle: {err}") from None
    modules: list[tuple[str, str]] = []
    data: dict[str, Any] = {}
    for name, content in files:
        parts = PurePosixPath(name).parts
        try:
            if name.endswith(".rego"):
                modules.append((name, content.decode("utf-8")))
            elif parts and parts[-1] == "data.json":
                _place(data, parts[:-1], json.loads(content))
        except (UnicodeDecodeError, ValueError) as err:
            raise ConfigError(f"{flag}: {path}: {name}: {shorten(str(err), 120)}") from None
    if not modules:
        raise ConfigError(f"{flag}: {path} holds no .rego module")
    return modules, data


def _directory_files(root: Path) -> Iterator[tuple[str, bytes]]:
    total = 0
    for file in sorted(root.rglob("*")):
        if file.is_file() and (file.suffix == ".rego" or file.name == "data.json"):
            total += file.stat().st_size
            if total > _MAX_BUNDLE_BYTES:
                raise ConfigError(f"bundle {root} is larger than {_MAX_BUNDLE_BYTES // 2**20} MiB")
            yield file.relative_to(root).as_posix(), file.read_bytes()


def _tarball_files(path: Path) -> Iterator[tuple[str, bytes]]:
    total = 0
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            name = member.name.lstrip("./").lstrip("/")
            if not member.isfile() or not (name.endswith(".rego") or PurePosixPath(name).name == "data.json"):
                continue
            total += member.size
            if total > _MAX_BUNDLE_BYTES:
                raise ConfigError(f"bundle {path} is larger than {_MAX_BUNDLE_BYTES // 2**20} MiB")
            handle = tar.extractfile(member)
            if handle is not None:
                with handle:
                    yield name, handle.read()


def _place(data: dict[str, Any], parts: tuple[str, ...], value: Any) -> None:
    """Put a data.json document under ``data`` at its directory's path, merging objects, as OPA does."""
    node = data
    for part in parts:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"data at {'/'.join(parts)} collides with a value")
    if not isinstance(value, dict):
        raise ValueError("a data.json document must be a JSON object")
    node.update(value)


_ERRORMSG = re.compile(r"\(error\s+(?:\d+:(?P<file>[^|\s]*)\|(?P<offset>\d+)\|\d+)?\s*\(errormsg \d+:(?P<msg>[^)]*)\)")


def _rego_problem(err: Exception, sources: dict[str, str]) -> str:
    """The first problem of a rego-cpp error, as ``file:line: message``, from its S-expression text."""
    text = str(err)
    match = _ERRORMSG.search(text)
    if match is None:
        return shorten(" ".join(text.split()), 160)
    where = match.group("file") or ""
    if where in sources and match.group("offset"):
        where += f":{sources[where][: int(match.group('offset'))].count(chr(10)) + 1}"
    return shorten(f"{where}: {match.group('msg')}" if where else match.group("msg"), 160)
