"""The reachability policy (mesh/policy.py): the file format and its errors, port sets, and the
group compiler against a naive every-pair reference on small random fleets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.policy import (
    ANY,
    MAX_POLICY_BYTES,
    MAX_RULES,
    FleetDevice,
    Policy,
    PolicyError,
    Ports,
    Rule,
    compile_policy,
    parse_policy,
    parse_ports,
)

EXAMPLE = """\
# cameras stream to the recorders
role=cam -> role=nvr tcp/554   # RTSP
site=berlin <-> site=berlin any

* -> role=nvr udp/5000-5010,tcp/80 tcp/81
"""


def test_parse_example() -> None:
    policy = parse_policy(EXAMPLE)
    assert [r.line for r in policy.rules] == [2, 3, 5]
    assert [r.text() for r in policy.rules] == [
        "role=cam -> role=nvr tcp/554", "site=berlin <-> site=berlin any",
        "* -> role=nvr tcp/80-81,udp/5000-5010"]
    assert policy.rules[1].both and not policy.rules[0].both
    assert policy.rules[2].src is None
    assert policy.keys == ("role", "site")
    assert parse_policy("").rules == ()
    assert parse_policy("# nothing\n\n   \n").rules == ()


@pytest.mark.parametrize(("text", "error"), [
    ("role=cam", "line 1: 'role=cam' must be SRC -> DST PORTS or SRC <-> DST PORTS"),
    ("\nrole=cam -> role=nvr", "line 2: no ports after the destination (write any, or e.g. "
     "tcp/554)"),
    ("role=cam ->", "line 1: no destination after ->"),
    ("-> role=nvr any", "line 1: the source must be one selector (key=value,... without "
     "spaces) or *"),
    ("role=cam site=x -> * any", "line 1: the source must be one selector (key=value,... "
     "without spaces) or *"),
    ("\n\n\nRole=cam -> * any", "line 4: selector: key 'Role' must be 1-32 of a-z 0-9 . _ - "
     "starting with a letter or digit"),
    ("cam -> * any", "line 1: selector 'cam': 'cam' must be key=value"),
    ("* -> * tcp/0", "line 1: 'tcp/0' must be ports 1-65535, first <= last"),
    ("* -> * udp/10-9", "line 1: 'udp/10-9' must be ports 1-65535, first <= last"),
    ("* -> * tcp/70000", "line 1: 'tcp/70000' must be ports 1-65535, first <= last"),
    ("* -> * sctp", "line 1: 'sctp' is not any, tcp, udp, icmp, tcp/PORT or udp/FIRST-LAST"),
    ("* -> * icmp/3", "line 1: 'icmp/3' is not any, tcp, udp, icmp, tcp/PORT or "
     "udp/FIRST-LAST"),
    ("* -> * tcp,,udp", "line 1: '' is not any, tcp, udp, icmp, tcp/PORT or udp/FIRST-LAST"),
])
def test_errors_name_the_line(text: str, error: str) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy(text)
    assert str(exc.value) == error
    assert "\n" not in str(exc.value)


def test_limits() -> None:
    with pytest.raises(PolicyError, match=f"larger than {MAX_POLICY_BYTES} bytes"):
        parse_policy("#" * (MAX_POLICY_BYTES + 1))
    many = "\n".join(f"role=r{i} -> * any" for i in range(MAX_RULES + 1))
    with pytest.raises(PolicyError, match=f"line {MAX_RULES + 1}: more than {MAX_RULES} rules"):
        parse_policy(many)
    with pytest.raises(PolicyError, match="more than 64 port items"):
        parse_policy("* -> * " + ",".join(f"tcp/{p}" for p in range(1, 70)))


def test_ports_canonical() -> None:
    assert parse_ports("tcp/80,tcp/81-90,tcp/85") == parse_ports("tcp/80-90")
    assert parse_ports("tcp/1-65535") == parse_ports("tcp")
    assert parse_ports("udp/5,any") == ANY
    assert str(parse_ports("udp/53,tcp/22,icmp")) == "tcp/22,udp/53,icmp"
    assert parse_ports("tcp/22") | parse_ports("tcp/23") == parse_ports("tcp/22-23")
    assert parse_ports("tcp/22") | ANY == ANY
    p = parse_ports("tcp/554,udp/5000-5010,icmp")
    assert p.allows("tcp", 554) and not p.allows("tcp", 555) and not p.allows("udp", 554)
    assert p.allows("udp", 5010) and p.allows("icmp")
    assert ANY.allows("udp", 1) and not parse_ports("tcp").allows("icmp")


def test_compile_defaults_and_explain() -> None:
    policy = parse_policy(EXAMPLE)
    devices = [FleetDevice("cam1", {"role": "cam", "site": "berlin"}, "203.0.113.1"),
               FleetDevice("nvr1", {"role": "nvr"}, "203.0.113.1"),
               FleetDevice("nvr2", {"role": "nvr", "site": "berlin"}),
               FleetDevice("lamp", {"role": "lamp", "site": "paris"}, "203.0.113.9")]
    c = compile_policy(policy, devices)
    assert c.reach("cam1") == {"nvr1": ANY, "nvr2": ANY}
    assert c.reach("lamp") == {"nvr1": parse_ports("tcp/80-81,udp/5000-5010"),
                               "nvr2": parse_ports("tcp/80-81,udp/5000-5010")}
    assert c.reached_by("lamp") == {}
    assert c.peers("lamp") == {"nvr1", "nvr2"}
    assert c.reached_by("nvr1")["cam1"] == ANY  # the LAN default
    why = c.explain("nvr2")
    assert why["operators"] == "any" and why["hubs"] == "any"
    by_peer = {g["peer"]: g for g in why["reached_by"]}
    assert by_peer["cam1"]["why"] == ["line 2: role=cam -> role=nvr tcp/554",
                                      "line 3: site=berlin <-> site=berlin any",
                                      "line 5: * -> role=nvr tcp/80-81,udp/5000-5010"]
    assert by_peer["lamp"]["ports"] == "tcp/80-81,udp/5000-5010"
    assert [g["peer"] for g in why["reach"]] == ["cam1", "nvr1"]
    with pytest.raises(KeyError):
        c.reach("nobody")


def test_no_rules_means_lan_only() -> None:
    c = compile_policy(parse_policy(""), [FleetDevice("a", {}, "x"), FleetDevice("b", {}, "x"),
                                          FleetDevice("c", {}, "y"), FleetDevice("d", {})])
    assert c.reach("a") == {"b": ANY} and c.reach("c") == {} and c.reach("d") == {}


def test_absent_tag_matches_empty_value() -> None:
    c = compile_policy(parse_policy("role= -> role=nvr tcp/1"),
                       [FleetDevice("untagged", {}), FleetDevice("nvr", {"role": "nvr"})])
    assert c.reach("untagged") == {"nvr": parse_ports("tcp/1")}


# --------------------------------------------------------------------------- the reference

KEYS = ("role", "site")
VALUES = ("a", "b", "")
PORT_TEXTS = ("any", "tcp", "udp/53", "tcp/1-100", "tcp/50-200", "icmp", "udp/1-65535")


def _matches(rule: Rule, src: FleetDevice, dst: FleetDevice) -> bool:
    return (rule.src is None or rule.src.matches(src.tags)) and \
        (rule.dst is None or rule.dst.matches(dst.tags))


def _naive(policy: Policy, devices: list[FleetDevice]
           ) -> tuple[dict[str, dict[str, Ports]], dict[str, dict[str, Ports]]]:
    """Every ordered pair against every rule: O(N^2 x rules)."""
    reach: dict[str, dict[str, Ports]] = {d.name: {} for d in devices}
    inward: dict[str, dict[str, Ports]] = {d.name: {} for d in devices}

    def grant(a: FleetDevice, b: FleetDevice, ports: Ports) -> None:
        old = reach[a.name].get(b.name)
        reach[a.name][b.name] = ports if old is None else old | ports
        old = inward[b.name].get(a.name)
        inward[b.name][a.name] = ports if old is None else old | ports

    for a in devices:
        for b in devices:
            if a.name == b.name:
                continue
            if a.lan is not None and a.lan == b.lan:
                grant(a, b, ANY)
            for rule in policy.rules:
                if _matches(rule, a, b) or (rule.both and _matches(rule, b, a)):
                    grant(a, b, rule.ports)
    return reach, inward


def _why(policy: Policy, a: FleetDevice, b: FleetDevice) -> list[str]:
    """Why `a` may reach `b`: each allowing rule in file order, then the LAN default."""
    out = [r.reason() for r in policy.rules
           if _matches(r, a, b) or (r.both and _matches(r, b, a))]
    return out + (["default: LAN neighbour (same public address)"]
                  if a.lan is not None and a.lan == b.lan else [])


def _selector_text(conditions: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in conditions.items()) or "*"


selectors = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=2)
rules = st.tuples(selectors, st.booleans(), selectors,
                  st.lists(st.sampled_from(PORT_TEXTS), min_size=1, max_size=3))
fleets = st.lists(st.tuples(st.dictionaries(st.sampled_from(KEYS + ("other",)),
                                            st.sampled_from(VALUES), max_size=3),
                            st.sampled_from((None, "lan1", "lan2"))), max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(rules, max_size=6), fleets)
def test_compiled_equals_naive(rule_list: list[Any], fleet: list[Any]) -> None:
    text = "\n".join(f"{_selector_text(s)} {'<->' if both else '->'} {_selector_text(d)} "
                     f"{','.join(ports)}" for s, both, d, ports in rule_list)
    policy = parse_policy(text)
    devices = [FleetDevice(f"d{i}", tags, lan) for i, (tags, lan) in enumerate(fleet)]
    compiled = compile_policy(policy, devices)
    reach, inward = _naive(policy, devices)
    by_name = {d.name: d for d in devices}
    for d in devices:
        assert compiled.explain(d.name)["reach"] == [
            {"peer": peer, "ports": str(ports), "why": _why(policy, d, by_name[peer])}
            for peer, ports in sorted(reach[d.name].items())]
        assert compiled.reach(d.name) == reach[d.name]
        assert compiled.reached_by(d.name) == inward[d.name]
        assert compiled.peers(d.name) == set(reach[d.name]) | set(inward[d.name])
    assert compiled.groups <= max(1, len(devices))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(PORT_TEXTS + ("tcp/7", "udp/8-9", "tcp/101")), min_size=1,
                max_size=5), st.sampled_from(("tcp", "udp", "icmp")),
       st.integers(min_value=1, max_value=65535))
def test_ports_union_is_set_union(items: list[str], proto: str, port: int) -> None:
    whole = parse_ports(",".join(items))
    assert whole.allows(proto, port) == any(parse_ports(i).allows(proto, port) for i in items)
    assert parse_ports(str(whole)) == whole
