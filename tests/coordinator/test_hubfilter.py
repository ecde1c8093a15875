"""The hub's nftables table, as text (coordinator/_hubfilter.py `ruleset`): what it lets through
is decided by sets built from the peers; the kernel side is tested in
tests/adversarial/test_hub_forwarding.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from coordinator._hubfilter import TABLE, FilterPeer, ruleset
from coordinator._peermap import Member, PeerMapCore
from mesh.control import HubInfo
from mesh.policy import ANY, Ports, nft_matches, parse_policy, parse_ports
from vpn import generate_keypair

HUB4, HUB6 = "10.250.0.1", "fd7a:f1ee:7000::1"
PEERS = [FilterPeer("10.250.0.5", "fd7a:f1ee:7000::5", "lab"),
         FilterPeer("10.250.0.6", "fd7a:f1ee:7000::6", "other"),
         FilterPeer("10.250.0.7", "fd7a:f1ee:7000::7", "lab"),
         FilterPeer("10.250.0.2", "fd7a:f1ee:7000::2", None)]


def elements(text: str, name: str) -> set[str]:
    m = re.search(rf"set {name} {{ type \w+; (?:elements = {{ ([^}}]*) }})? }}", text)
    assert m is not None, name
    return set(m.group(1).split(", ")) if m.group(1) else set()


def test_each_fleet_reaches_only_itself_and_operators_reach_every_device() -> None:
    text = ruleset("fmhub0", HUB4, HUB6, 8443, PEERS)
    assert text.startswith(f"add table inet {TABLE}\ndelete table inet {TABLE}\n")
    # fleets are numbered in name order: lab = 0, other = 1
    assert elements(text, "fleet0_4") == {"10.250.0.5", "10.250.0.7"}
    assert elements(text, "fleet1_4") == {"10.250.0.6"}
    assert elements(text, "fleet1_6") == {"fd7a:f1ee:7000::6"}
    assert elements(text, "operators4") == {"10.250.0.2"}
    assert elements(text, "devices4") == {"10.250.0.5", "10.250.0.6", "10.250.0.7"}
    assert "10.250.0.5 : jump fleet0, 10.250.0.6 : jump fleet1, 10.250.0.7 : jump fleet0" in text
    # the operator is no device: nothing may be sent to it that it did not start
    assert "10.250.0.2 :" not in text
    # the API and echo only on the hub's own addresses; the last word is drop
    assert f"ip daddr {HUB4} tcp dport 8443 accept" in text
    assert f"ip6 daddr {HUB6} tcp dport 8443 accept" in text
    forward = text.split("chain forward {")[1].split("}")[0]
    assert forward.strip().endswith("counter drop")
    assert 'iifname != "fmhub0" oifname != "fmhub0" accept' in forward


def test_no_peers_is_a_valid_table_that_drops_everything_relayed() -> None:
    text = ruleset("fmhub0", HUB4, HUB6, 8443, [])
    assert elements(text, "devices4") == set()
    assert "map source_fleet4 { type ipv4_addr : verdict;  }" in text
    assert "chain fleet0" not in text


def test_same_peers_same_text_whatever_the_order() -> None:
    assert ruleset("fmhub0", HUB4, HUB6, 8443, PEERS) == \
        ruleset("fmhub0", HUB4, HUB6, 8443, list(reversed(PEERS)))


@pytest.mark.parametrize("args", [("fmhub0", HUB4, HUB6, 0), ("fmhub0", HUB4, HUB6, 65536),
                                  ('fm"hub', HUB4, HUB6, 8443), ("fmhub0", HUB6, HUB6, 8443),
                                  ("fmhub0", HUB4, "10.0.0.1", 8443)])
def test_bad_arguments_are_refused(args: tuple[str, str, str, int]) -> None:
    with pytest.raises(ValueError):
        ruleset(*args, PEERS)


# -- a fleet with a reachability policy (docs/policy.md) --------------------------------------

def _policy_fleet() -> tuple[list[FilterPeer], dict[str, list[Ports]]]:
    core = PeerMapCore(HubInfo(generate_keypair().public, "198.51.100.1:51820", HUB4, HUB6,
                               "https://10.250.0.1:8443"))
    core.set_policy("lab", parse_policy("role=cam -> role=nvr tcp/554,udp/5000-5100\n"
                                        "* -> role=gw icmp\n"))
    for i, role in enumerate(("cam", "cam", "nvr", "gw")):
        core.add(Member(f"d{i}", "lab", generate_keypair().public, f"10.250.0.{i + 10}",
                        f"fd7a:f1ee:7000::{i + 10:x}", tags=(("role", role),)))
    core.publish()
    rules, sides = core.filter_rules()
    peers = [FilterPeer(m.mesh_ipv4, m.mesh_ipv6, m.fleet, sides.get(m.name, frozenset()))
             for m in core.members()] + PEERS[1:2] + PEERS[3:]
    return peers, rules


def test_a_policy_fleet_gets_rules_per_edge_and_its_own_port_not_any_to_any() -> None:
    peers, rules = _policy_fleet()
    text = ruleset("fmhub0", HUB4, HUB6, 8443, peers, rules)
    chain = text.split("chain fleet0 {")[1].split("}\n")[0]
    assert "ip daddr @fleet0_4 accept" not in chain  # no longer any device to any device
    assert "ip daddr @fleet0_4 tcp dport { 7946 } accept" in chain  # gossip and blobs
    assert "ip6 daddr @fleet0_6 tcp dport { 7946 } accept" in chain
    # edge 0: cams -> nvr on the rule's ports, one rule per protocol and family
    assert elements(text, "f0e0s4") == {"10.250.0.10", "10.250.0.11"}
    assert elements(text, "f0e0d4") == {"10.250.0.12"}
    assert "ip saddr @f0e0s4 ip daddr @f0e0d4 tcp dport { 554 } accept" in chain
    assert "ip saddr @f0e0s4 ip daddr @f0e0d4 udp dport { 5000-5100 } accept" in chain
    assert "ip6 saddr @f0e0s6 ip6 daddr @f0e0d6 tcp dport { 554 } accept" in chain
    # edge 1: everyone -> the gateway, icmp
    assert elements(text, "f0e1s4") == {f"10.250.0.{i}" for i in range(10, 14)}
    assert "ip saddr @f0e1s4 ip daddr @f0e1d4 meta l4proto icmp accept" in chain
    assert "ip6 saddr @f0e1s6 ip6 daddr @f0e1d6 meta l4proto ipv6-icmp accept" in chain
    # rules grow with the policy's edges: 2 for our port, 2 x 3 for the edges
    assert chain.count(" accept") == 2 + 2 * 2 + 2
    # a fleet without a policy is unchanged: any of its devices to any
    assert "ip daddr @fleet1_4 accept" in text


def test_port_matches_cover_exactly_the_ports() -> None:
    assert nft_matches(ANY, "4") == [""]
    assert nft_matches(parse_ports("tcp,udp/53"), "6") == ["meta l4proto tcp",
                                                            "udp dport { 53 }"]
    assert nft_matches(Ports(()), "4") == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("unshare"),
                    reason="needs root, nft and unshare")
def test_the_kernel_takes_the_policy_table() -> None:
    """Applied for real, in a throwaway network namespace (`unshare -n`: gone with the process)."""
    peers, rules = _policy_fleet()
    text = ruleset("fmhub0", HUB4, HUB6, 8443, peers, rules)
    done = subprocess.run(["unshare", "-n", "sh", "-c",
                           f"nft -f - && nft list chain inet {TABLE} fleet0"],
                          input=text, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert "ip saddr @f0e0s4 ip daddr @f0e0d4 udp dport 5000-5100 accept" in done.stdout
