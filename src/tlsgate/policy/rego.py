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

import base64
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
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tlsgate.errors import CertificateError, ConfigError, shown

__all__ = ["EVALUATION_BUDGET", "Evaluation", "RegoPolicy", "certificate_input", "load_policy"]

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
            return Evaluation(False, "undefined", _shorten(problem, 200))
        # rego-cpp gives an undefined query as one result with no expressions, OPA as an empty result set.
        results = [result for result in output.results if result.expressions]
        if not results:
            return Evaluation(False, "undefined")
        values = [result.expressions for result in results]
        shown = values[0][0] if len(values) == 1 and len(values[0]) == 1 else values
        allowed = len(values) == 1 and len(values[0]) == 1 and values[0][0] is True
        return Evaluation(allowed, _shorten(json.dumps(shown), 120))


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
            raise ConfigError(f"{flag}: {path}: {name}: {_shorten(str(err), 120)}") from None
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
        return _shorten(" ".join(text.split()), 160)
    where = match.group("file") or ""
    if where in sources and match.group("offset"):
        where += f":{sources[where][: int(match.group('offset'))].count(chr(10)) + 1}"
    return _shorten(f"{where}: {match.group('msg')}" if where else match.group("msg"), 160)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the input: a certificate as Go's encoding/json writes an x509.Certificate ---------------------------------

_SIGNATURE_ALGORITHMS = {  # Go's x509.SignatureAlgorithm numbers, by OID
    "1.2.840.113549.1.1.4": 2,  # MD5WithRSA
    "1.2.840.113549.1.1.5": 3,  # SHA1WithRSA
    "1.2.840.113549.1.1.11": 4,  # SHA256WithRSA
    "1.2.840.113549.1.1.12": 5,  # SHA384WithRSA
    "1.2.840.113549.1.1.13": 6,  # SHA512WithRSA
    "1.2.840.10040.4.3": 7,  # DSAWithSHA1
    "2.16.840.1.101.3.4.3.2": 8,  # DSAWithSHA256
    "1.2.840.10045.4.1": 9,  # ECDSAWithSHA1
    "1.2.840.10045.4.3.2": 10,  # ECDSAWithSHA256
    "1.2.840.10045.4.3.3": 11,  # ECDSAWithSHA384
    "1.2.840.10045.4.3.4": 12,  # ECDSAWithSHA512
    "1.3.101.112": 16,  # PureEd25519
}
_EXT_KEY_USAGES = {  # Go's x509.ExtKeyUsage numbers
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: 0,
    ExtendedKeyUsageOID.SERVER_AUTH: 1,
    ExtendedKeyUsageOID.CLIENT_AUTH: 2,
    ExtendedKeyUsageOID.CODE_SIGNING: 3,
    ExtendedKeyUsageOID.EMAIL_PROTECTION: 4,
    ExtendedKeyUsageOID.IPSEC_IKE: 5,
    ExtendedKeyUsageOID.TIME_STAMPING: 8,
    ExtendedKeyUsageOID.OCSP_SIGNING: 9,
}
_KEY_USAGE_BITS = (  # Go's x509.KeyUsage bits, lowest first
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)
_NAME_FIELDS = (  # pkix.Name's list fields, in Go's order
    ("Country", NameOID.COUNTRY_NAME),
    ("Organization", NameOID.ORGANIZATION_NAME),
    ("OrganizationalUnit", NameOID.ORGANIZATIONAL_UNIT_NAME),
    ("Locality", NameOID.LOCALITY_NAME),
    ("Province", NameOID.STATE_OR_PROVINCE_NAME),
    ("StreetAddress", NameOID.STREET_ADDRESS),
    ("PostalCode", NameOID.POSTAL_CODE),
)


def certificate_input(cert: x509.Certificate) -> dict[str, Any]:
    """``cert`` as ghostunnel hands it to a policy: Go's JSON of an ``x509.Certificate``.

    Byte fields are base64 strings, OIDs are arrays of integers, times RFC 3339 strings, enumerations Go's
    numbers (``ExtKeyUsage`` 2 is clientAuth), and empty lists ``null``, because that is what Go writes.
    Public keys are given as Go writes the common ones (RSA ``N``/``E``, ECDSA ``X``/``Y``, Ed25519 bytes).
    """
    extensions = list(cert.extensions)
    by_class = {type(ext.value): ext.value for ext in extensions}
    basic = by_class.get(x509.BasicConstraints)
    usage = by_class.get(x509.KeyUsage)
    eku = by_class.get(x509.ExtendedKeyUsage)
    san = by_class.get(x509.SubjectAlternativeName)
    ski = by_class.get(x509.SubjectKeyIdentifier)
    aki = by_class.get(x509.AuthorityKeyIdentifier)
    aia = by_class.get(x509.AuthorityInformationAccess)
    crl_dp = by_class.get(x509.CRLDistributionPoints)
    policies = by_class.get(x509.CertificatePolicies)
    public_key = cert.public_key()
    key_algorithm, key_value = _public_key(public_key)
    sig_oid = cert.signature_algorithm_oid.dotted_string
    return {
        "Raw": _b64(cert.public_bytes(_DER)),
        "RawTBSCertificate": _b64(cert.tbs_certificate_bytes),
        "RawSubjectPublicKeyInfo": _b64(public_key.public_bytes(_DER, _SPKI)),
        "RawSubject": _b64(cert.subject.public_bytes()),
        "RawIssuer": _b64(cert.issuer.public_bytes()),
        "Signature": _b64(cert.signature),
        "SignatureAlgorithm": _SIGNATURE_ALGORITHMS.get(sig_oid, 0),
        "PublicKeyAlgorithm": key_algorithm,
        "PublicKey": key_value,
        "Version": cert.version.value + 1,
        "SerialNumber": cert.serial_number,
        "Issuer": _name(cert.issuer),
        "Subject": _name(cert.subject),
        "NotBefore": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "NotAfter": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "KeyUsage": _key_usage(usage),
        "Extensions": [
            {"Id": _oid(ext.oid), "Critical": ext.critical, "Value": _b64(_extension_der(ext))} for ext in extensions
        ]
        or None,
        "ExtraExtensions": None,
        "UnhandledCriticalExtensions": None,
        "ExtKeyUsage": [_EXT_KEY_USAGES[u] for u in eku if u in _EXT_KEY_USAGES] or None if eku else None,
        "UnknownExtKeyUsage": [_oid(u) for u in eku if u not in _EXT_KEY_USAGES] or None if eku else None,
        "BasicConstraintsValid": basic is not None,
        "IsCA": bool(basic and basic.ca),
        "MaxPathLen": (basic.path_length if basic.path_length is not None else -1) if basic else 0,
        "MaxPathLenZero": bool(basic and basic.path_length == 0),
        "SubjectKeyId": _b64(ski.digest) if ski else None,
        "AuthorityKeyId": _b64(aki.key_identifier) if aki and aki.key_identifier else None,
        "OCSPServer": _access(aia, "1.3.6.1.5.5.7.48.1"),
        "IssuingCertificateURL": _access(aia, "1.3.6.1.5.5.7.48.2"),
        "DNSNames": list(san.get_values_for_type(x509.DNSName)) or None if san else None,
        "EmailAddresses": list(san.get_values_for_type(x509.RFC822Name)) or None if san else None,
        "IPAddresses": [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] or None if san else None,
        "URIs": [_url(uri) for uri in san.get_values_for_type(x509.UniformResourceIdentifier)] or None if san else None,
        "PermittedDNSDomainsCritical": False,
        "PermittedDNSDomains": None,
        "ExcludedDNSDomains": None,
        "PermittedIPRanges": None,
        "ExcludedIPRanges": None,
        "PermittedEmailAddresses": None,
        "ExcludedEmailAddresses": None,
        "PermittedURIDomains": None,
        "ExcludedURIDomains": None,
        "CRLDistributionPoints": _distribution_points(crl_dp),
        "PolicyIdentifiers": [_oid(p.policy_identifier) for p in policies] or None if policies else None,
        "Policies": [p.policy_identifier.dotted_string for p in policies] or None if policies else None,
    }


_DER = Encoding.DER
_SPKI = PublicFormat.SubjectPublicKeyInfo


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _oid(oid: x509.ObjectIdentifier) -> list[int]:
    return [int(arc) for arc in oid.dotted_string.split(".")]


def _name(name: x509.Name) -> dict[str, Any]:
    """A pkix.Name: the list fields, SerialNumber and the LAST CommonName (as Go), and every attribute in Names."""
    result: dict[str, Any] = {}
    for field, oid in _NAME_FIELDS:
        result[field] = [_text(a.value) for a in name.get_attributes_for_oid(oid)] or None
    serials = name.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    result["SerialNumber"] = _text(serials[-1].value) if serials else ""
    common_names = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    result["CommonName"] = _text(common_names[-1].value) if common_names else ""
    result["Names"] = [{"Type": _oid(a.oid), "Value": _text(a.value)} for a in name] or None
    result["ExtraNames"] = None
    return result


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _key_usage(usage: x509.KeyUsage | None) -> int:
    if usage is None:
        return 0
    bits = 0
    for index, attribute in enumerate(_KEY_USAGE_BITS):
        try:
            if getattr(usage, attribute):
                bits |= 1 << index
        except ValueError:  # encipher_only/decipher_only are undefined without key_agreement
            continue
    return bits


def _public_key(key: Any) -> tuple[int, Any]:
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return 1, {"N": numbers.n, "E": numbers.e}
    if isinstance(key, dsa.DSAPublicKey):
        return 2, {"Y": key.public_numbers().y}
    if isinstance(key, ec.EllipticCurvePublicKey):
        point = key.public_numbers()
        return 3, {"Curve": {}, "X": point.x, "Y": point.y}
    if isinstance(key, ed25519.Ed25519PublicKey):
        return 4, _b64(key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    if isinstance(key, ed448.Ed448PublicKey):
        return 0, None  # Go cannot parse Ed448 keys at all
    return 0, None


def _extension_der(ext: x509.Extension[x509.ExtensionType]) -> bytes:
    try:
        return ext.value.public_bytes()
    except (NotImplementedError, AttributeError, ValueError):
        return b""


def _access(aia: x509.AuthorityInformationAccess | None, method: str) -> list[str] | None:
    if aia is None:
        return None
    found = [
        d.access_location.value
        for d in aia
        if d.access_method.dotted_string == method and isinstance(d.access_location, x509.UniformResourceIdentifier)
    ]
    return found or None


def _distribution_points(points: x509.CRLDistributionPoints | None) -> list[str] | None:
    if points is None:
        return None
    urls = [
        name.value
        for point in points
        for name in point.full_name or ()
        if isinstance(name, x509.UniformResourceIdentifier)
    ]
    return urls or None


def _url(text: str) -> dict[str, Any]:
    """A url.URL as Go's encoding/json writes it (a struct of its parsed parts)."""
    try:
        parts = urlsplit(text)
        host = parts.netloc.rpartition("@")[2]
        user = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else None
        scheme, path, query, fragment = parts.scheme, parts.path, parts.query, parts.fragment
    except ValueError:
        scheme, host, user, path, query, fragment = "", "", None, text, "", ""
    opaque = ""
    if scheme and not text[len(scheme) + 1 :].startswith("/"):
        opaque, path = text[len(scheme) + 1 :].split("?")[0].split("#")[0], ""
    return {
        "Scheme": scheme,
        "Opaque": opaque,
        "User": {} if user is not None else None,
        "Host": host,
        "Path": path,
        "RawPath": "",
        "OmitHost": False,
        "ForceQuery": False,
        "RawQuery": query,
        "Fragment": fragment,
        "RawFragment": "",
    }


def peer_input_json(der: bytes) -> str:
    """The whole input document for ``der``, pretty-printed, for ``policy check`` to show what the policy sees."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as err:
        raise CertificateError(f"certificate is not a DER X.509 certificate: {_shorten(str(err), 120)}") from None
    return json.dumps({"certificate": certificate_input(cert)}, indent=2, ensure_ascii=False)
