"""mesh.names: one rule per kind of name, and every checker of that name uses it."""

from __future__ import annotations

import pytest

from agent._lan import valid_name
from mesh.control import ControlError, check_app, check_name
from mesh.names import APP_NAME_RE, DEVICE_NAME_RE, MAX_APP_NAME
from mesh.release import ManifestError, ReleaseManifest, decode_manifest, encode_manifest

DEVICES = {"a": True, "cam-01": True, "0": True, "a" * 63: True, "a" * 64: False, "": False,
           "-cam": False, "cam-": False, "Cam": False, "cam_1": False, "cam.lan": False,
           "cam\n": False}
APPS = {"web": True, "Web.v2_beta-1": True, "0": True, "a" * MAX_APP_NAME: True,
        "a" * (MAX_APP_NAME + 1): False, "": False, ".web": False, "-web": False,
        "we b": False, "web/x": False, "web\n": False}


@pytest.mark.parametrize(("name", "ok"), DEVICES.items())
def test_device_names_agree_everywhere(name: str, ok: bool) -> None:
    assert (DEVICE_NAME_RE.match(name) is not None) is ok
    assert valid_name(name) is ok  # agent LAN discovery
    if ok:
        assert check_name(name) == name  # control messages
    else:
        with pytest.raises(ControlError):
            check_name(name)


@pytest.mark.parametrize(("name", "ok"), APPS.items())
def test_app_names_agree_everywhere(name: str, ok: bool) -> None:
    assert (len(name) <= MAX_APP_NAME and APP_NAME_RE.match(name) is not None) is ok
    manifest = ReleaseManifest("fleet", name, 1, 0, b"{}", ())
    if ok:
        assert check_app(name) == name
        assert decode_manifest(encode_manifest(manifest)).app == name
    else:
        with pytest.raises(ControlError):
            check_app(name)
        with pytest.raises(ManifestError):
            decode_manifest(encode_manifest(manifest))
