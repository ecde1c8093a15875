"""The OpenAPI 3.1 document served at /openapi.json, written by hand from docs/api.md."""

from __future__ import annotations

import re
from typing import Any

from mesh.control import (
    APP_STATES,
    LOG_STREAMS,
    MAX_APPS,
    MAX_BODY_BYTES,
    MAX_COUNT,
    MAX_ERROR_LEN,
    MAX_FAILED,
    MAX_LOG_BODY,
    MAX_LOG_LINE,
    MAX_LOG_LINES,
    MAX_MAP_PEERS,
    MAX_PEERS,
    MAX_WAN_BYTES,
    MAX_WAN_DAYS,
    MISBEHAVIOURS,
    WAN_BUDGET_PERIODS,
    WAN_PURPOSES,
)
from mesh.names import APP_NAME_RE, DEVICE_NAME_RE, MAX_APP_NAME
from mesh.policy import MAX_POLICY_BYTES
from mesh.release import MAX_ROOT_CHAIN, MAX_ROOT_KEYS
from mesh.rollout import (
    MAX_MIN_DEVICES,
    MAX_PHASES_TEXT,
    MAX_SELECTOR_TEXT,
    MAX_TAGS,
    ROLLOUT_STATES,
    TAG_KEY_RE,
    TAG_VALUE_RE,
)

from ._http import MAX_INT
from ._rollout import DEVICE_STATES
from ._rollouts import ACTIONS
from .routes.devices import DEFAULT_WAIT, MAX_WAIT
from .routes.logs import DEFAULT_LOG_PAGE, MAX_LOG_PAGE, MAX_LOG_WAIT
from .routes.releases import MAX_PIN_HEX
from .routes.tokens import MAX_EXPIRES_IN, MIN_EXPIRES_IN


def _ecma(regex: re.Pattern[str]) -> str:
    """A Python full-match pattern (`...\\Z`) as a JSON Schema one (ECMA-262, anchored)."""
    return "^" + regex.pattern.removesuffix("\\Z") + "$"


# What the coordinator accepts (mesh.control's checks), so that the document tells clients and
# the fuzzer (tests/fuzz) the same rules the routes enforce.
_DEV = {"type": "string", "pattern": _ecma(DEVICE_NAME_RE)}  # device and fleet names
_DEVN = {"type": ["string", "null"], "pattern": _ecma(DEVICE_NAME_RE)}
_APP = {"type": "string", "pattern": _ecma(APP_NAME_RE), "maxLength": MAX_APP_NAME}
_WG_KEY = {"type": "string", "pattern": "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$",
           "description": "a WireGuard public key: 32 bytes in base64"}
_ED25519_HEX = {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}
# null stands for absent in every optional number a route reads (coordinator._http.int_field,
# mesh.control's counts)
_EXPIRES = {"type": ["integer", "null"], "minimum": MIN_EXPIRES_IN, "maximum": MAX_EXPIRES_IN,
            "default": 3600}
_COUNT = {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_COUNT,
          "description": "absent or null is 0"}
_UINT = {"type": "integer", "minimum": 0, "maximum": MAX_INT}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"description": description or "OK",
            "content": {"application/json": {"schema": schema}}}


_ERR = _json(_ref("Error"), "refused: {\"error\": one line}")
_ERRORS = {str(c): _ERR for c in (400, 401, 403, 404, 409, 413)} | {
    "503": _json(_ref("Error"), "the database (a PostgreSQL store) or the blob store (an S3 "
                                "bucket) did not answer: retry")}
_HTML = {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}
_EITHER: list[dict[str, list[str]]] = [{"operatorKey": []}, {"deviceCredential": []}]
_INT = {"type": "integer"}
_BLOB_ID = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_OCTETS = {"type": "string", "format": "binary"}
_RELEASE_PARAMS = [
    {"name": p, "in": "path", "required": True, "schema": s}
    for p, s in (("fleet", _DEV), ("app", _APP),
                 ("version", {"type": "integer", "minimum": 1, "maximum": MAX_INT}))]
_FLEET = {"name": "fleet", "in": "path", "required": True, "schema": _DEV}
_BLOB_PARAM = {"name": "blob_id", "in": "path", "required": True, "schema": _BLOB_ID}


def _raw(description: str = "raw bytes") -> dict[str, Any]:
    return {"description": description,
            "content": {"application/octet-stream": {"schema": _OCTETS}}}
# the dashboard's session cookie stands in for the key (plus X-CSRF-Token unless GET)
_OPERATOR: list[dict[str, list[str]]] = [{"operatorKey": []}, {"dashboardSession": []}]
_DEVICE: list[dict[str, list[str]]] = [{"deviceCredential": []}]
_NAME = {"name": "name", "in": "path", "required": True, "schema": _DEV}
_STR = {"type": "string"}
# every coordinator replica's URL, this one's first (docs/scale.md, "Replicas"); absent: one
_URLS = {"type": "array", "items": {"type": "string", "pattern": "^https://"}, "maxItems": 16}
_STRN = {"type": ["string", "null"]}
_NUMN = {"type": ["number", "null"]}
_INTN = {"type": ["integer", "null"]}
_EPS = {"type": "array", "items": _STR, "maxItems": 8}
_PLATFORM = {"type": "string", "maxLength": 64,
             "pattern": r"^[a-z0-9]+/[a-z0-9_.-]+(/[a-z0-9_.-]+)?$",
             "description": "the device's platform, os/arch[/variant] in canonical form "
                            "(e.g. linux/amd64, linux/arm64, linux/arm/v7)"}
# device tags (mesh.rollout.check_tags) and selectors (docs/rollouts.md)
_TAGS = {"type": "object", "maxProperties": MAX_TAGS,
         "propertyNames": {"pattern": _ecma(TAG_KEY_RE)},
         "additionalProperties": {"type": "string", "pattern": _ecma(TAG_VALUE_RE)}}
_TAGSN = {"oneOf": [_TAGS, {"type": "null"}], "description": "the tags of the device it "
          "enrolls (absent or null: none)"}
_SELECTOR = {"type": "string", "minLength": 1, "maxLength": MAX_SELECTOR_TEXT,
             "description": "key=value conditions, all must hold, separated by ',' or '+' "
                            "(key= matches an absent or empty tag)"}


# what a full peer map and a delta (PeerMapDelta) both carry whole
_MAP_HEAD: dict[str, Any] = {
    "version": {"type": "integer"}, "hub": _ref("HubInfo"),
    "relay_ips": {"type": "array", "items": _STR},
    "targets": {"type": "integer", "description": "revision of this device's release targets: "
                                                  "read /device/target again when it changes"},
    "punch": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
              "description": "peers that asked for a direct path to this device, each with a "
                             "stamp that grows with every request: punch to them again when "
                             "it changes"},
    "logs_wanted_until": {"type": "number",
                          "description": "epoch seconds (coordinator clock): upload app logs "
                                         "until then; 0: keep them on the device"}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


SCHEMAS: dict[str, Any] = {
    # a fleet's reachability policy (docs/policy.md, mesh.policy)
    "Policy": _obj(
        ["fleet", "version", "updated_at", "policy", "rules", "default"], fleet=_STR,
        version=_UINT, updated_at=_NUMN, policy=_STR,
        rules={"type": "array", "items": _obj(
            ["line", "src", "dst", "both", "ports", "text"], line=_INT, src=_STR, dst=_STR,
            both={"type": "boolean"}, ports=_STR, text=_STR)},
        default={"type": "array", "items": _STR}),
    "PolicyCompiled": _obj(
        ["fleet", "version", "device", "operators", "hubs", "reach", "reached_by"],
        fleet=_STR, version=_UINT, device=_STR, operators=_STR, hubs=_STR,
        **{k: {"type": "array", "items": _obj(["peer", "ports", "why"], peer=_STR, ports=_STR,
                                               why={"type": "array", "items": _STR})}
           for k in ("reach", "reached_by")}),
    # mesh.release's root document: the msgpack body and Ed25519 signatures in base64
    "SignedRoot": {**_obj(["format", "body", "signatures"],
                          format={"const": "fleetmesh-signed-root-v1"},
                          body={"type": "string", "contentEncoding": "base64"},
                          signatures={"type": "array", "maxItems": MAX_ROOT_KEYS,
                                      "items": _obj(["key_id", "signature"],
                                                    key_id={"type": "string",
                                                            "pattern": "^[0-9a-f]{16}$"},
                                                    signature=_STR)}),
                   "additionalProperties": False},
    # revoked: a revoked device's credential (401); challenge, hub_public_key: enroll's 409
    "Error": _obj(["error"], error=_STR, revoked={"type": "boolean"}, challenge=_STR,
                  hub_public_key=_STR),
    "HubInfo": _obj(["public_key", "endpoint", "mesh_ipv4", "mesh_ipv6", "api_url"],
                    public_key=_STR, endpoint=_STR, mesh_ipv4=_STR, mesh_ipv6=_STR,
                    api_url=_STR),
    # credential or key_proof: enrolling again an active device (docs/security.md)
    "EnrollRequest": _obj(["token", "public_key"], token=_STR, public_key=_WG_KEY, name=_DEVN,
                          lan_endpoints=_EPS, agent_version=_STR, credential=_STRN,
                          key_proof=_obj(["challenge", "mac"], challenge=_STR, mac=_STR),
                          platform=_PLATFORM),
    "Enrollment": _obj(["device_id", "name", "fleet", "credential", "mesh_ipv4", "mesh_ipv6",
                        "mesh_prefix_v4", "mesh_prefix_v6", "hub"],
                       device_id=_STR, name=_STR, fleet=_STR, credential=_STR, mesh_ipv4=_STR,
                       mesh_ipv6=_STR, mesh_prefix_v4=_STR, mesh_prefix_v6=_STR,
                       hub=_ref("HubInfo"), urls=_URLS),
    "PeerEntry": _obj(["name", "public_key", "mesh_ipv4", "mesh_ipv6", "endpoints", "lan"],
                      name=_STR, public_key=_STR, mesh_ipv4=_STR, mesh_ipv6=_STR,
                      endpoints=_EPS, lan={"type": "boolean"}),
    "PeerMap": _obj(["version", "hub", "peers", "relay_ips"],
                    peers={"type": "array", "items": _ref("PeerEntry"),
                           "maxItems": MAX_MAP_PEERS}, **_MAP_HEAD),
    "PeerMapDelta": {**_obj(["version", "base", "hub", "upsert", "remove", "relay_ips"],
                            base={"type": "integer", "minimum": 0,
                                  "description": "the version this delta applies to: the "
                                                 "device's own map (else it asks for the full "
                                                 "map with version=0)"},
                            upsert={"type": "array", "items": _ref("PeerEntry"),
                                    "maxItems": MAX_MAP_PEERS,
                                    "description": "peers added or changed since base, whole"},
                            remove={"type": "array", "items": _DEV, "maxItems": MAX_MAP_PEERS,
                                    "description": "names gone since base (a name the map "
                                                   "lacks: it came and went)"},
                            **_MAP_HEAD),
                     "description": "GET /device/peermap?delta=1: the changes from the map at "
                                    "`base` to the map at `version` (docs/api.md, \"Incremental "
                                    "peer maps\")"},
    "PeerPath": _obj(["public_key", "path"], public_key=_STR,
                     path={"enum": ["direct", "relay", "none"]}, endpoint=_STRN,
                     last_handshake=_NUMN),
    "DeviceReport": _obj([], lan_endpoints=_EPS, agent_version=_STR,
                         peers={"type": "array", "items": _ref("PeerPath")},
                         apps={"type": "array", "items": _ref("AppStatus"),
                               "maxItems": MAX_APPS},
                         misbehaving_peers={
                             "type": "array", "maxItems": MAX_PEERS,
                             "description": "peers the device's mesh node counted "
                                            "misbehaving since its agent started (a name once)",
                             "items": _obj(["name", "counts"], name=_DEV,
                                           counts=_ref("MisbehaviourCounts"))},
                         link=_ref("LinkState"), wan_bytes=_ref("WanBytes"),
                         wan_budget=_ref("WanBudget"), platform=_PLATFORM,
                         timezone={"type": "string", "maxLength": 64,
                                   "description": "the device's time zone (IANA or UTC±HH:MM)"},
                         stopping={"type": "boolean",
                                   "description": "the agent's last report before it stops "
                                                  "on purpose: the device is offline at once"}),
    "WanBudget": _obj(
        ["limit", "period", "used"],
        limit={"type": "integer", "minimum": 1, "maximum": MAX_WAN_BYTES - 1,
               "description": "WAN bytes allowed per period (fleetmesh-agent run --wan-budget)"},
        period={"enum": list(WAN_BUDGET_PERIODS), "description": "a UTC day or month"},
        used={"type": "integer", "minimum": 0, "maximum": MAX_WAN_BYTES - 1,
              "description": "bytes used this period by the device's own account"},
        over={"type": "boolean", "description": "used >= limit: the device defers log "
                                                "shipping (all but a failing app's tail)"}),
    "WanBytes": {
        "type": "object", "maxProperties": MAX_WAN_DAYS,
        "description": "the device's own WAN byte account: bytes per UTC day (YYYY-MM-DD) "
                       "by purpose (docs/metered.md, \"The byte account\"); reports carry "
                       "today and yesterday",
        "propertyNames": {"pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "additionalProperties": {
            "type": "object", "additionalProperties": False,
            "properties": {p: {"type": "integer", "minimum": 0, "maximum": MAX_WAN_BYTES - 1}
                           for p in WAN_PURPOSES}}},
    "LinkState": _obj(
        ["hub_keepalive"],
        hub_keepalive={"type": "integer", "minimum": 0, "maximum": 86400,
                       "description": "the device's keepalive to the hub, seconds"},
        binding_survived={"type": "number", "minimum": 0, "maximum": 86400,
                          "description": "the longest silence its NAT binding was seen to "
                                         "survive, seconds (0: none measured)"},
        binding_lost={"type": ["number", "null"], "minimum": 0, "maximum": 86400,
                      "description": "the shortest silence it did not survive (null: none)"}),
    "MisbehaviourCounts": {**_obj([], **{r: _COUNT for r in MISBEHAVIOURS}),
                           "additionalProperties": False},
    "SourceBytes": _obj(["lan", "wan_peer", "coordinator"], lan=_COUNT, wan_peer=_COUNT,
                        coordinator=_COUNT),
    "AppStatus": _obj(["app", "state"], app=_STR, running=_INTN, target=_INTN,
                      state={"enum": list(APP_STATES)}, bytes_done=_COUNT, bytes_total=_COUNT,
                      by_source=_ref("SourceBytes"), lock_since=_NUMN,
                      error={"type": ["string", "null"], "maxLength": MAX_ERROR_LEN},
                      failed={"type": "array", "items": _INT, "maxItems": MAX_FAILED},
                      retry_seen=_COUNT, updated_at={"type": "number"}),
    "DeviceApp": {"allOf": [_ref("AppStatus"), _obj(["lock_stale"],
                                                    lock_stale={"type": "boolean"})]},
    "LogUpload": _obj(["lines"], lines={"type": "array", "maxItems": MAX_LOG_LINES,
                                        "items": _obj(["ts", "app", "stream", "line"],
                                                      ts={"type": "number"}, app=_STR,
                                                      stream={"enum": list(LOG_STREAMS)},
                                                      line={"type": "string",
                                                            "maxLength": MAX_LOG_LINE})},
                      dropped=_COUNT),
    "LogPage": _obj(["lines", "next", "dropped"], next=_INT, dropped=_INT,
                    lines={"type": "array", "items": _obj(
                        ["seq", "ts", "app", "stream", "line"], seq=_INT,
                        ts={"type": "number"}, app=_STR, stream={"enum": list(LOG_STREAMS)},
                        line=_STR)}),
    "ReleaseStatus": _obj(["fleet", "app", "version", "devices", "summary"], fleet=_STR,
                          app=_STR, version=_INT, devices={"type": "array", "items": _obj(
                              ["device", "state", "bytes_done", "bytes_total", "running",
                               "target", "online", "error", "lock_since", "lock_stale",
                               "by_source", "updated_at"],
                              device=_STR,
                              state={"enum": [*APP_STATES, "pending", "superseded"]},
                              bytes_done=_INT, bytes_total=_INT, running=_INTN, target=_INTN,
                              online={"type": "boolean"}, error=_STRN, lock_since=_NUMN,
                              lock_stale={"type": "boolean"}, by_source=_ref("SourceBytes"),
                              updated_at=_NUMN,
                              phase={**_INTN, "description": "its phase in the release's "
                                     "rollout (0-based; null: not part of it)"})},
                          rollout={"oneOf": [{"type": "null"}, _obj(
                              ["state", "phase", "phases", "reason"],
                              state={"enum": list(ROLLOUT_STATES)}, phase=_INT, phases=_INT,
                              reason=_STRN)], "description": "the release's rollout (null: "
                                                            "none)"},
                          summary=_obj(["total", "running", "failed", "downloading", "waiting",
                                        "pending", "superseded", "no_platform"], total=_INT,
                                       running=_INT, failed=_INT, downloading=_INT,
                                       waiting=_INT, pending=_INT, superseded=_INT,
                                       no_platform={**_INT, "description": "devices whose "
                                                    "platform the release has no image for"})),
    "DeviceInfo": _obj(["name", "fleet", "state", "online", "public_key", "mesh_ipv4",
                        "mesh_ipv6", "agent_version", "endpoint", "lan_endpoints", "last_seen",
                        "last_report", "enrolled_at"],
                       name=_STR, fleet=_STR,
                       state={"enum": ["provisioned", "active", "revoked"]},
                       online={"type": "boolean"}, public_key=_STRN, mesh_ipv4=_STRN,
                       mesh_ipv6=_STRN, agent_version=_STR, endpoint=_STRN, lan_endpoints=_EPS,
                       last_seen=_NUMN, last_report=_NUMN, enrolled_at=_NUMN, release=_INTN,
                       apps={"type": "array", "items": _ref("DeviceApp")},
                       reported_by={"type": "array", "description": "what other devices of "
                                    "its fleet report it doing wrong (their claims)",
                                    "items": _obj(["reporter", "counts"], reporter=_STR,
                                                  counts=_ref("MisbehaviourCounts"))},
                       reports_about={"type": "array", "description": "what it reports "
                                      "other devices doing wrong",
                                      "items": _obj(["name", "counts"], name=_STR,
                                                    counts=_ref("MisbehaviourCounts"))},
                       reported_misbehaving={"type": "integer", "minimum": 0,
                                             "description": "how many devices report it "
                                                            "misbehaving"},
                       link={"oneOf": [_ref("LinkState"), {"type": "null"}],
                             "description": "how it holds its NAT binding to the hub, as it "
                                            "last reported (null: not reported)"},
                       wan_bytes={"oneOf": [_ref("WanBytes"), {"type": "null"}],
                                  "description": "its byte account, the newest week of days "
                                                 "its reports named, newest first (null: "
                                                 "never reported)"},
                       wan_budget={"oneOf": [_ref("WanBudget"), {"type": "null"}],
                                   "description": "its WAN budget as its last report said "
                                                  "(null: none)"},
                       tags=_TAGS,
                       timezone={"type": ["string", "null"],
                                 "description": "its local time zone, as its last report "
                                                "said (null: not said)"},
                       platform={"type": ["string", "null"],
                                 "description": "os/arch[/variant] (e.g. linux/arm/v7), as its "
                                                "enrollment or last report said (null: not "
                                                "said)"}),
    # uses: at most the fleet's quota of devices (the coordinator's --max-fleet-devices)
    "TokenRequest": _obj(["fleet"], fleet=_DEV,
                         uses={"type": ["integer", "null"], "minimum": 1, "default": 1},
                         expires_in=_EXPIRES, name=_DEVN, tags=_TAGSN),
    "Token": _obj(["token", "fleet", "uses", "expires_at"], token=_STR, fleet=_STR,
                  uses={"type": "integer"}, expires_at={"type": "number"}),
    "Join": _obj(["url", "token", "name", "fleet"], url=_STR, token=_STR, name=_STR,
                 fleet=_STR, urls=_URLS),
    "PeerReport": _obj(["peer", "public_key", "path", "endpoint", "last_handshake"],
                       peer=_STRN, public_key=_STR, path={"enum": ["direct", "relay", "none"]},
                       endpoint=_STRN, last_handshake=_NUMN),
    "OperatorRequest": _obj(["name", "public_key"], name=_DEV, public_key=_WG_KEY),
    "ReleaseInfo": _obj(["fleet", "app", "version", "created_at", "key_id", "layers", "size",
                         "stored_size", "delta_size", "published_at"],
                        fleet=_STR, app=_STR, version=_INT, created_at=_INT, key_id=_STR,
                        layers=_INT, size=_INT, stored_size=_INT, delta_size=_INT,
                        published_at={"type": "number"}),
    "ReleaseDetail": _obj(["fleet", "app", "version", "layers", "platforms"], fleet=_STR,
                          app=_STR, version=_INT, layers={"type": "array", "items": _obj(
                              ["diff_id", "size", "chunks", "stored_size", "deltas",
                               "platform"],
                              diff_id=_STR, size=_INT, chunks=_INT, stored_size=_INT,
                              platform=_STR,
                              deltas={"type": "array", "items": _obj(
                                  ["source_diff_id", "size", "method"], source_diff_id=_STR,
                                  size=_INT, method=_STR)})},
                          platforms={"type": "array", "items": _obj(
                              ["platform", "layers", "size", "stored_size", "delta_size"],
                              platform=_STR, layers=_INT, size=_INT, stored_size=_INT,
                              delta_size=_INT)}),
    "MissingBlobs": _obj(["error", "missing"], error=_STR,
                         missing={"type": "array", "items": _BLOB_ID}),
    "Target": _obj(["fleet", "app", "version", "device", "pin", "set_at"], fleet=_STR,
                   app=_STR, version=_INT, device=_STRN, pin=_STRN,
                   set_at={"type": "number"}),
    "DeviceTarget": _obj(["app", "version", "pin", "force", "retry"], app=_STR, version=_INT,
                         pin=_STRN, force={"type": "boolean"}, retry=_INT,
                         hold={"type": "boolean", "description": "download, do not apply: "
                               "the device's rollout phase has not started"},
                         window={"type": ["string", "null"], "description": "apply only "
                                 "inside this HH:MM-HH:MM window, device-local time"}),
    # POST .../rollout (mesh.rollout.RolloutSpec.from_json); durations: seconds or "5m"
    "RolloutRequest": {**_obj(
        ["phases"],
        phases={"type": "string", "maxLength": MAX_PHASES_TEXT,
                "description": "comma list of counts N, percentages P% (cumulative) and "
                               "selectors key=value+key=value"},
        soak={"type": ["number", "string", "null"], "default": 600},
        max_failures={"type": ["string", "integer", "null"], "default": "0",
                      "description": "N or P%"},
        min_devices={"type": ["integer", "null"], "minimum": 1, "maximum": MAX_MIN_DEVICES,
                     "default": 1},
        selector={"oneOf": [_SELECTOR, {"type": "null"}]},
        window={"type": ["string", "null"], "description": "HH:MM-HH:MM (device-local)"},
        deadline={"type": ["number", "string", "null"], "default": 3600},
        rollback_pin={"type": ["string", "null"], "maxLength": MAX_PIN_HEX,
                      "description": "hex SignedPin of the previous release for every "
                                     "device, signed with the fleet's release key"}),
        "additionalProperties": False},
    "Rollout": _obj(
        ["fleet", "app", "version", "previous", "state", "reason", "phase", "spec", "phases",
         "devices", "created_at", "updated_at", "events"],
        fleet=_STR, app=_STR, version=_INT, previous=_INTN,
        state={"enum": list(ROLLOUT_STATES)}, reason=_STRN, phase=_INT,
        spec={"type": ["object", "null"], "description": "RolloutRequest's fields as "
                                                         "normalised (null while held)"},
        phases={"type": "array", "items": _obj(
            ["index", "spec", "devices", "started_at", "ended_at", "failed", "healthy"],
            index=_INT, spec=_STR, devices={"type": "array", "items": _STR},
            started_at=_NUMN, ended_at=_NUMN, failed={"type": "array", "items": _STR},
            healthy={"type": "array", "items": _STR})},
        devices={"type": "object", "additionalProperties": _obj(
            ["phase", "state", "running_since"], phase=_INT,
            state={"enum": list(DEVICE_STATES)}, running_since=_NUMN, error=_STRN,
            retrying={"type": "boolean", "description": "its reports still name the version "
                      "failed from a try before this rollout started"},
            deadline_from=_NUMN)},
        created_at={"type": "number"}, updated_at={"type": "number"},
        events={"type": "array", "items": _obj(["at", "text"], at={"type": "number"},
                                               text=_STR)}),
    "OperatorInfo": _obj(["name", "mesh_ipv4", "mesh_ipv6", "hub", "mesh_prefix_v4",
                          "mesh_prefix_v6"], name=_STR, mesh_ipv4=_STR, mesh_ipv6=_STR,
                         hub=_ref("HubInfo"), mesh_prefix_v4=_STR, mesh_prefix_v6=_STR),
}


def openapi_document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/api/v1/enroll": {"post": {
            "summary": "enroll a device with a token (no auth)",
            "requestBody": _body(_ref("EnrollRequest")),
            "responses": {"201": _json(_ref("Enrollment")), **_ERRORS}}},
        "/api/v1/device/peermap": {"get": {
            "summary": "long poll for the device's peer map", "security": _DEVICE,
            "parameters": [
                {"name": "version", "in": "query", "schema": {**_UINT, "default": 0}},
                {"name": "wait", "in": "query",
                 "schema": {"type": "number", "default": DEFAULT_WAIT, "minimum": 0,
                            "maximum": MAX_WAIT}},
                {"name": "quiet", "in": "query",
                 "description": "1: the device sends nothing to the hub during this wait (a "
                                "keepalive trial); it counts as online until the wait ends",
                 "schema": {"type": "integer", "enum": [0, 1], "default": 0}},
                {"name": "delta", "in": "query",
                 "description": "1: the device holds the map at `version`: answer with only "
                                "the changes since (a PeerMapDelta) where the coordinator can "
                                "tell them, else the full map; 0: always the full map",
                 "schema": {"type": "integer", "enum": [0, 1], "default": 0}}],
            "responses": {"200": _json({"oneOf": [_ref("PeerMap"), _ref("PeerMapDelta")]}),
                          "304": {"description": "unchanged after waiting"}, **_ERRORS}}},
        "/api/v1/device/state": {"post": {
            "summary": "report LAN candidates, version, per-peer paths, apps and misbehaving peers",
            "security": _DEVICE, "requestBody": _body(_ref("DeviceReport")),
            "responses": {"204": {"description": "recorded"}, **_ERRORS}}},
        "/api/v1/device/punch": {"post": {
            "summary": "ask a peer of the fleet to punch a direct path to this device now (its "
                       "map names the requester with a new stamp; at most one per 10 s per "
                       "pair is passed on)",
            "security": _DEVICE, "requestBody": _body(_obj(["peer"], peer=_DEV)),
            "responses": {"204": {"description": "passed on (or coalesced)"}, **_ERRORS}}},
        "/api/v1/tokens": {"post": {
            "summary": "create an enrollment token", "security": _OPERATOR,
            "requestBody": _body(_ref("TokenRequest")),
            "responses": {"201": _json(_ref("Token")), **_ERRORS}}},
        "/api/v1/devices": {
            "get": {"summary": "list devices", "security": _OPERATOR,
                    "parameters": [{"name": "fleet", "in": "query", "schema": _DEV},
                                   {"name": "selector", "in": "query", "schema": _SELECTOR,
                                    "description": "only devices whose tags match"}],
                    "responses": {"200": _json(_obj(["devices"], devices={
                        "type": "array", "items": _ref("DeviceInfo")})), **_ERRORS}},
            "post": {"summary": "provision a device", "security": _OPERATOR,
                     "requestBody": _body(_obj(["name", "fleet"], name=_DEV, fleet=_DEV,
                                               expires_in=_EXPIRES, tags=_TAGSN)),
                     "responses": {"201": _json(_obj(["device", "join"],
                                                     device=_ref("DeviceInfo"),
                                                     join=_ref("Join"))), **_ERRORS}}},
        "/api/v1/devices/{name}": {"get": {
            "summary": "one device", "security": _OPERATOR, "parameters": [_NAME],
            "responses": {"200": _json(_ref("DeviceInfo")), **_ERRORS}}},
        "/api/v1/devices/{name}/revoke": {"post": {
            "summary": "revoke a device", "security": _OPERATOR, "parameters": [_NAME],
            "responses": {"200": _json(_ref("DeviceInfo")), **_ERRORS}}},
        "/api/v1/devices/{name}/peers": {"get": {
            "summary": "the device's last reported paths", "security": _OPERATOR,
            "parameters": [_NAME],
            "responses": {"200": _json(_obj(["peers"], peers={
                "type": "array", "items": _ref("PeerReport")})), **_ERRORS}}},
        "/api/v1/devices/{name}/tags": {"patch": {
            "summary": "remove, then set, tags of a device (at most 32 in all)",
            "security": _OPERATOR, "parameters": [_NAME],
            "requestBody": _body({**_obj([], set=_TAGSN, remove={
                "type": ["array", "null"], "maxItems": MAX_TAGS,
                "items": {"type": "string", "pattern": _ecma(TAG_KEY_RE)}}),
                "additionalProperties": False}),
            "responses": {"200": _json(_obj(["device", "tags"], device=_STR, tags=_TAGS)),
                          **_ERRORS}}},
        "/api/v1/operators": {"post": {
            "summary": "register an operator workstation as a hub peer",
            "security": _OPERATOR, "requestBody": _body(_ref("OperatorRequest")),
            "responses": {"201": _json(_ref("OperatorInfo")), **_ERRORS}}},
        "/api/v1/blobs/missing": {"post": {
            "summary": "which of these blobs the coordinator lacks", "security": _OPERATOR,
            "requestBody": _body(_obj(["ids"], ids={"type": "array", "items": _BLOB_ID,
                                                    "maxItems": 10000})),
            "responses": {"200": _json(_obj(["missing"], missing={
                "type": "array", "items": _BLOB_ID})), **_ERRORS}}},
        "/api/v1/blobs/{blob_id}": {
            "put": {"summary": "upload a blob (verified against its ID; at most 64 MiB)",
                    "security": _OPERATOR,
                    "parameters": [_BLOB_PARAM, {"name": "kind", "in": "query",
                                                 "required": True,
                                                 "schema": {"enum": ["chunk", "delta"]}}],
                    "requestBody": {"required": True, "content": {
                        "application/octet-stream": {"schema": _OCTETS}}},
                    "responses": {"201": _json(_obj(["id", "kind", "new"]), "stored"),
                                  "200": _json(_obj(["id", "kind", "new"]), "already there"),
                                  **_ERRORS}},
            "get": {"summary": "a blob; honours one Range (bytes=a-b, a-, -n)",
                    "security": _EITHER,
                    "parameters": [_BLOB_PARAM, {"name": "Range", "in": "header",
                                                 "schema": _STR}],
                    "responses": {"200": _raw(), "206": _raw("the range asked for"),
                                  "416": _ERR, **_ERRORS}},
            "head": {"summary": "a blob's headers (size, ranges)", "security": _EITHER,
                     "parameters": [_BLOB_PARAM],
                     "responses": {"200": {"description": "exists"}, **_ERRORS}}},
        "/api/v1/fleets/{fleet}/release-key": {"put": {
            "summary": "set the fleet's Ed25519 release key (hex)", "security": _OPERATOR,
            "parameters": [_FLEET], "requestBody": _body(_obj(["public_key"],
                                                              public_key=_ED25519_HEX)),
            "responses": {"200": _json(_obj(["fleet", "public_key", "key_id"],
                                            fleet=_STR, public_key=_STR, key_id=_STR)),
                          **_ERRORS}}},
        "/api/v1/fleets/{fleet}/root": {
            "put": {"summary": "publish the fleet's next signed root (k-of-n root keys); its "
                               "release key becomes the fleet's",
                    "security": _OPERATOR, "parameters": [_FLEET],
                    "requestBody": _body(_ref("SignedRoot")),
                    "responses": {"200": _json(_obj(
                        ["fleet", "version", "release_key", "key_id", "fingerprint"],
                        fleet=_STR, version=_INT, release_key=_STR, key_id=_STR,
                        fingerprint=_STR)), **_ERRORS}},
            "get": {"summary": "the fleet's signed roots newer than `since`, oldest first "
                               f"(at most {MAX_ROOT_CHAIN})",
                    "security": _EITHER,
                    "parameters": [_FLEET, {"name": "since", "in": "query", "schema": _UINT}],
                    "responses": {"200": _json(_obj(["fleet", "roots"], fleet=_STR, roots={
                        "type": "array", "items": _ref("SignedRoot"),
                        "maxItems": MAX_ROOT_CHAIN})), **_ERRORS}}},
        "/api/v1/fleets/{fleet}/target": {"put": {
            "summary": "the release the fleet's devices (or one device) should run",
            "security": _OPERATOR, "parameters": [_FLEET],
            "requestBody": _body(_obj(
                ["app", "version"], app=_APP,
                version={"type": "integer", "minimum": 1, "maximum": MAX_INT}, device=_DEVN,
                pin={"type": ["string", "null"], "maxLength": MAX_PIN_HEX})),
            "responses": {"200": _json(_ref("Target")), **_ERRORS}}},
        "/api/v1/fleets/{fleet}/policy": {
            "put": {"summary": "set the fleet's reachability policy (docs/policy.md): the file "
                               "as text; 400 names the line that is wrong",
                    "security": _OPERATOR, "parameters": [_FLEET],
                    "requestBody": {"required": True, "content": {"text/plain": {"schema": {
                        "type": "string", "maxLength": MAX_POLICY_BYTES}}}},
                    "responses": {"200": _json(_ref("Policy")), **_ERRORS}},
            "get": {"summary": "the fleet's reachability policy (version 0: none, the default)",
                    "security": _OPERATOR, "parameters": [_FLEET],
                    "responses": {"200": _json(_ref("Policy")), **_ERRORS}}},
        "/api/v1/fleets/{fleet}/policy/compiled": {"get": {
            "summary": "what one active device may reach and what may reach it under the "
                       "fleet's policy, each peer with its ports and the rules that allow them",
            "security": _OPERATOR,
            "parameters": [_FLEET, {"name": "device", "in": "query", "required": True,
                                    "schema": _DEV}],
            "responses": {"200": _json(_ref("PolicyCompiled")), **_ERRORS}}},
        "/api/v1/fleets/{fleet}/timestamp-key": {"get": {
            "summary": "the coordinator's online timestamp public key (hex), to grant",
            "security": _OPERATOR, "parameters": [_FLEET],
            "responses": {"200": _json(_obj(["fleet", "public_key"], fleet=_STR,
                                            public_key=_STR)), **_ERRORS}}},
        "/api/v1/fleets/{fleet}/timestamp-grant": {"put": {
            "summary": "the operator's grant (release key) of the timestamp key for the fleet",
            "security": _OPERATOR, "parameters": [_FLEET],
            "requestBody": _body(_obj(["grant"], grant=_STR)),
            "responses": {"200": _json(_obj(["fleet", "public_key", "granted_at"], fleet=_STR,
                                            public_key=_STR, granted_at=_INT)), **_ERRORS}}},
        "/api/v1/device/timestamp": {"get": {
            "summary": "the fleet's signed, expiring timestamp of its newest releases (hex)",
            "security": _DEVICE,
            "responses": {"200": _json(_obj(["timestamp"], timestamp=_STRN)), **_ERRORS}}},
        "/api/v1/device/target": {"get": {
            "summary": "what this device should run", "security": _DEVICE,
            "responses": {"200": _json(_obj(["targets"], targets={
                "type": "array", "items": _ref("DeviceTarget")})), **_ERRORS}}},
        "/api/v1/releases": {
            "get": {"summary": "a fleet's releases, newest first", "security": _OPERATOR,
                    "parameters": [{"name": "fleet", "in": "query", "required": True,
                                    "schema": _DEV},
                                   {"name": "app", "in": "query", "schema": _APP}],
                    "responses": {"200": _json(_obj(["releases"], releases={
                        "type": "array", "items": _ref("ReleaseInfo")})), **_ERRORS}},
            "post": {"summary": "publish an encoded SignedManifest", "security": _OPERATOR,
                     "parameters": [{"name": "rollout", "in": "query",
                                     "schema": {"enum": ["held"]},
                                     "description": "held: published for no device until "
                                                    "its rollout starts"}],
                     "requestBody": {"required": True, "content": {
                         "application/octet-stream": {"schema": _OCTETS}}},
                     "responses": {"201": _json(_ref("ReleaseInfo"), "published"),
                                   "200": _json(_ref("ReleaseInfo"), "already published"),
                                   **_ERRORS,
                                   "409": _json(_ref("MissingBlobs"),
                                                "blobs missing, or version not newer")}}},
        "/api/v1/releases/{fleet}/{app}/{version}": {
            "get": {"summary": "one release with per-layer details", "security": _OPERATOR,
                    "parameters": _RELEASE_PARAMS,
                    "responses": {"200": _json(_ref("ReleaseDetail")), **_ERRORS}},
            "delete": {"summary": "delete a release and the blobs only it names",
                       "security": _OPERATOR, "parameters": _RELEASE_PARAMS,
                       "responses": {"204": {"description": "deleted"}, **_ERRORS}}},
        "/api/v1/releases/{fleet}/{app}/{version}/manifest": {"get": {
            "summary": "the encoded SignedManifest", "security": _EITHER,
            "parameters": _RELEASE_PARAMS,
            "responses": {"200": _raw("the SignedManifest bytes"), **_ERRORS}}},
        "/api/v1/device/logs": {"post": {
            "summary": f"upload app log lines (body at most {MAX_LOG_BODY} bytes)",
            "security": _DEVICE, "requestBody": _body(_ref("LogUpload")),
            "responses": {"204": {"description": "stored"}, **_ERRORS}}},
        "/api/v1/devices/{name}/logs": {"get": {
            "summary": "the device's log lines after a sequence number; long poll",
            "security": _OPERATOR, "parameters": [_NAME, *(
                {"name": n, "in": "query", "schema": s} for n, s in (
                    ("after", {**_UINT, "default": 0}),
                    ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LOG_PAGE,
                               "default": DEFAULT_LOG_PAGE}),
                    ("wait", {"type": "number", "minimum": 0, "maximum": MAX_LOG_WAIT,
                              "default": 0}),
                    ("tail", {"type": "integer", "minimum": 1, "maximum": MAX_LOG_PAGE})))],
            "responses": {"200": _json(_ref("LogPage")), **_ERRORS}}},
        "/api/v1/devices/{name}/update": {"post": {
            "summary": "force the device past its app's update lock (or take that back)",
            "security": _OPERATOR, "parameters": [_NAME],
            "requestBody": _body(_obj(["app", "force"], app=_APP, force={"type": "boolean"})),
            "responses": {"200": _json(_obj(["device", "app", "version", "force"], device=_STR,
                                            app=_STR, version=_INT,
                                            force={"type": "boolean"})), **_ERRORS}}},
        "/api/v1/devices/{name}/retry": {"post": {
            "summary": "let the device retry the app version it marked failed",
            "security": _OPERATOR, "parameters": [_NAME],
            "requestBody": _body(_obj(["app"], app=_APP)),
            "responses": {"200": _json(_obj(["device", "app", "retry"], device=_STR, app=_STR,
                                            retry=_INT)), **_ERRORS}}},
        "/api/v1/releases/{fleet}/{app}/{version}/status": {"get": {
            "summary": "where each device stands in the release's rollout",
            "security": _OPERATOR, "parameters": _RELEASE_PARAMS,
            "responses": {"200": _json(_ref("ReleaseStatus")), **_ERRORS}}},
        "/api/v1/releases/{fleet}/{app}/{version}/rollout": {
            "post": {"summary": "start the release's rollout (or again, after held, halted "
                                "or aborted)", "security": _OPERATOR,
                     "parameters": _RELEASE_PARAMS, "requestBody": _body(_ref("RolloutRequest")),
                     "responses": {"201": _json(_ref("Rollout")), **_ERRORS}},
            "get": {"summary": "the release's rollout", "security": _OPERATOR,
                    "parameters": _RELEASE_PARAMS,
                    "responses": {"200": _json(_ref("Rollout")), **_ERRORS}}},
        "/api/v1/releases/{fleet}/{app}/{version}/rollout/{action}": {"post": {
            "summary": "pause, resume, abort or promote (end the current phase now) the "
                       "rollout; 409 when not applicable", "security": _OPERATOR,
            "parameters": [*_RELEASE_PARAMS, {"name": "action", "in": "path", "required": True,
                                              "schema": {"enum": list(ACTIONS)}}],
            "responses": {"200": _json(_ref("Rollout")), **_ERRORS}}},
        "/api/v1/rollouts": {"get": {
            "summary": "rollouts, newest first", "security": _OPERATOR,
            "parameters": [{"name": "fleet", "in": "query", "schema": _DEV}],
            "responses": {"200": _json(_obj(["rollouts"], rollouts={
                "type": "array", "items": _ref("Rollout")})), **_ERRORS}}},
        "/api/v1/releases/{fleet}/{app}/{version}/retry": {"post": {
            "summary": "a retry for every device that failed the release",
            "security": _OPERATOR, "parameters": _RELEASE_PARAMS,
            "responses": {"200": _json(_obj(["fleet", "app", "version", "devices"], fleet=_STR,
                                            app=_STR, version=_INT, devices={
                                                "type": "array", "items": _obj(
                                                    ["device", "retry"], device=_STR,
                                                    retry=_INT)})), **_ERRORS}}},
        "/openapi.json": {"get": {"summary": "this document",
                                  "responses": {"200": _json({"type": "object"})}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics, text exposition format 0.0.4 (docs/metrics.md)",
            "security": [{"metricsToken": []}, *_OPERATOR],
            "responses": {"200": {"description": "metrics", "content": {
                "text/plain": {"schema": {"type": "string"}}}}, **_ERRORS}}},
        # the web dashboard (docs/dashboard.md)
        "/": {"get": {"summary": "the dashboard page", "responses": {"200": _HTML}}},
        "/dashboard/app.js": {"get": {"summary": "the dashboard's script",
                                      "responses": {"200": {"description": "JavaScript"}}}},
        "/dashboard/app.css": {"get": {"summary": "the dashboard's style sheet",
                                       "responses": {"200": {"description": "CSS"}}}},
        "/dashboard/login": {"post": {
            "summary": "sign in with the operator key (form field key); sets the session cookie",
            "requestBody": {"required": True, "content": {
                "application/x-www-form-urlencoded": {"schema": _obj(["key"], key=_STR)}}},
            "responses": {"303": {"description": "signed in: to /"},
                          "401": _HTML, "403": _ERR, "413": _ERR}}},
        "/dashboard/session": {"get": {
            "summary": "the session's CSRF token", "security": [{"dashboardSession": []}],
            "responses": {"200": _json(_obj(["csrf", "expires_at"], csrf=_STR,
                                            expires_at={"type": "number"})), "401": _ERR}}},
        "/dashboard/logout": {"post": {
            "summary": "end the session", "security": [{"dashboardSession": []}],
            "responses": {"204": {"description": "signed out"}, "403": _ERR}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "fleetmesh coordinator", "version": "1",
                 "description": f"docs/api.md; request bodies at most {MAX_BODY_BYTES} bytes"},
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "operatorKey": {"type": "http", "scheme": "bearer", "description": "fmo_..."},
            "deviceCredential": {"type": "http", "scheme": "bearer", "description": "fmd_..."},
            "metricsToken": {"type": "http", "scheme": "bearer",
                             "description": "serve --metrics-token-file: GET /metrics only"},
            "dashboardSession": {"type": "apiKey", "in": "cookie", "name": "fm_session",
                                 "description": "POST /dashboard/login"}}},
    }
