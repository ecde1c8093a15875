"""The hub's nftables table, as text (coordinator/_hubfilter.py `ruleset`): what it lets through
is decided by sets built from the peers; the kernel side is tested in
tests/adversarial/test_hub_forwarding.py."""

from __future__ import annotations

import re

import pytest

from coordinator._hubfilter import TABLE, FilterPeer, ruleset

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
