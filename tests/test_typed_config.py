"""Access-rule values are parsed once, by the settings package, for the command line and a file alike.

A tunnel config holds networks, IP addresses, key pins and URI patterns in their parsed form; the policy takes
them as they are. So a bad value is refused when the config is read (``check-config`` sees it), in one wording
naming its own flag, and the command line and a TOML file agree on every value: both accept it with the same
parsed value, or both refuse it with the same message (the file's in key names). Library callers go through
``settings.config.server_access``, which gives the same messages as the flags.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tlsgate.cli import _given, cli
from tlsgate.errors import ConfigError
from tlsgate.policy import build_policy
from tlsgate.settings.config import ConfigErrors, TunnelConfig, server_access, tunnel_config
from tlsgate.settings.file import key_names, read_config_file
from tlsgate.settings.patterns import UriPattern
from tlsgate.settings.table import setting

from helpers import refused, server_opts

examples = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

# Text a TOML basic string can carry after json.dumps(ensure_ascii=False): no surrogates (json would write them
# as \ud83d, which TOML refuses) and no DEL (TOML wants it escaped; json leaves it raw).
toml_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x7f"), max_size=40)


def _server_command() -> click.Command:
    found = cli.commands["server"]
    assert isinstance(found, click.Command)
    return found


def _base(pki_files: dict[str, Path]) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", **server_opts(pki_files, "127.0.0.1:1")}


def from_flags(base: dict[str, Any], key: str, values: Sequence[str]) -> TunnelConfig | list[str]:
    """What ``tlsgate server`` makes of the flags: the click options, then tunnel_config as cli._run calls it."""
    args = [arg for k, v in base.items() for arg in _flag_args(k, v)]
    args += [f"{setting(key).flag}={value}" for value in values]
    params = _server_command().make_context("server", args).params
    try:
        return tunnel_config("server", _given(params), require_client_identity=True)
    except ConfigErrors as err:
        return [key_names(problem) for problem in err.problems]


def _flag_args(key: str, value: object) -> list[str]:
    flag = setting(key).flag
    if value is True:
        return [flag]
    if isinstance(value, list):
        return [f"{flag}={v}" for v in value]
    return [f"{flag}={value}"]


def from_file(base: dict[str, Any], key: str, values: Sequence[str], path: Path) -> TunnelConfig | list[str]:
    """What ``tlsgate run``/``check-config`` make of the same settings as keys of a [[tunnel]] table."""
    lines = ["[[tunnel]]", 'name = "t"', 'mode = "server"']
    for k, v in {**base, key: list(values)}.items():
        lines.append(f"{k.replace('_', '-')} = {json.dumps(v, ensure_ascii=False)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = read_config_file(str(path))
    if result.problems:
        # The file's messages name the tunnel; the flags' name no tunnel.
        return [problem.removeprefix("tunnel 't': ") for problem in result.problems]
    (cfg,) = result.tunnels
    return cfg


def assert_agree(pki_files: dict[str, Path], tmp_path: Path, key: str, values: Sequence[str], **extra: Any) -> None:
    base = {**_base(pki_files), **extra}
    flags = from_flags(base, key, values)
    file = from_file(base, key, values, tmp_path / "tlsgate.toml")
    if isinstance(flags, list) or isinstance(file, list):
        assert flags == file
    else:
        assert getattr(flags, key) == getattr(file, key)


def _network_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix: int) -> str:
    return f"{address}/{prefix % (address.max_prefixlen + 1)}"


networks = st.one_of(
    st.builds(_network_text, st.ip_addresses(), st.integers(0, 200)),
    st.ip_addresses().map(str),
    st.sampled_from(["10.0.0.0/8", "::ffff:10.0.0.0/104", "2001:db8::/200", "banana", " 10.0.0.0/8 ", "unix"]),
    toml_text,
)
ips = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded),
    st.sampled_from(["::ffff:1.2.3.4", "10.0.0.0/8", "host.example", "1.2.3.4.5", "", " ::1 "]),
    toml_text,
)


def _pin_text(digest: bytes, form: int) -> str:
    return [
        digest.hex(),
        digest.hex().upper(),
        ":".join(f"{b:02X}" for b in digest),
        base64.b64encode(digest).decode(),
        base64.urlsafe_b64encode(digest).decode().rstrip("="),
        "sha256//" + base64.b64encode(digest).decode(),
        "sha256:" + digest.hex(),
        digest.hex()[:-1],
    ][form]


pins = st.one_of(st.builds(_pin_text, st.binary(min_size=32, max_size=32), st.integers(0, 7)), toml_text)
uris = st.one_of(
    st.sampled_from(
        [
            "spiffe://example.org/api",
            "spiffe://example.org/ns/*/sa/api",
            "spiffe://*/api",
            "spiffe://example.org/ns/**",
            "spiffe://example.org/**/y",
            "spiffe://example.org/svc-*",
            "spiffe://Example.org/api",
            "spiffe://example.org/ns/../**",
            "spiffe://example.org/a%2Fb",
            "https://example.org/ns/**",
            "example.org/api",
            "",
            " ",
        ]
    ),
    st.builds(lambda segment: f"spiffe://example.org/{segment}", toml_text),
    toml_text,
)
names = st.one_of(st.sampled_from(["", " ", "alice", "ålice", "CN with spaces", "a" * 300]), toml_text)


@pytest.mark.parametrize(
    ("key", "extra"),
    [
        ("allow_from", {"allow_all": True}),
        ("deny_from", {"allow_all": True}),
        ("accept_proxy_from", {"allow_all": True}),
    ],
)
@examples
@given(values=st.lists(networks, min_size=1, max_size=3))
@example(values=["10.0.0.7/8"])
@example(values=["::ffff:10.0.0.0/104"])
def test_networks_agree_between_flags_and_file(
    pki_files: dict[str, Path], tmp_path: Path, key: str, extra: dict[str, Any], values: list[str]
) -> None:
    assert_agree(pki_files, tmp_path, key, values, **extra)


@examples
@given(values=st.lists(ips, min_size=1, max_size=3))
@example(values=["0:0::1", "::1"])
def test_ip_rules_agree_between_flags_and_file(pki_files: dict[str, Path], tmp_path: Path, values: list[str]) -> None:
    assert_agree(pki_files, tmp_path, "allow_ip", values)


@examples
@given(values=st.lists(pins, min_size=1, max_size=3))
@example(values=["xyz"])
def test_key_pins_agree_between_flags_and_file(pki_files: dict[str, Path], tmp_path: Path, values: list[str]) -> None:
    assert_agree(pki_files, tmp_path, "allow_spki_sha256", values)


@examples
@given(values=st.lists(uris, min_size=1, max_size=3))
def test_uri_patterns_agree_between_flags_and_file(
    pki_files: dict[str, Path], tmp_path: Path, values: list[str]
) -> None:
    assert_agree(pki_files, tmp_path, "allow_uri", values)


@pytest.mark.parametrize("key", ["allow_cn", "allow_ou", "allow_dns"])
@examples
@given(values=st.lists(names, min_size=1, max_size=3))
@example(values=[""])
def test_names_agree_between_flags_and_file(
    pki_files: dict[str, Path], tmp_path: Path, key: str, values: list[str]
) -> None:
    assert_agree(pki_files, tmp_path, key, values)


# -- what the config holds ------------------------------------------------------------------------------------


def test_the_config_holds_parsed_values(pki_files: dict[str, Path], tmp_path: Path) -> None:
    digest = bytes(range(32))
    cfg = tunnel_config(
        "server",
        {
            **_base(pki_files),
            "allow_ip": ["0:0::1"],
            "allow_uri": ["spiffe://example.org/ns/*"],
            "allow_spki_sha256": [base64.b64encode(digest).decode()],
            "allow_from": ["::ffff:10.0.0.0/104"],
            "deny_from": ["10.9.0.0/16"],
            "accept_proxy_from": ["192.0.2.0/24"],
        },
    )
    assert cfg.allow_ip == (ipaddress.ip_address("::1"),)
    (pattern,) = cfg.allow_uri
    assert isinstance(pattern, UriPattern) and pattern.matches("spiffe://example.org/ns/a")
    assert cfg.allow_spki_sha256 == (digest,)
    assert cfg.allow_from == (ipaddress.ip_network("10.0.0.0/8"),)  # the IPv4-mapped form folded, once
    assert cfg.deny_from == (ipaddress.ip_network("10.9.0.0/16"),)
    assert cfg.accept_proxy_from == cfg.proxy_source_networks == (ipaddress.ip_network("192.0.2.0/24"),)
    assert not cfg.proxy_from_unix
    options = {**_base(pki_files), "listen": f"unix:{tmp_path}/in.sock", "accept_proxy_from": [" UNIX "]}
    on_unix = tunnel_config("server", {**options, "allow_all": True})
    assert on_unix.accept_proxy_from == ("unix",) and on_unix.proxy_from_unix and not on_unix.proxy_source_networks


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"allow_cn": ["alice"], "allow_from": ["10.0.0.7/8"]}, "--allow-from: '10.0.0.7/8' has host bits set"),
        ({"allow_all": True, "accept_proxy_from": ["10.0.0.1/8"]}, "--accept-proxy-from: '10.0.0.1/8' has host bits"),
        ({"allow_spki_sha256": ["xyz"]}, "--allow-spki-sha256: 'xyz' is not a SHA-256 hash"),
        ({"allow_uri": ["example.org/api"]}, "--allow-uri: 'example.org/api' is not a URI"),
        ({"allow_uri": ["spiffe://x/**/y"]}, "--allow-uri: 'spiffe://x/**/y': '**' may only be the last segment"),
        ({"allow_cn": [""]}, "--allow-cn: empty value"),
        ({"allow_dns": [" "]}, "--allow-dns: empty value"),
    ],
)
def test_bad_access_values_are_refused_when_the_config_is_read(
    pki_files: dict[str, Path], extra: dict[str, Any], message: str
) -> None:
    """Before, these passed tunnel_config and were refused only when the policy was built from the strings."""
    with pytest.raises(ConfigErrors) as err:
        tunnel_config("server", {**_base(pki_files), **extra})
    assert [problem for problem in err.value.problems if problem.startswith(message)], err.value.problems


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("verify_spki_sha256", "zz", "--verify-spki-sha256: 'zz' is not a SHA-256 hash"),
        ("verify_uri", "spiffe://x/svc-*", "--verify-uri: 'spiffe://x/svc-*': '*' must be a whole path segment"),
        ("verify_ou", " ", "--verify-ou: empty value"),
        ("verify_ip", "10.0.0.0/8", "--verify-ip: '10.0.0.0/8' is not an IP address"),
    ],
)
def test_bad_verify_values_are_refused_when_the_config_is_read(
    pki_files: dict[str, Path], key: str, value: str, message: str
) -> None:
    options = {"listen": "127.0.0.1:0", "target": "localhost:1", "cacert": str(pki_files["ca"]), key: [value]}
    with pytest.raises(ConfigErrors) as err:
        tunnel_config("client", options)
    assert [problem for problem in err.value.problems if problem.startswith(message)], err.value.problems


def test_a_bad_accept_proxy_from_is_named_as_itself_by_the_server_command(pki_files: dict[str, Path]) -> None:
    """It was refused only when the runtime parsed it, under the name of --allow-from."""
    result = CliRunner().invoke(
        cli,
        [
            "server",
            "--listen=127.0.0.1:0",
            "--target=127.0.0.1:1",
            f"--cert={pki_files['cert']}",
            f"--key={pki_files['key']}",
            f"--cacert={pki_files['ca']}",
            "--allow-all",
            "--accept-proxy-from=10.0.0.1/8",
        ],
    )
    refused(result, "--accept-proxy-from: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)")


def test_check_config_names_a_bad_accept_proxy_from_as_its_key(pki_files: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "tlsgate.toml"
    path.write_text(
        "[[tunnel]]\nname = 'edge'\nmode = 'server'\nlisten = '127.0.0.1:0'\ntarget = '127.0.0.1:1'\n"
        f"cert = '{pki_files['cert']}'\nkey = '{pki_files['key']}'\ncacert = '{pki_files['ca']}'\n"
        "allow-all = true\naccept-proxy-from = ['10.0.0.1/8']\n"
    )
    result = CliRunner().invoke(cli, ["check-config", str(path)])
    assert result.exit_code == 2, result.output
    assert "tunnel 'edge': accept-proxy-from: '10.0.0.1/8' has host bits set" in result.output
    assert "allow-from" not in result.output.replace("accept-proxy-from", "")


# -- library callers: server_access -------------------------------------------------------------------------------

IDENTITY_FLAGS = {
    "allow_all": True,
    "allow_cn": ["alice"],
    "allow_ip": ["::1"],
    "allow_uri": ["spiffe://example.org/api"],
    "allow_spki_sha256": ["ab" * 32],
    "allow_policy": "POLICY",
    "allow_query": "data.tlsgate.allow",
    "disable_authentication": True,
    "crl": ["CRL"],
}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=st.sets(st.sampled_from(sorted(IDENTITY_FLAGS))))
def test_server_access_refuses_what_the_config_refuses_in_the_same_words(
    pki_files: dict[str, Path], chosen: set[str]
) -> None:
    """One copy of ghostunnel's rules on which identity flags go together: the library's entry and the flags'
    give the same messages (build_policy keeps no guard copy of its own)."""
    some_file = str(pki_files["ca"])
    flags = {k: some_file if v == "POLICY" else [some_file] if v == ["CRL"] else v for k, v in IDENTITY_FLAGS.items()}
    rules = {key: flags[key] for key in chosen}
    try:
        server_access(**rules)
        library: list[str] = []
    except ConfigErrors as err:
        library = err.problems
    try:
        tunnel_config("server", {**_base(pki_files), **rules})
        config: list[str] = []
    except ConfigErrors as err:
        config = err.problems
    # Every refusal of the library's entry is one of the flags', word for word and in the same order.
    assert library == [problem for problem in config if problem in library]
    assert all(problem in config for problem in library)


def test_policy_check_and_the_server_say_the_same_when_no_identity_rule_is_given(pki_files: dict[str, Path]) -> None:
    """Before, ``policy check`` said "server mode needs --allow-all, ..." without --allow-ip, the server "one of"."""
    check = CliRunner().invoke(cli, ["policy", "check", "--from", "10.0.0.1"])
    server = CliRunner().invoke(
        cli,
        [
            "server",
            "--listen=127.0.0.1:0",
            "--target=127.0.0.1:1",
            f"--cert={pki_files['cert']}",
            f"--key={pki_files['key']}",
            f"--cacert={pki_files['ca']}",
        ],
    )
    line = refused(check, "server mode needs one of --allow-all, --allow-cn, --allow-ou, --allow-dns, --allow-ip")
    assert refused(server, "server mode needs") == line


def test_build_policy_takes_checked_settings_only() -> None:
    policy = build_policy(server_access(allow_cn=["alice"], allow_from=["10.0.0.0/8"], deny_from=["10.9.0.0/16"]))
    assert policy.check_address("10.1.2.3").allowed
    assert not policy.check_address("10.9.0.1").allowed
    with pytest.raises(ConfigError, match="--deny-from: 'banana' is not a network"):
        server_access(allow_all=True, deny_from=["banana"])
