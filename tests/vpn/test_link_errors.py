"""Netlink failures (no IPv6 in a container, no CAP_NET_ADMIN, an address taken) reach the
agent as OSErrors with their errno, which `fleetmesh-agent run` turns into one line and exit 3,
not a traceback (pyroute2's NetlinkError is no OSError)."""

from __future__ import annotations

import errno
import os

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from vpn import iproute


@pytest.mark.parametrize("code", [errno.EACCES, errno.EEXIST, errno.EPERM])
def test_a_netlink_error_comes_out_as_an_oserror_with_its_errno(code: int) -> None:
    with pytest.raises(OSError) as caught, iproute():
        raise NetlinkError(code, "refused")
    assert caught.value.errno == code
    assert str(caught.value).endswith(f"netlink: {os.strerror(code)}")


def test_other_errors_pass_unchanged() -> None:
    with pytest.raises(KeyError), iproute():
        raise KeyError("not netlink")


def test_listing_lan_addresses_turns_a_netlink_error_into_an_oserror(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent reads its LAN addresses every 2 s (a moved device); a netlink failure there
    must be the OSError the agent logs once, never an exception that ends it."""
    import pyroute2

    from agent._device import lan_endpoints

    class Refusing:
        def get_links(self) -> list[object]:
            raise NetlinkError(errno.EBUSY, "dump interrupted")

        def close(self) -> None:
            pass

    monkeypatch.setattr(pyroute2, "IPRoute", Refusing)
    with pytest.raises(OSError) as caught:
        lan_endpoints(51820)
    assert caught.value.errno == errno.EBUSY
