"""Every replica's URL in the operator's configuration and the SDK's clients (docs/scale.md,
"Replicas"); the failover itself against two real replicas is in
tests/coordinator/test_replicas.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mesh.control import MAX_COORDINATOR_URLS, ControlError, Enrollment
from mesh.tlspin import PinError
from ops.client import OperatorClient, OperatorConfigError, coordinator_urls, load_operator_config
from tests.agent.fakes import enrollment

FP = "a" * 64


def test_urls_are_checked_deduplicated_and_kept_in_order() -> None:
    assert coordinator_urls("https://a:1/") == ("https://a:1",)
    assert coordinator_urls("https://a:1, https://b:2,https://a:1/") == ("https://a:1",
                                                                         "https://b:2")
    assert coordinator_urls(["https://b:2", "https://a:1"]) == ("https://b:2", "https://a:1")
    with pytest.raises(PinError):
        coordinator_urls("https://a:1,http://b:2")
    with pytest.raises(PinError, match="no coordinator URL"):
        coordinator_urls(" , ")


def test_the_operator_config_takes_a_list_in_the_file_or_commas_in_the_environment(
        tmp_path: Path) -> None:
    file = tmp_path / "op.toml"
    file.write_text(f'url = ["https://r1:8443", "https://r2:8443"]\napi_key = "k"\n'
                    f'fingerprint = "{FP}"\n')
    cfg = load_operator_config(file, env={})
    assert cfg.url == "https://r1:8443" and cfg.urls == ("https://r1:8443", "https://r2:8443")
    with cfg.client() as op:
        assert op.urls == cfg.urls and op.url == "https://r1:8443"
    cfg = load_operator_config(file, env={"FLEETMESH_URL": "https://e1:1,https://e2:2"})
    assert cfg.urls == ("https://e1:1", "https://e2:2")
    one = load_operator_config(file, env={"FLEETMESH_URL": "https://e1:1"})
    assert (one.url, one.urls) == ("https://e1:1", ())  # one URL: as before


@pytest.mark.parametrize("value, fragment", [
    ("[]", "url must be a string or a list of them"),
    ('["https://r1:1", 7]', "url must be a string or a list of them"),
    ('["https://r1:1", "http://r2:2"]', "https"),
])
def test_a_bad_url_list_is_one_line(tmp_path: Path, value: str, fragment: str) -> None:
    file = tmp_path / "op.toml"
    file.write_text(f'url = {value}\napi_key = "k"\nfingerprint = "{FP}"\n')
    with pytest.raises(OperatorConfigError, match=fragment) as err:
        load_operator_config(file, env={})
    assert "\n" not in str(err.value)


def test_an_operator_client_starts_with_the_first_url() -> None:
    op = OperatorClient("https://r1:1,https://r2:2", "fmo_secret", fingerprint=FP)
    assert (op.url, op.urls) == ("https://r1:1", ("https://r1:1", "https://r2:2"))
    assert "fmo_secret" not in repr(op)


def test_an_enrollment_carries_the_replicas_urls_and_refuses_bad_ones() -> None:
    e = dataclasses.replace(enrollment("cam-1"), urls=("https://r1:1", "https://r2:2"))
    assert Enrollment.from_json(e.to_json()) == e
    assert "urls" not in enrollment("cam-1").to_json()  # one coordinator: as before
    for bad in (["http://r1:1"], ["https://r1:1,https://r2:2"], [7], "https://r1:1",
                [f"https://r{i}:1" for i in range(MAX_COORDINATOR_URLS + 1)]):
        with pytest.raises(ControlError, match="enrollment"):
            Enrollment.from_json({**e.to_json(), "urls": bad})
