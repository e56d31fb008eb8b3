"""Property tests for the parsers that read what operators (and config files) type: durations, addresses, CIDR
rules and whole tunnel configs.

Two kinds of property: round trips for well-formed input (what goes in comes back out), and "only ConfigError"
for anything at all, because the CLI turns ConfigError into one line and exit 2 while any other exception is a
traceback. (PROXY header properties live in test_proxyproto_properties.py.)
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tlsgate.errors import ConfigError
from tlsgate.settings.addresses import Address, parse_address
from tlsgate.settings.config import KNOWN_KEYS, ConfigErrors, TunnelConfig, normalise_key, tunnel_config
from tlsgate.settings.durations import format_duration, parse_duration

from helpers import address_rules

bounded = settings(max_examples=200, deadline=None)

# --- durations -----------------------------------------------------------------------------------------------

UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
units = st.sampled_from(sorted(UNITS))
# Near-durations: digits, dots, unit letters, signs and spaces, so the parser's edges get exercised, not only
# its first character.
duration_like = st.text(alphabet="0123456789.smhnuµ +-e_ \t", max_size=16) | st.text(max_size=16)


@bounded
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), units), min_size=1, max_size=5))
def test_duration_is_the_sum_of_its_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{value}{unit}" for value, unit in parts)
    expected = sum(value * UNITS[unit] for value, unit in parts)
    assert parse_duration(text) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@bounded
@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=999), units)
def test_decimal_durations(whole: int, fraction: int, unit: str) -> None:
    assert parse_duration(f"{whole}.{fraction:03d}{unit}") == pytest.approx(
        (whole + fraction / 1000) * UNITS[unit], rel=1e-12, abs=1e-15
    )


@bounded
@given(st.floats(min_value=0, max_value=10**7, allow_nan=False, allow_infinity=False))
@example(1e-8)
@example(3600.00001)
def test_format_duration_reads_back(seconds: float) -> None:
    # format_duration keeps six significant digits of the seconds part (and of sub-second values).
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-5, abs=1e-9)


@bounded
@given(duration_like)
@example("-1s")
@example("1e3s")
@example("1s ")
@example("")
@example("0")
def test_any_text_is_a_duration_or_a_config_error(text: str) -> None:
    try:
        seconds = parse_duration(text, name="--idle-timeout")
    except ConfigError as err:
        assert "--idle-timeout" in str(err)
        return
    assert seconds >= 0 and not math.isnan(seconds)


# --- addresses -----------------------------------------------------------------------------------------------

ports = st.integers(min_value=0, max_value=65535)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
hostnames = st.lists(labels, min_size=1, max_size=4).map(".".join)
# Digits of every script, and things that look like digits (superscripts, fractions): a port is ASCII only.
digit_like = st.characters(categories=["Nd", "No"]) | st.sampled_from("0123456789")


@bounded
@given(st.ip_addresses(v=4).map(str) | hostnames, ports)
def test_host_and_port_round_trip(host: str, port: int) -> None:
    address = parse_address(f"{host}:{port}")
    assert address == Address(host=host, port=port)
    assert parse_address(str(address)) == address


@bounded
@given(st.ip_addresses(v=6), ports)
def test_ipv6_round_trip_in_brackets(ip: ipaddress.IPv6Address, port: int) -> None:
    address = parse_address(f"[{ip}]:{port}")
    assert address == Address(host=str(ip), port=port)
    assert parse_address(str(address)) == address
    with pytest.raises(ConfigError):
        parse_address(f"{ip}:{port}")  # IPv6 without brackets is ambiguous and refused


@bounded
@given(st.text(min_size=1, max_size=40).filter(lambda path: path == path.strip()))
def test_unix_path_round_trip(path: str) -> None:
    address = parse_address(f"unix:{path}")
    assert address == Address(path=path)
    assert parse_address(str(address)) == address


@bounded
@given(st.integers(min_value=65536, max_value=10**9) | st.integers(max_value=-1))
def test_port_out_of_range_is_refused(port: int) -> None:
    with pytest.raises(ConfigError):
        parse_address(f"127.0.0.1:{port}")


@bounded
@given(
    st.text(max_size=40)
    | st.builds("{}:{}".format, st.text(max_size=20), st.text(max_size=8))
    | st.builds("{}:{}".format, hostnames, st.text(digit_like, min_size=1, max_size=6))
)
@example("localhost:²")
@example("[::1]")
@example("[::1]:")
@example("[zz]:1")
@example(":")
@example("unix:")
def test_any_text_is_an_address_or_a_config_error(text: str) -> None:
    try:
        address = parse_address(text, name="--listen")
    except ConfigError as err:
        assert "--listen" in str(err)
        return
    assert address.is_unix or (0 <= address.port <= 65535 and text.strip().rsplit(":", 1)[1].isascii())


# --- CIDR rules ----------------------------------------------------------------------------------------------


@st.composite
def networks(draw: st.DrawFn, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    ip = draw(st.ip_addresses(v=version))
    bits = 32 if version == 4 else 128
    prefix = draw(st.integers(min_value=0 if version == 4 else 1, max_value=bits))
    net = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    if version == 6:
        # Rules for IPv4-mapped space fold to IPv4 (see settings.values.parse_network); keep v6 rules outside it here.
        mapped = ipaddress.ip_network("::ffff:0:0/96")
        if net.overlaps(mapped):
            net = ipaddress.ip_network(f"2001:db8::/{max(prefix, 32)}", strict=False)
    return net


def _inside(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list[Any]) -> bool:
    return any(ip.version == net.version and ip in net for net in nets)


@bounded
@given(st.sampled_from([4, 6]).flatmap(lambda v: st.tuples(st.just(v), st.data())))
def test_address_rules_agree_with_ipaddress(version_and_data: tuple[int, st.DataObject]) -> None:
    version, data = version_and_data
    allow = data.draw(st.lists(networks(version), max_size=4))
    deny = data.draw(st.lists(networks(version), max_size=4))
    # Sources: random ones, and ones inside each rule so both branches are hit.
    inside = [data.draw(st.integers(0, net.num_addresses - 1)) for net in allow + deny]
    sources = [net.network_address + offset for net, offset in zip(allow + deny, inside, strict=True)]
    sources += data.draw(st.lists(st.ip_addresses(v=version), min_size=1, max_size=4))
    rules = address_rules(allow_from=[str(n) for n in allow], deny_from=[str(n) for n in deny])
    for ip in sources:
        if version == 6 and ip.ipv4_mapped is not None:
            continue
        expected = not _inside(ip, deny) and (not allow or _inside(ip, allow))
        decision = rules.check(str(ip))
        assert decision.allowed == expected, (str(ip), rules, decision)
        if _inside(ip, deny):
            assert decision.rule == "deny-from"


@bounded
@given(st.ip_addresses(v=4), st.integers(min_value=0, max_value=32))
def test_ipv4_mapped_rules_match_ipv4_sources(ip: ipaddress.IPv4Address, prefix: int) -> None:
    net = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    mapped = f"::ffff:{net.network_address}/{prefix + 96}"
    rules = address_rules(allow_from=[mapped])
    assert rules.check(str(ip)).allowed
    assert rules.check(f"::ffff:{ip}").allowed


@bounded
@given(st.ip_addresses(v=4), st.integers(min_value=0, max_value=31))
def test_host_bits_set_is_refused_with_a_hint(ip: ipaddress.IPv4Address, prefix: int) -> None:
    net = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    if net.network_address == ip:
        return
    with pytest.raises(ConfigError, match="host bits"):
        address_rules(allow_from=[f"{ip}/{prefix}"])


@bounded
@given(st.lists(st.text(max_size=24) | st.builds("{}/{}".format, st.ip_addresses(), st.integers(-1, 200))))
def test_any_cidr_text_is_a_rule_or_a_config_error(texts: list[str]) -> None:
    with contextlib.suppress(ConfigError):
        rules = address_rules(allow_from=texts, deny_from=texts)
        assert not rules.check("127.0.0.1").allowed or not texts


@bounded
@given(st.text(max_size=40))
def test_any_source_text_gets_a_decision(source: str) -> None:
    rules = address_rules(allow_from=["10.0.0.0/8"], deny_from=["10.1.0.0/16"])
    decision = rules.check(source)
    assert isinstance(decision.allowed, bool) and decision.reason


# --- whole tunnel configs ------------------------------------------------------------------------------------

junk_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**12), max_value=10**12)
    | st.floats()
    | st.text(max_size=30)
    | st.binary(max_size=8)
)
junk = st.recursive(
    junk_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner), max_leaves=6
)
plausible = st.sampled_from(
    [
        "127.0.0.1:0",
        "[::1]:8443",
        "unix:/nonexistent/sock",
        "10s",
        "0",
        "1h30m",
        "-5s",
        "10.0.0.0/8",
        "::/0",
        "cert.pem",
        "key.pem",
        "ca.pem",
        "env:TLSGATE_PROPERTY_TEST_UNSET",
        "file:",
        "file:missing",
        "pass:",
        "",
    ]
)
secret_like = st.builds("{}{}".format, st.sampled_from(["env:", "file:", "pass:", ""]), st.text(max_size=12))
values = junk | plausible | secret_like | st.lists(plausible, max_size=3)
keys = st.sampled_from(sorted(KNOWN_KEYS)) | st.text(max_size=12)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where the config's relative file names exist, so checks past "no such file" run too."""
    where = tmp_path_factory.mktemp("config")
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (where / name).write_text("not really PEM\n")
    return where


@bounded
@given(st.sampled_from(["server", "client", "nonsense"]), st.dictionaries(keys, values, max_size=8))
@example("server", {"storepass": "file:a\x00b", "listen": "127.0.0.1:0", "target": "127.0.0.1:1"})
@example("server", {"listen": "localhost:²", "target": "127.0.0.1:1"})
@example("server", {"mode": "server", "listen": "127.0.0.1:0", "target": "127.0.0.1:1"})
@example("client", {"name": "edge", "listen": "127.0.0.1:0", "target": "127.0.0.1:1"})
def test_any_options_are_a_config_or_config_errors(config_dir: Path, mode: str, options: dict[str, Any]) -> None:
    with contextlib.chdir(config_dir):
        try:
            cfg = tunnel_config(mode, options)
        except ConfigErrors as err:
            assert err.problems and all(problem.strip() for problem in err.problems)
            return
        except ConfigError:
            return
    assert isinstance(cfg, TunnelConfig)
    for seconds in vars(cfg.timeouts).values():
        assert seconds >= 0


SET_APART = {"storepass", "key_pass", "listen", "target", "mode", "name"}
valid_addresses = st.sampled_from(["127.0.0.1:0", "[::1]:8443", "localhost:1", "unix:/nonexistent/sock", "10.1.2.3:80"])


@bounded
@given(
    st.sampled_from(["server", "client"]), valid_addresses, valid_addresses, st.dictionaries(keys, values, max_size=8)
)
def test_junk_options_with_valid_addresses_are_a_config_or_config_errors(
    config_dir: Path, mode: str, listen: str, target: str, options: dict[str, Any]
) -> None:
    """The same property with well-formed addresses and without the keys of the bugs above (passwords, ``mode``,
    ``name``), so the cross checks run too and everything else stays guarded while those bugs are open."""
    options = {k: v for k, v in options.items() if normalise_key(k) not in SET_APART}
    options.update(listen=listen, target=target)
    with contextlib.chdir(config_dir):
        try:
            cfg = tunnel_config(mode, options)
        except ConfigError:
            return
    assert isinstance(cfg, TunnelConfig)
    assert cfg.listen == parse_address(listen) and cfg.target == parse_address(target)
