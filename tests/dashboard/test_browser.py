"""The dashboard in a real Chromium against a real coordinator process (see conftest.py).

Each test signs in through the page's own form, reads what the page shows, and compares it
with the API or the CLI. Screenshots go to test-artifacts/dashboard/ (or
$FLEETMESH_TEST_ARTIFACTS/dashboard/).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from mesh.control import PeerMisbehaviour
from tests.coordinator import releasekit
from tests.dashboard.conftest import (
    APP,
    FLEET,
    UI_TIMEOUT_MS,
    Fleet,
    app_status,
    artifacts_dir,
)


def expect(target: Any) -> Any:
    """playwright's expect, imported here: without playwright the browser fixture skips."""
    from playwright.sync_api import expect as pw_expect
    pw_expect.set_options(timeout=UI_TIMEOUT_MS)
    return pw_expect(target)


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    # The coordinator's certificate is self-signed (pinned by fingerprint elsewhere).
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1360, "height": 900})
    ctx.set_default_timeout(UI_TIMEOUT_MS)
    try:
        yield ctx
    finally:
        ctx.close()


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(artifacts_dir() / f"{name}.png"), full_page=True)


def sign_in(context: Any, fleet: Fleet, hash_route: str = "") -> Any:
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(fleet.url + "/")
    expect(page.locator("#signin")).to_be_visible()
    page.fill("#key", fleet.coord.api_key)
    page.click("#signin button[type=submit]")
    expect(page.locator("#app")).to_be_visible()
    page.errors = errors  # checked by the tests: a script error is a failure
    if hash_route:
        page.goto(fleet.url + "/" + hash_route)
    return page


def read_table(page: Any, selector: str) -> list[dict[str, str]]:
    """Rows of a table at one instant (the page re-renders it every poll)."""
    return page.eval_on_selector(selector, """t => [...t.querySelectorAll('tbody tr')].map(
        tr => Object.fromEntries([...tr.querySelectorAll('td[data-col]')].map(
            td => [td.dataset.col, td.innerText.trim()])))""")


def test_sign_in_then_the_device_table_matches_the_cli(context: Any, fleet: Fleet) -> None:
    page = sign_in(context, fleet)
    expect(page.locator("[data-count=devices]")).to_have_text("3")  # active devices
    expect(page.locator("[data-count=online]")).to_have_text("2")
    expect(page.locator("[data-count=offline]")).to_have_text("1")
    expect(page.locator(f"tr[data-release='{FLEET}/{APP}/3']")).to_be_visible()
    shot(page, "overview")

    page.click("nav a[data-nav=devices]")
    expect(page.locator("#devices tbody tr")).to_have_count(4)
    expect(page.locator("tr[data-device=cam-1] td[data-col=paths]")).to_have_text(
        "1 direct · 1 relay")
    want = {d["name"]: d for d in fleet.cli_json("devices", "list")["devices"]}
    shown = {r["name"]: r for r in read_table(page, "#devices")}
    assert set(shown) == set(want) == {"cam-1", "cam-2", "cam-3", "cam-4"}
    for name, d in want.items():
        row = shown[name]
        online = ("online" if d["online"] else "offline") if d["state"] == "active" \
            else d["state"]
        assert row["online"] == online, name
        assert row["mesh"] == (d["mesh_ipv4"] or "—"), name
        release = d.get("release")
        assert row["release"] == ("—" if release is None else f"v{release}"), name
        assert row["fleet"] == d["fleet"] == FLEET
    assert [shown[n]["online"] for n in ("cam-1", "cam-2", "cam-3", "cam-4")] == \
        ["online", "online", "offline", "provisioned"]
    assert [shown[n]["release"] for n in ("cam-1", "cam-2")] == ["v1", "v2"]
    expect(page.locator("#devices progress[data-device=cam-1]")).to_have_attribute("value", "0")
    shot(page, "devices")
    assert page.errors == []


def test_wrong_key_shows_no_data(context: Any, fleet: Fleet) -> None:
    page = context.new_page()
    page.goto(fleet.url + "/")
    page.fill("#key", "fmo_" + "x" * 43)
    with page.expect_response(lambda r: r.url.endswith("/dashboard/login")) as answer:
        page.click("#signin button[type=submit]")
    assert answer.value.status == 401
    expect(page.locator("#signin-error")).to_be_visible()
    shot(page, "wrong-key")
    text = page.content()
    for secret in ("cam-", fleet.devices["cam-1"].mesh_ipv4, FLEET):
        assert secret not in text
    assert context.cookies() == []
    # The API from inside the page, without a session: nothing.
    for path in ("/api/v1/devices", "/api/v1/releases?fleet=cams", "/dashboard/session"):
        status = page.evaluate("p => fetch(p).then(r => r.status)", path)
        assert status == 401, path
    # Back on the dashboard: the sign-in form and an empty app.
    page.goto(fleet.url + "/#/devices")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()
    assert page.locator("#main").inner_text() == ""


def test_csrf_token_guards_state_changes(context: Any, fleet: Fleet) -> None:
    page = sign_in(context, fleet)
    post = """async ([token]) => {
        const headers = {"Content-Type": "application/json"};
        if (token) headers["X-CSRF-Token"] = token;
        const r = await fetch("/api/v1/tokens", {method: "POST", headers,
                                                 body: JSON.stringify({fleet: "cams"})});
        return r.status;
    }"""
    assert page.evaluate("fetch('/api/v1/devices').then(r => r.status)") == 200
    assert page.evaluate(post, [None]) == 403
    assert page.evaluate(post, ["not-the-token"]) == 403
    token = page.evaluate("fetch('/dashboard/session').then(r => r.json()).then(j => j.csrf)")
    assert page.evaluate(post, [token]) == 201
    # The cookie itself is out of the page's reach (HttpOnly).
    assert page.evaluate("document.cookie") == ""
    cookie = next(c for c in context.cookies() if c["name"] == "fm_session")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    # Signing out ends the session for every later request.
    page.click("#logout")
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("fetch('/api/v1/devices').then(r => r.status)") == 401
    assert page.errors == []


@pytest.mark.parametrize("origin, status", [
    ("https://127.0.0.1:1", 403),  # same site (ports do not count): the cookie goes along
    ("https://attacker.test", 401),  # another site: SameSite=Strict keeps the cookie back
])
def test_a_form_posted_from_another_origin_changes_nothing(context: Any, fleet: Fleet,
                                                           origin: str, status: int) -> None:
    sign_in(context, fleet)  # the victim's browser holds a live session
    # A page on the other origin (served by Playwright's router) that posts JSON-looking
    # text/plain to the API, the classic CSRF shape: no custom header, so no CSRF token.
    attack = f"""<!doctype html><form id=f method=post enctype=text/plain
        action="{fleet.url}/api/v1/tokens"><input name='{{"fleet":"{FLEET}","x":"'
        value='"}}'></form><script>document.getElementById("f").submit()</script>"""
    context.route(f"{origin}/**", lambda route: route.fulfill(
        status=200, content_type="text/html", body=attack))
    page = context.new_page()
    with page.expect_response(lambda r: r.url.endswith("/api/v1/tokens")) as answer:
        page.goto(f"{origin}/attack.html")
    assert answer.value.status == status
    assert "fm1." not in answer.value.text()  # no enrollment token was made


def test_device_page_shows_details_and_peer_paths(context: Any, fleet: Fleet) -> None:
    page = sign_in(context, fleet, "#/device/cam-1")
    cam1 = fleet.devices["cam-1"]
    expect(page.locator("dl.grid")).to_contain_text(cam1.mesh_ipv4)
    expect(page.locator("dl.grid")).to_contain_text("dashboard-test")
    peers = page.locator("#peers tbody tr")
    expect(peers).to_have_count(2)
    expect(peers.filter(has_text="cam-2")).to_contain_text("direct")
    expect(peers.filter(has_text="cam-2")).to_contain_text("127.0.0.1:51820")
    expect(peers.filter(has_text="cam-3")).to_contain_text("relay")
    shot(page, "device")
    page.goto(fleet.url + "/#/device/no-such-device")
    expect(page.locator("#main")).to_contain_text("No device named no-such-device")
    assert page.errors == []


def test_release_page_shows_layers_with_delta_savings(context: Any, fleet: Fleet) -> None:
    page = sign_in(context, fleet, f"#/release/{FLEET}/{APP}/2")
    with fleet.operator() as op:
        detail = op.release(FLEET, APP, 2)
    rows = page.locator("#layers tbody tr")
    expect(rows).to_have_count(len(detail["layers"]) + 1)  # and a total
    first = detail["layers"][0]
    assert first["deltas"] and not detail["layers"][1]["deltas"]
    saving = 100 - round(100 * first["deltas"][0]["size"] / first["stored_size"])
    expect(page.locator("tr[data-layer='0'] td[data-col=saving]")).to_have_text(
        f"{saving}%")
    expect(page.locator("tr[data-layer='1'] td[data-col=saving]")).to_have_text("—")
    shot(page, "release-layers")
    assert page.errors == []


def test_device_page_shows_live_logs(context: Any, fleet: Fleet) -> None:
    fleet.upload_logs("cam-2", ("stdout", "server listening on :8080"),
                      ("stderr", "warning: <b>cache</b> cold <img src=x onerror=alert(1)>"))
    page = sign_in(context, fleet, "#/device/cam-2")
    logs = page.locator("#logs")
    expect(logs).to_contain_text("server listening on :8080")
    # Shown as text, never parsed as HTML.
    expect(logs.locator(".log.stderr")).to_contain_text("warning: <b>cache</b> cold <img")
    assert logs.locator("b, img").count() == 0
    expect(page.locator("tr[data-app=web]")).to_contain_text("running")
    # A line uploaded while the page is open arrives through the long poll.
    fleet.upload_logs("cam-2", ("stdout", "GET /health 200"))
    expect(logs).to_contain_text("GET /health 200")
    expect(logs.locator(".log")).to_have_count(3)
    shot(page, "device-logs")
    assert page.errors == []


def test_rollout_progress_bars_move(context: Any, fleet: Fleet) -> None:
    fleet.report("cam-1", app_status("downloading", done=10_000, total=60_000, lan=6_000,
                                     coordinator=4_000))
    page = sign_in(context, fleet, "#/devices")
    bar = page.locator("#devices progress[data-device=cam-1]")
    expect(bar).to_have_attribute("max", "60000")
    expect(bar).to_have_attribute("value", "10000")
    shot(page, "rollout-devices-start")
    fleet.report("cam-1", app_status("downloading", done=35_000, total=60_000, lan=25_000,
                                     coordinator=10_000))
    expect(bar).to_have_attribute("value", "35000")
    shot(page, "rollout-devices-moving")

    page.goto(fleet.url + f"/#/release/{FLEET}/{APP}/2")
    row_bar = page.locator("#release-devices progress[data-device=cam-1]")
    expect(row_bar).to_have_attribute("value", "35000")
    expect(page.locator("#release-devices tr[data-device=cam-1]")).to_contain_text("LAN 25.0 KB")
    expect(page.locator("[data-count=running]")).to_have_text("1")  # cam-2
    expect(page.locator("[data-count=downloading]")).to_have_text("1")
    fleet.report("cam-1", app_status("downloading", done=60_000, total=60_000, lan=50_000,
                                     coordinator=10_000))
    expect(row_bar).to_have_attribute("value", "60000")
    fleet.report("cam-1", app_status("running", running=2, done=60_000, total=60_000))
    expect(page.locator("[data-count=running]")).to_have_text("2")
    expect(page.locator("[data-count=downloading]")).to_have_text("0")
    shot(page, "rollout-release")
    with fleet.operator() as op:
        assert op.release_status(FLEET, APP, 2)["summary"]["running"] == 2
    assert page.errors == []


def test_force_past_a_lock_and_retry_through_the_page(context: Any, fleet: Fleet) -> None:
    held = time.time() - 2 * 3600  # past the coordinator's default lock_stale_after (1 h)
    fleet.report("cam-3", app_status("waiting-lock", lock_since=held, done=60_000,
                                     total=60_000))
    page = sign_in(context, fleet, f"#/release/{FLEET}/{APP}/2")
    page.on("dialog", lambda dialog: dialog.accept())
    row = page.locator("#release-devices tr[data-device=cam-3]")
    expect(row).to_contain_text("waiting-lock")
    expect(row.locator(".badge.bad")).to_have_text("stale")
    assert fleet.target_entries("cam-3")[APP]["force"] is False
    row.locator("button[data-action=force]").click()
    expect(page.locator("p.flash")).to_contain_text("done")
    assert fleet.target_entries("cam-3")[APP]["force"] is True
    shot(page, "release-force")

    fleet.report("cam-3", app_status("failed", error="health check failed: exit 1",
                                     failed=(2,)))
    expect(row).to_contain_text("health check failed: exit 1")
    expect(page.locator("[data-count=failed]")).to_have_text("1")
    retry = fleet.target_entries("cam-3")[APP]["retry"]
    row.locator("button[data-action=retry]").click()
    expect(page.locator("p.flash")).to_contain_text("Retry web on cam-3: done")
    assert fleet.target_entries("cam-3")[APP]["retry"] == retry + 1
    page.click("#retry-failed")
    expect(page.locator("p.flash")).to_contain_text("every device that failed it: done")
    assert fleet.target_entries("cam-3")[APP]["retry"] == retry + 2
    shot(page, "release-retry")
    assert page.errors == []


def test_a_device_reported_misbehaving_is_named_on_the_pages(context: Any,
                                                              fleet: Fleet) -> None:
    """cam-2's mesh node counted cam-3 serving corrupt blobs and sending undecodable frames:
    the device list marks cam-3, its page says who reports what, and cam-2's page what it
    reports, as `fleetmesh devices show` does."""
    fleet.report("cam-2", app_status("running", running=2), misbehaving=(
        PeerMisbehaviour("cam-3", {"corrupt_blob": 2, "bad_frame": 1}),))
    page = sign_in(context, fleet, "#/devices")
    expect(page.locator("tr[data-device=cam-3] td[data-col=reported]")).to_have_text("by 1")
    shown = {r["name"]: r["reported"] for r in read_table(page, "#devices")}
    assert shown == {"cam-1": "—", "cam-2": "—", "cam-3": "by 1", "cam-4": "—"}
    shot(page, "devices-reported")
    page.goto(fleet.url + "/#/device/cam-3")
    expect(page.locator("#reported-by [data-peer=cam-2]")).to_have_text(
        "cam-2: corrupt_blob 2, bad_frame 1")
    expect(page.locator("#reports-about")).to_have_text("—")
    shot(page, "device-reported")
    page.goto(fleet.url + "/#/device/cam-2")
    expect(page.locator("#reports-about [data-peer=cam-3]")).to_have_text(
        "cam-3: corrupt_blob 2, bad_frame 1")
    expect(page.locator("#reported-by")).to_have_text("—")
    cli = fleet.cli_json("devices", "show", "cam-3")
    assert cli["reported_by"] == [{"reporter": "cam-2",
                                   "counts": {"corrupt_blob": 2, "bad_frame": 1}}]
    assert page.errors == []


def test_actions_set_target_and_pin_through_the_page(context: Any, fleet: Fleet) -> None:
    """Last in the module: it moves the fleet's target."""
    page = sign_in(context, fleet, f"#/release/{FLEET}/{APP}/3")
    page.on("dialog", lambda dialog: dialog.accept())
    assert fleet.device_targets("cam-1") == {APP: 2}
    expect(page.locator("#pin-device option[value=cam-2]")).to_have_count(1)
    page.select_option("#pin-device", "cam-2")
    page.click("#pin")
    expect(page.locator("p.flash")).to_contain_text("done")
    assert fleet.device_targets("cam-2") == {APP: 3}
    assert fleet.device_targets("cam-1") == {APP: 2}
    page.click("#set-target")
    expect(page.locator("p.flash")).to_contain_text("target of fleet cams: done")
    assert fleet.device_targets("cam-1") == {APP: 3}
    shot(page, "release-actions")
    # An older version needs an operator-signed pin: the page shows the API's refusal.
    page.goto(fleet.url + f"/#/release/{FLEET}/{APP}/1")
    page.click("#set-target")
    expect(page.locator("p.flash.bad")).to_contain_text("HTTP 409")
    assert fleet.device_targets("cam-1") == {APP: 3}
    assert page.errors == []


def test_device_page_shows_the_byte_account_like_the_cli(context: Any, fleet: Fleet) -> None:
    """cam-2 reports its own WAN byte account: its page shows a row per UTC day, a column
    per purpose and the total, the figures `fleetmesh devices show` prints."""
    wan = {"2026-12-03": {"wireguard": 1200, "control": 4100, "gossip": 0,
                          "blobs": 2_500_000, "logs": 700},
           "2026-12-02": {"wireguard": 9000, "control": 48_000, "gossip": 512, "blobs": 0,
                          "logs": 0}}
    fleet.report("cam-2", app_status("running", running=2), wan_bytes=wan)
    page = sign_in(context, fleet, "#/device/cam-2")
    rows = page.locator("#wan-bytes tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_have_attribute("data-day", "2026-12-03")
    today = page.locator("#wan-bytes tr[data-day='2026-12-03']")
    expect(today.locator("td[data-purpose=wireguard]")).to_have_text("1.2 KB")
    expect(today.locator("td[data-purpose=blobs]")).to_have_text("2.5 MB")
    expect(today.locator("td[data-purpose=total]")).to_have_text("2.5 MB")
    yesterday = page.locator("#wan-bytes tr[data-day='2026-12-02']")
    expect(yesterday.locator("td[data-purpose=control]")).to_have_text("48.0 KB")
    expect(yesterday.locator("td[data-purpose=gossip]")).to_have_text("512 B")
    expect(yesterday.locator("td[data-purpose=total]")).to_have_text("57.5 KB")
    assert fleet.cli_json("devices", "show", "cam-2")["wan_bytes"] == wan
    shot(page, "device-wan-bytes")
    page.goto(fleet.url + "/#/device/cam-3")  # a device that never reported one
    expect(page.locator("#wan-bytes")).to_have_text("Not reported by this device's agent.")
    assert page.errors == []


def test_tags_column_and_the_rollouts_page_with_its_buttons(context: Any, fleet: Fleet) -> None:
    """A phased rollout of another app (`cam`, so web's targets stay as they are): the page
    shows its phases with their devices, and its buttons pause, resume and abort it through
    the API (CSRF header included, as every action)."""
    assert fleet.key is not None
    with fleet.operator() as op:
        op.tag_device("cam-1", set={"site": "berlin", "role": "door"})
        built = releasekit.build(fleet.key, fleet=FLEET, app="cam", version=1)
        for blob_id, (data, kind) in built.blobs.items():
            op.put_blob(blob_id, data, kind)
        op.publish_release(built.signed, rollout="held")
        op.start_rollout(FLEET, "cam", 1, {"phases": "site=berlin,100%", "soak": 3600.0})
    page = sign_in(context, fleet, "#/devices")
    page.on("dialog", lambda dialog: dialog.accept())
    expect(page.locator("tr[data-device=cam-1] td[data-col=tags]")).to_have_text(
        "role=door site=berlin")
    expect(page.locator("tr[data-device=cam-2] td[data-col=tags]")).to_have_text("—")

    page.click("nav a[data-nav=rollouts]")
    panel = page.locator(f"section[data-rollout='{FLEET}/cam/1']")
    expect(panel.locator("[data-col=state]")).to_have_text("running")
    first = panel.locator("tr[data-phase='0'] .member")
    expect(first).to_have_count(1)
    expect(first).to_have_attribute("data-device", "cam-1")
    expect(panel.locator("tr[data-phase='1'] .member[data-device=cam-2]")).to_have_count(1)
    expect(panel.locator("button[data-action=resume]")).to_have_count(0)
    shot(page, "rollouts")

    page.goto(fleet.url + f"/#/release/{FLEET}/cam/1")
    expect(page.locator("#release-rollout")).to_contain_text("running phase 1 of 2")
    expect(page.locator("#release-devices tr[data-device=cam-1] td[data-col=phase]")
           ).to_have_text("1")
    expect(page.locator("#release-devices tr[data-device=cam-2] td[data-col=phase]")
           ).to_have_text("2")
    page.goto(fleet.url + "/#/rollouts")
    panel.locator("button[data-action=pause]").click()
    expect(panel.locator("[data-col=state]")).to_have_text("paused")
    with fleet.operator() as op:
        assert op.rollout(FLEET, "cam", 1)["state"] == "paused"
    panel.locator("button[data-action=resume]").click()
    expect(panel.locator("[data-col=state]")).to_have_text("running")
    panel.locator("button[data-action=abort]").click()
    expect(panel.locator("[data-col=state]")).to_have_text("aborted")
    expect(panel.locator("[data-col=reason]")).to_contain_text("aborted by operator")
    expect(panel.locator("button")).to_have_count(0)
    with fleet.operator() as op:
        assert op.rollout(FLEET, "cam", 1)["state"] == "aborted"
    shot(page, "rollouts-aborted")
    assert page.errors == []
