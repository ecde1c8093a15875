"""Device tags over the real HTTP API: PATCH .../tags, tags at provisioning and on tokens,
`?selector=` on the device list, and the refusals (400, 404, 403)."""

from __future__ import annotations

from typing import Any

from .conftest import Harness


async def _tags(h: Harness, name: str, body: dict[str, Any], status: int = 200) -> Any:
    r = await h.op.patch(f"/api/v1/devices/{name}/tags", json=body)
    assert r.status_code == status, r.text
    return r.json()


async def test_set_and_remove_tags_show_in_device_info(h: Harness) -> None:
    await h.enroll("cam-1")
    info = (await h.op.get("/api/v1/devices/cam-1")).json()
    assert info["tags"] == {} and info["timezone"] is None
    assert await _tags(h, "cam-1", {"set": {"site": "berlin", "role": "cam"}}) == \
        {"device": "cam-1", "tags": {"role": "cam", "site": "berlin"}}
    # remove first, then set: a key both removed and set ends up set
    assert await _tags(h, "cam-1", {"set": {"window": "02:00-04:00", "role": "canary"},
                                    "remove": ["site", "role", "absent"]}) == \
        {"device": "cam-1", "tags": {"role": "canary", "window": "02:00-04:00"}}
    info = (await h.op.get("/api/v1/devices/cam-1")).json()
    assert info["tags"] == {"role": "canary", "window": "02:00-04:00"}


async def test_bad_tags_are_400_with_one_line_and_unknown_device_404(h: Harness) -> None:
    await h.enroll("cam-1")
    for body in ({"set": {"Site": "x"}}, {"set": {"site": "a b"}}, {"set": {"site": 3}},
                 {"set": ["site=x"]}, {"remove": "site"}, {"remove": ["Bad Key"]},
                 {"tags": {}}, [1], {"set": {f"k{i}": "v" for i in range(33)}}):
        r = await h.op.patch("/api/v1/devices/cam-1/tags", json=body)
        assert r.status_code == 400, (body, r.text)
        assert "\n" not in r.json()["error"]
    # 32 tags at most in total, counting those the device has
    await _tags(h, "cam-1", {"set": {f"k{i}": "v" for i in range(32)}})
    r = await h.op.patch("/api/v1/devices/cam-1/tags", json={"set": {"one": "more"}})
    assert r.status_code == 400 and "at most 32" in r.json()["error"]
    assert len((await h.op.get("/api/v1/devices/cam-1")).json()["tags"]) == 32
    await _tags(h, "ghost", {"set": {"a": "b"}}, status=404)
    dev = await h.enroll("cam-2")
    r = await dev.client.patch("/api/v1/devices/cam-1/tags", json={"set": {"a": "b"}})
    assert r.status_code in (401, 403)


async def test_selector_filters_the_device_list(h: Harness) -> None:
    for name, tags in (("a", {"site": "berlin", "role": "cam"}),
                       ("b", {"site": "berlin", "role": "gate"}),
                       ("c", {"site": "paris", "role": "cam"}), ("d", {})):
        await h.enroll(name)
        await _tags(h, name, {"set": tags})

    async def names(selector: str) -> list[str]:
        r = await h.op.get("/api/v1/devices", params={"selector": selector})
        assert r.status_code == 200, r.text
        return [d["name"] for d in r.json()["devices"]]

    assert await names("site=berlin") == ["a", "b"]
    assert await names("site=berlin,role=cam") == ["a"]
    assert await names("role=cam+site=paris") == ["c"]
    assert await names("site=") == ["d"]  # absent or empty
    for bad in ("site", "", "Site=x", "site=berlin,site=paris"):
        r = await h.op.get("/api/v1/devices", params={"selector": bad})
        assert r.status_code == 400, (bad, r.text)


async def test_tags_at_provisioning_and_on_tokens(h: Harness) -> None:
    r = await h.op.post("/api/v1/devices", json={"name": "kiosk-1", "fleet": "fleet",
                                                 "tags": {"site": "lyon"}})
    assert r.status_code == 201, r.text
    assert r.json()["device"]["tags"] == {"site": "lyon"}
    await h.enroll(None, token=r.json()["join"]["token"])  # type: ignore[arg-type]
    assert (await h.op.get("/api/v1/devices/kiosk-1")).json()["tags"] == {"site": "lyon"}

    token = await h.token(uses=2, tags={"site": "oslo", "role": "cam"})
    await h.enroll("o-1", token=token)
    await h.enroll("o-2", token=token)
    await h.enroll("plain")
    listed = (await h.op.get("/api/v1/devices", params={"selector": "site=oslo"})).json()
    assert [d["name"] for d in listed["devices"]] == ["o-1", "o-2"]
    assert listed["devices"][0]["tags"] == {"role": "cam", "site": "oslo"}
    assert (await h.op.get("/api/v1/devices/plain")).json()["tags"] == {}

    for path, body in (("/api/v1/tokens", {"fleet": "fleet", "tags": {"A": "b"}}),
                       ("/api/v1/devices", {"name": "k2", "fleet": "fleet", "tags": "x"})):
        r = await h.op.post(path, json=body)
        assert r.status_code == 400, r.text
    assert (await h.op.get("/api/v1/devices/k2")).status_code == 404
