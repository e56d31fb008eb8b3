"""The CA's record, ``ca.json``: every serial it issued, every revocation, and the last CRL number.

Plain JSON, so people can read it; rewritten atomically (through `tlsgate.pki.files`) on each change, mode
0600. `read_state` refuses a file that is not a tlsgate CA record rather than guessing.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict, cast

from tlsgate.errors import CertificateError, shown
from tlsgate.pki.files import write_private_file
from tlsgate.tls.x509 import read_file

_STATE_FORMAT = "tlsgate-ca/1"


class _IssuedEntry(TypedDict):
    subject: str
    not_after: str
    issued_at: str


class RevokedEntry(TypedDict):
    revoked_at: str
    reason: str | None


class CaState(TypedDict):
    format: str
    crl_number: int
    issued: dict[str, _IssuedEntry]
    revoked: dict[str, RevokedEntry]


def empty_state() -> CaState:
    return {"format": _STATE_FORMAT, "crl_number": 0, "issued": {}, "revoked": {}}


def read_state(path: Path) -> CaState:
    if not path.exists():
        return empty_state()
    try:
        state = json.loads(read_file(path))
    except ValueError as err:
        raise CertificateError(f"{path}: not valid JSON ({err})".splitlines()[0]) from None
    if (
        not isinstance(state, dict)
        or state.get("format") != _STATE_FORMAT
        or not isinstance(state.get("crl_number"), int)
        or not isinstance(state.get("issued"), dict)
        or not isinstance(state.get("revoked"), dict)
    ):
        raise CertificateError(f"{path}: not a tlsgate CA record (expected format {shown(_STATE_FORMAT)})")
    return cast(CaState, state)


def write_state(path: Path, state: CaState) -> None:
    write_private_file(path, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(), force=True)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def from_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
