// The fleetmesh dashboard: a client of the coordinator's operator API (docs/api.md,
// docs/dashboard.md). No build step, no dependencies. Every string from the API reaches the
// page through textContent or setAttribute, never as HTML.
"use strict";

(() => {
  const POLL_MS = 2000;          // issue 7: live updates at most every 2 s
  const PEERS_EVERY_MS = 10000;  // the devices table asks one request per device for paths
  const LOG_WAIT_S = 20;         // long poll for new log lines (the API allows 0..30)
  const LOG_BATCH = 500;
  const MAX_LOG_LINES = 2000;    // lines kept on the page; older ones scroll away
  const MAX_STATUS_RELEASES = 12;  // release rows whose progress the releases page polls

  const API = "/api/v1";
  let csrf = "";
  let current = null;  // {controller} of the view on screen

  class ApiError extends Error {
    constructor(status, message) {
      super(`${message} (HTTP ${status})`);
      this.status = status;
      this.reason = message;
    }
  }
  class SignedOut extends Error {}

  // ------------------------------------------------------------------ DOM helpers

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fill(node, ...children) {
    node.replaceChildren();
    return append(node, children);
  }

  const enc = encodeURIComponent;
  const dash = "—";

  function fmtBytes(n) {
    if (typeof n !== "number" || !isFinite(n)) return dash;
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return `${i === 0 ? n : n.toFixed(n >= 100 ? 0 : 1)} ${units[i]}`;
  }

  function fmtAgo(ts) {
    if (typeof ts !== "number") return dash;
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }

  function fmtTime(ts) {
    if (typeof ts !== "number") return dash;
    return new Date(ts * 1000).toLocaleString();
  }

  function fmtVersion(v) {
    return v === null || v === undefined ? dash : `v${v}`;
  }

  function pct(part, whole) {
    return whole > 0 ? Math.min(100, Math.round((100 * part) / whole)) : 0;
  }

  function badge(text, kind) {
    return h("span", {class: `badge ${kind || String(text).replace(/[^a-z-]/g, "")}`}, text);
  }

  function onlineBadge(online) {
    return h("span", {class: `dot ${online ? "on" : "off"}`}, online ? "online" : "offline");
  }

  function progress(done, total, attrs) {
    const max = Math.max(1, total || 0);
    const value = Math.min(done || 0, max);
    return h("span", {class: "progress"},
      h("progress", {max, value, ...attrs}),
      h("span", {class: "muted"}, `${pct(value, max)}% · ${fmtBytes(done)} / ${fmtBytes(total)}`));
  }

  function table(headers, rows, attrs) {
    return h("table", attrs || {},
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
      h("tbody", {}, rows.length ? rows
        : h("tr", {}, h("td", {colspan: headers.length, class: "muted"}, "nothing yet"))));
  }

  function setStatus(text, bad) {
    const node = document.getElementById("status");
    node.textContent = text;
    node.classList.toggle("bad", !!bad);
  }

  // ------------------------------------------------------------------ API

  async function api(method, path, body, signal) {
    const init = {method, credentials: "same-origin", signal,
                  headers: {"Accept": "application/json"}};
    if (method !== "GET") {
      init.headers["X-CSRF-Token"] = csrf;
      if (body !== undefined) {
        init.headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
    }
    const response = await fetch(path, init);
    if (response.status === 401) {
      showSignIn();
      throw new SignedOut("signed out");
    }
    let data = null;
    if (response.status !== 204) {
      try { data = await response.json(); } catch (_) { data = null; }
    }
    if (!response.ok) {
      const message = data && typeof data.error === "string" ? data.error : response.statusText;
      throw new ApiError(response.status, message || "error");
    }
    return data;
  }

  // An endpoint that an older coordinator lacks answers 404: show what there is.
  async function optional(promise) {
    try {
      return await promise;
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) return null;
      throw e;
    }
  }

  const get = (path, signal) => api("GET", API + path, undefined, signal);

  async function act(what, method, path, body, message) {
    if (!window.confirm(what + "?")) return;
    try {
      await api(method, API + path, body);
      flash(message, `${what}: done`, false);
    } catch (e) {
      if (!(e instanceof SignedOut)) flash(message, `${what}: ${e.message}`, true);
    }
  }

  function flash(node, text, bad) {
    if (!node) return;
    node.textContent = text;
    node.className = `flash ${bad ? "bad" : "good"}`;
  }

  // ------------------------------------------------------------------ shared data

  function appsOf(device) {
    return Array.isArray(device.apps) ? device.apps : [];
  }

  function runningRelease(device) {
    if (device.release !== undefined) return device.release;
    const apps = appsOf(device).slice().sort((a, b) => a.app.localeCompare(b.app));
    return apps.length ? apps[0].running : null;
  }

  function fleetsOf(devices) {
    return [...new Set(devices.map((d) => d.fleet))].sort();
  }

  const peerPaths = new Map();  // device name -> {at, direct, relay, none}

  async function refreshPaths(devices, signal) {
    const now = Date.now();
    const due = devices.filter((d) => d.state === "active" &&
      (!peerPaths.has(d.name) || now - peerPaths.get(d.name).at > PEERS_EVERY_MS));
    await Promise.all(due.map(async (d) => {
      const out = await optional(get(`/devices/${enc(d.name)}/peers`, signal));
      const counts = {at: now, direct: 0, relay: 0, none: 0};
      for (const p of (out && out.peers) || []) {
        if (p.path in counts) counts[p.path] += 1;
      }
      peerPaths.set(d.name, counts);
    }));
  }

  function pathSummary(name) {
    const c = peerPaths.get(name);
    if (!c) return dash;
    const parts = [`${c.direct} direct`, `${c.relay} relay`];
    if (c.none) parts.push(`${c.none} none`);
    return parts.join(" · ");
  }

  // The rollout of one release, from GET .../status; from the devices' own app reports when
  // the coordinator has no status endpoint.
  async function releaseStatus(fleet, app, version, devices, signal) {
    const status = await optional(get(`/releases/${enc(fleet)}/${enc(app)}/${version}/status`,
      signal));
    if (status) return status;
    const rows = [];
    for (const d of devices.filter((x) => x.fleet === fleet && x.state === "active")) {
      const a = appsOf(d).find((x) => x.app === app);
      if (!a) continue;
      let state = a.state;
      if (a.running === version && a.target === version) state = "running";
      else if (a.target !== version) {
        if ((a.failed || []).includes(version)) state = "failed";
        else if (a.running > version) state = "superseded";
        else continue;
      }
      rows.push({device: d.name, state, bytes_done: a.bytes_done, bytes_total: a.bytes_total,
                 running: a.running, target: a.target, online: d.online, error: a.error,
                 lock_since: a.lock_since, lock_stale: false, by_source: a.by_source});
    }
    const count = (pred) => rows.filter(pred).length;
    return {fleet, app, version, devices: rows, derived: true, summary: {
      total: rows.length, running: count((r) => r.state === "running"),
      failed: count((r) => r.state === "failed"),
      downloading: count((r) => r.state === "downloading"),
      waiting: count((r) => r.state === "waiting-lock")}};
  }

  // The releases worth a glance: per app the newest one, and any other that a device of the
  // fleet reports as its target (the rollout under way may not be the newest release).
  function currentReleases(fleet, releases, devices) {
    const targets = new Set();
    for (const d of devices) {
      if (d.fleet !== fleet) continue;
      for (const a of appsOf(d)) if (a.target !== null) targets.add(`${a.app}/${a.target}`);
    }
    const newest = new Set();
    const out = [];
    for (const r of releases) {
      const first = !newest.has(r.app);
      newest.add(r.app);
      if (first || targets.has(`${r.app}/${r.version}`)) out.push({...r, newest: first});
    }
    return out;
  }

  function summaryLine(s) {
    return h("span", {class: "summary"},
      h("b", {}, `${s.running}/${s.total}`), " running",
      s.downloading ? [" · ", h("b", {}, s.downloading), " downloading"] : null,
      s.waiting ? [" · ", h("b", {}, s.waiting), " waiting for lock"] : null,
      s.pending ? [" · ", h("b", {}, s.pending), " pending"] : null,
      s.failed ? [" · ", h("b", {class: "bad"}, s.failed), " failed"] : null);
  }

  // ------------------------------------------------------------------ views

  function poll(ctx, fn) {
    const tick = async () => {
      if (ctx.signal.aborted) return;
      if (!document.hidden) {
        try {
          await fn();
          setStatus(`updated ${new Date().toLocaleTimeString()}`, false);
        } catch (e) {
          if (ctx.signal.aborted || e instanceof SignedOut) return;
          setStatus(e.message || "coordinator unreachable", true);
        }
      }
      if (!ctx.signal.aborted) setTimeout(tick, POLL_MS);
    };
    tick();
  }

  function overview(main, ctx) {
    const cards = h("div", {class: "cards"});
    const rollouts = h("div", {});
    fill(main, h("h1", {}, "Fleet overview"), cards, h("h2", {}, "Rollouts"), rollouts);
    poll(ctx, async () => {
      const {devices} = await get("/devices", ctx.signal);
      const active = devices.filter((d) => d.state === "active");
      const online = active.filter((d) => d.online).length;
      const rows = [];
      for (const fleet of fleetsOf(devices)) {
        const list = await get(`/releases?fleet=${enc(fleet)}`, ctx.signal);
        for (const r of currentReleases(fleet, list.releases, devices)) {
          const st = await releaseStatus(fleet, r.app, r.version, devices, ctx.signal);
          const s = st.summary;
          rows.push(h("tr", {"data-release": `${fleet}/${r.app}/${r.version}`},
            h("td", {}, fleet), h("td", {}, r.app),
            h("td", {}, h("a", {href: `#/release/${enc(fleet)}/${enc(r.app)}/${r.version}`},
              fmtVersion(r.version)), r.newest ? [" ", h("span", {class: "muted"}, "newest")]
              : null),
            h("td", {}, h("progress", {max: Math.max(1, s.total), value: s.running,
                                       "data-running": s.running})),
            h("td", {}, summaryLine(s))));
        }
      }
      fill(cards,
        card("Devices", active.length, "data-count", "devices"),
        card("Online", online, "data-count", "online"),
        card("Offline", active.length - online, "data-count", "offline"),
        card("Fleets", fleetsOf(devices).length, "data-count", "fleets"));
      fill(rollouts, table(["Fleet", "App", "Release", "Running", "Devices"], rows,
                           {class: "rollouts"}));
    });
  }

  function card(label, value, attr, key) {
    return h("div", {class: "card"}, h("div", {class: "value", [attr]: key}, value),
             h("div", {class: "label"}, label));
  }

  function appLines(device, fn) {
    const apps = appsOf(device);
    if (!apps.length) return dash;
    return apps.map((a) => h("div", {class: "line"}, fn(a)));
  }

  function appProgress(device, a) {
    if (a.state !== "downloading") return null;
    return progress(a.bytes_done, a.bytes_total,
                    {"data-device": device.name, "data-app": a.app});
  }

  function devicesView(main, ctx) {
    const body = h("div", {});
    fill(main, h("h1", {}, "Devices"), body);
    poll(ctx, async () => {
      const {devices} = await get("/devices", ctx.signal);
      await refreshPaths(devices, ctx.signal);
      const rows = devices.slice().sort((a, b) => a.name.localeCompare(b.name)).map((d) =>
        h("tr", {"data-device": d.name},
          h("td", {"data-col": "name"}, h("a", {href: `#/device/${enc(d.name)}`}, d.name)),
          h("td", {"data-col": "fleet"}, d.fleet),
          h("td", {"data-col": "online"}, d.state === "active" ? onlineBadge(d.online)
            : badge(d.state)),
          h("td", {"data-col": "mesh", class: "mono"}, d.mesh_ipv4 || dash),
          h("td", {"data-col": "paths"}, pathSummary(d.name)),
          h("td", {"data-col": "release"}, fmtVersion(runningRelease(d))),
          h("td", {"data-col": "target"}, appLines(d, (a) => `${a.app} ${fmtVersion(a.target)}`)),
          h("td", {"data-col": "state"}, appLines(d, (a) => badge(a.state))),
          h("td", {"data-col": "progress"}, appLines(d, (a) => appProgress(d, a))),
          h("td", {"data-col": "reported"}, d.reported_misbehaving > 0
            ? badge(`by ${d.reported_misbehaving}`, "bad") : dash),
          h("td", {"data-col": "tags", class: "small"}, tagsText(d.tags))));
      fill(body, table(["Name", "Fleet", "Online", "Mesh address", "Paths", "Release",
                        "Target", "Update", "Progress", "Reported", "Tags"], rows,
                       {id: "devices"}));
    });
  }

  // A device's tags as `key=value` words, sorted by key (docs/rollouts.md).
  function tagsText(tags) {
    if (!tags || typeof tags !== "object") return dash;
    const words = Object.keys(tags).sort().map((k) => `${k}=${tags[k]}`);
    return words.length ? words.join(" ") : dash;
  }

  // The actions a rollout in `state` accepts (docs/rollouts.md); the API answers 409 to others.
  const ROLLOUT_ACTIONS = [
    ["pause", "Pause", ["running"]],
    ["resume", "Resume", ["paused"]],
    ["promote", "Promote", ["running", "paused"]],
    ["abort", "Abort", ["running", "paused"]],
  ];

  function rolloutPanel(r, message) {
    const path = `/releases/${enc(r.fleet)}/${enc(r.app)}/${r.version}/rollout`;
    const label = `${r.app} v${r.version} in fleet ${r.fleet}`;
    const devices = r.devices || {};
    const phases = (r.phases || []).map((p) => h("tr", {"data-phase": p.index},
      h("td", {}, p.index + 1, p.index === r.phase && r.state !== "done"
        ? [" ", badge("current")] : null),
      h("td", {class: "mono"}, p.spec),
      h("td", {}, (p.devices || []).map((name) => h("span", {class: "member",
        "data-device": name, "data-state": (devices[name] || {}).state || ""},
        h("a", {href: `#/device/${enc(name)}`}, name), " ",
        badge((devices[name] || {}).state || "unknown")))),
      h("td", {}, p.started_at ? fmtTime(p.started_at) : dash),
      h("td", {}, p.ended_at ? fmtTime(p.ended_at) : dash),
      h("td", {}, `${(p.healthy || []).length}/${(p.devices || []).length}`),
      h("td", {class: "error"}, (p.failed || []).join(", "))));
    const buttons = ROLLOUT_ACTIONS.filter(([, , states]) => states.includes(r.state))
      .map(([action, text]) => h("button", {type: "button", "data-action": action,
        class: action === "abort" ? "warn" : null, onclick: () =>
          act(`${text} the rollout of ${label}`, "POST", `${path}/${action}`, undefined,
              message)}, text));
    const events = (r.events || []).map((e) => h("div", {class: "event"},
      h("span", {class: "ts"}, fmtTime(e.at)), " ", e.text));
    return h("section", {class: "rollout", "data-rollout": `${r.fleet}/${r.app}/${r.version}`},
      h("h2", {}, h("a", {href: `#/release/${enc(r.fleet)}/${enc(r.app)}/${r.version}`},
        `${r.app} `, fmtVersion(r.version)), ` fleet ${r.fleet} `,
        h("span", {"data-col": "state"}, badge(r.state))),
      h("p", {class: "muted"}, r.previous === null || r.previous === undefined
        ? "no previous release" : ["previous release ", fmtVersion(r.previous)]),
      r.reason ? h("p", {class: "reason", "data-col": "reason"}, r.reason) : null,
      buttons.length ? h("div", {class: "actions"}, buttons) : null,
      table(["Phase", "Spec", "Devices", "Started", "Ended", "Healthy", "Failed"], phases,
            {class: "phases"}),
      events.length ? h("details", {class: "events"}, h("summary", {}, "Timeline"), events)
        : null);
  }

  function rolloutsView(main, ctx) {
    const body = h("div", {});
    const message = h("p", {class: "flash", id: "rollout-message"});
    fill(main, h("h1", {}, "Rollouts"), message, body);
    const open = new Set();  // timelines the operator opened stay open across polls
    poll(ctx, async () => {
      const {devices} = await get("/devices", ctx.signal);
      const sections = [];
      for (const fleet of fleetsOf(devices)) {
        const out = await optional(get(`/rollouts?fleet=${enc(fleet)}`, ctx.signal));
        if (!out) {
          sections.push(h("p", {class: "muted"}, "This coordinator has no rollouts."));
          break;
        }
        sections.push(...out.rollouts.map((r) => rolloutPanel(r, message)));
      }
      for (const d of body.querySelectorAll("section.rollout details[open]")) {
        open.add(d.parentNode.getAttribute("data-rollout"));
      }
      fill(body, sections.length ? sections
        : h("p", {class: "muted"}, "No rollouts yet: `fleetmesh rollout start`."));
      for (const d of body.querySelectorAll("section.rollout details")) {
        if (open.has(d.parentNode.getAttribute("data-rollout"))) d.open = true;
      }
    });
  }

  // What other devices report this one doing wrong, or what it reports of others: the
  // reporters' claims (docs/security.md, "Misbehaving peers"), one line per device.
  function misbehaviourLines(entries, who) {
    const lines = (entries || []).map((e) => h("div", {"data-peer": e[who]},
      h("strong", {}, e[who]), ": ",
      Object.entries(e.counts || {}).filter(([, n]) => n).map(([r, n]) => `${r} ${n}`)
        .join(", ")));
    return lines.length ? lines : dash;
  }

  function appActions(name, a, message) {
    const out = [];
    if (a.state === "failed" || (a.failed || []).length) {
      out.push(h("button", {type: "button", "data-action": "retry", onclick: () =>
        act(`Retry ${a.app} on ${name}`, "POST", `/devices/${enc(name)}/retry`,
            {app: a.app}, message)}, "Retry"));
    }
    if (a.state === "waiting-lock") {
      out.push(h("button", {type: "button", class: "warn", "data-action": "force", onclick: () =>
        act(`Force ${name} past ${a.app}'s update lock`, "POST", `/devices/${enc(name)}/update`,
            {app: a.app, force: true}, message)}, "Force past lock"));
    }
    return out;
  }

  function lockText(a) {
    if (typeof a.lock_since !== "number") return dash;
    return [`held since ${fmtAgo(a.lock_since)}`, a.lock_stale ? [" ", badge("stale", "bad")]
      : null];
  }

  function deviceView(main, ctx, name) {
    const details = h("div", {});
    const apps = h("div", {});
    const peers = h("div", {});
    const wan = h("div", {});
    const message = h("p", {class: "flash"});
    const logs = h("div", {class: "logs", id: "logs", "aria-live": "polite"});
    const logNote = h("p", {class: "muted"});
    fill(main, h("p", {}, h("a", {href: "#/devices"}, "← Devices")),
         h("h1", {}, "Device ", h("span", {class: "mono"}, name)),
         details, h("h2", {}, "Apps"), message, apps, h("h2", {}, "Peers"), peers,
         h("h2", {}, "WAN bytes by purpose"), wan, h("h2", {}, "Logs"), logNote, logs);
    poll(ctx, async () => {
      let d;
      try {
        d = await get(`/devices/${enc(name)}`, ctx.signal);
      } catch (e) {
        if (e instanceof ApiError && e.status === 404) {
          fill(details, h("p", {class: "bad"}, `No device named ${name}.`));
          return;
        }
        throw e;
      }
      const pr = await optional(get(`/devices/${enc(name)}/peers`, ctx.signal));
      const field = (label, value) => [h("dt", {}, label), h("dd", {}, value)];
      fill(details, h("dl", {class: "grid"},
        field("Fleet", d.fleet), field("State", badge(d.state)),
        field("Online", onlineBadge(d.online)), field("Last seen", fmtAgo(d.last_seen)),
        field("Mesh IPv4", h("span", {class: "mono"}, d.mesh_ipv4 || dash)),
        field("Mesh IPv6", h("span", {class: "mono"}, d.mesh_ipv6 || dash)),
        field("Public endpoint", h("span", {class: "mono"}, d.endpoint || dash)),
        field("LAN endpoints", h("span", {class: "mono"},
          (d.lan_endpoints || []).join(", ") || dash)),
        field("Agent", d.agent_version || dash),
        field("Enrolled", fmtTime(d.enrolled_at)),
        field("Public key", h("span", {class: "mono small"}, d.public_key || dash)),
        field("Reported misbehaving by", h("div", {id: "reported-by"},
          misbehaviourLines(d.reported_by, "reporter"))),
        field("Reports misbehaving", h("div", {id: "reports-about"},
          misbehaviourLines(d.reports_about, "name")))));
      fill(apps, table(["App", "Running", "Target", "Update", "Progress", "Lock", "Error", ""],
        appsOf(d).map((a) => h("tr", {"data-app": a.app},
          h("td", {}, a.app), h("td", {}, fmtVersion(a.running)),
          h("td", {}, fmtVersion(a.target)), h("td", {}, badge(a.state)),
          h("td", {}, appProgress(d, a)), h("td", {}, lockText(a)),
          h("td", {class: "error"}, a.error || ""),
          h("td", {}, appActions(name, a, message))))));
      const peerRows = ((pr && pr.peers) || []).map((p) => h("tr", {},
        h("td", {}, p.peer || h("span", {class: "mono small"}, p.public_key)),
        h("td", {}, badge(p.path)), h("td", {class: "mono"}, p.endpoint || dash),
        h("td", {}, fmtAgo(p.last_handshake))));
      fill(peers, table(["Peer", "Path", "Endpoint", "Last handshake"], peerRows,
                        {id: "peers"}));
      fill(wan, wanTable(d.wan_bytes));
    });
    followLogs(ctx, name, logs, logNote);
  }

  // The device's own WAN byte account (docs/metered.md, "The byte account"): a row per UTC
  // day, newest first, a column per purpose (mesh.control WAN_PURPOSES), the total.
  const WAN_PURPOSES = ["wireguard", "control", "gossip", "blobs", "logs"];

  function wanTable(wan) {
    if (!wan || typeof wan !== "object") {
      return h("p", {class: "muted", id: "wan-bytes"}, "Not reported by this device's agent.");
    }
    const rows = Object.keys(wan).sort().reverse().map((day) => {
      const counts = wan[day] || {};
      const total = WAN_PURPOSES.reduce((sum, p) => sum + (counts[p] || 0), 0);
      return h("tr", {"data-day": day}, h("td", {class: "mono"}, day),
        ...WAN_PURPOSES.map((p) => h("td", {"data-purpose": p}, fmtBytes(counts[p]))),
        h("td", {"data-purpose": "total"}, fmtBytes(total)));
    });
    return table(["Day (UTC)", "WireGuard", "Control", "Gossip", "Blobs", "Logs", "Total"],
                 rows, {id: "wan-bytes"});
  }

  // The newest lines first (tail), then a long poll from there on; at most one request per
  // POLL_MS unless a full batch says more lines are waiting.
  async function followLogs(ctx, name, pane, note) {
    let after = null;
    while (!ctx.signal.aborted) {
      const started = Date.now();
      try {
        const query = after === null ? `tail=${LOG_BATCH}`
          : `after=${after}&limit=${LOG_BATCH}&wait=${document.hidden ? 0 : LOG_WAIT_S}`;
        const out = await get(`/devices/${enc(name)}/logs?${query}`, ctx.signal);
        const lines = out.lines || [];
        const stick = pane.scrollTop + pane.clientHeight >= pane.scrollHeight - 4;
        append(pane, lines.map((l) => h("div", {class: `log ${l.stream}`, "data-seq": l.seq},
          h("span", {class: "ts"}, new Date(l.ts * 1000).toLocaleTimeString()), " ",
          h("span", {class: "app"}, l.app), " ", h("span", {class: "text"}, l.line))));
        while (pane.childElementCount > MAX_LOG_LINES) pane.firstElementChild.remove();
        if (stick) pane.scrollTop = pane.scrollHeight;
        note.textContent = out.dropped ? `${out.dropped} lines dropped (agent buffer full, or over the log rate limit)` : "";
        after = typeof out.next === "number" ? out.next : (after || 0);
        if (lines.length >= LOG_BATCH && after !== null) continue;
        await sleep(POLL_MS - (Date.now() - started), ctx.signal);
      } catch (e) {
        if (ctx.signal.aborted || e instanceof SignedOut) return;
        const missing = e instanceof ApiError && e.status === 404 && e.reason === "Not Found";
        note.textContent = missing ? "This coordinator does not keep device logs."
          : `Logs: ${e.message}`;
        await sleep(e instanceof ApiError && e.status === 404 ? 5 * POLL_MS : POLL_MS,
                    ctx.signal);
      }
    }
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      if (ms <= 0) { resolve(); return; }
      const t = setTimeout(resolve, ms);
      signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, {once: true});
    });
  }

  function releasesView(main, ctx) {
    const body = h("div", {});
    fill(main, h("h1", {}, "Releases"), body);
    poll(ctx, async () => {
      const {devices} = await get("/devices", ctx.signal);
      const sections = [];
      let polled = 0;
      for (const fleet of fleetsOf(devices)) {
        const {releases} = await get(`/releases?fleet=${enc(fleet)}`, ctx.signal);
        const rows = [];
        for (const r of releases) {
          let summary = null;
          if (polled++ < MAX_STATUS_RELEASES) {
            summary = (await releaseStatus(fleet, r.app, r.version, devices, ctx.signal)).summary;
          }
          rows.push(h("tr", {"data-release": `${fleet}/${r.app}/${r.version}`},
            h("td", {}, r.app),
            h("td", {}, h("a", {href: `#/release/${enc(fleet)}/${enc(r.app)}/${r.version}`},
              fmtVersion(r.version))),
            h("td", {}, fmtTime(r.published_at)), h("td", {}, r.layers),
            h("td", {}, fmtBytes(r.size)), h("td", {}, fmtBytes(r.stored_size)),
            h("td", {}, r.delta_size ? fmtBytes(r.delta_size) : dash),
            h("td", {}, summary ? summaryLine(summary) : dash)));
        }
        sections.push(h("h2", {}, "Fleet ", fleet),
          table(["App", "Version", "Published", "Layers", "Size", "Full download", "Deltas",
                 "Devices"], rows));
      }
      fill(body, sections.length ? sections
        : h("p", {class: "muted"}, "No fleets yet: enroll a device first."));
    });
  }

  function layerRows(detail) {
    let size = 0, full = 0, best = 0;
    const rows = detail.layers.map((l, i) => {
      const delta = l.deltas.length ? l.deltas.reduce((a, b) => (b.size < a.size ? b : a))
        : null;
      const cost = delta ? Math.min(delta.size, l.stored_size) : l.stored_size;
      size += l.size; full += l.stored_size; best += cost;
      return h("tr", {"data-layer": i},
        h("td", {}, i + 1), h("td", {class: "mono small"}, String(l.diff_id).slice(0, 19)),
        h("td", {}, fmtBytes(l.size)), h("td", {}, `${fmtBytes(l.stored_size)} (${l.chunks})`),
        h("td", {}, delta ? `${fmtBytes(cost)} (${delta.method} delta)`
          : h("span", {class: "muted"}, `${fmtBytes(cost)} (no delta)`)),
        h("td", {"data-col": "saving"}, delta ? `${100 - pct(cost, l.stored_size)}%` : dash));
    });
    rows.push(h("tr", {class: "total"}, h("td", {}, ""), h("td", {}, "total"),
      h("td", {}, fmtBytes(size)), h("td", {}, fmtBytes(full)),
      h("td", {}, fmtBytes(best)), h("td", {}, full ? `${100 - pct(best, full)}%` : dash)));
    return rows;
  }

  function releaseView(main, ctx, fleet, app, versionText) {
    const version = Number(versionText);
    const path = `/releases/${enc(fleet)}/${enc(app)}/${version}`;
    const info = h("div", {});
    const summary = h("div", {class: "cards"});
    const rolloutLine = h("p", {id: "release-rollout"});
    const message = h("p", {class: "flash"});
    const pinSelect = h("select", {id: "pin-device", "aria-label": "device to pin"});
    const devicesBox = h("div", {});
    const layers = h("div", {});
    const actions = h("div", {class: "actions"},
      h("button", {type: "button", id: "set-target", onclick: () =>
        act(`Make ${app} v${version} the target of fleet ${fleet}`, "PUT",
            `/fleets/${enc(fleet)}/target`, {app, version}, message)},
        "Set as fleet target"),
      h("span", {class: "group"}, pinSelect,
        h("button", {type: "button", id: "pin", onclick: () => {
          if (!pinSelect.value) return;
          act(`Pin ${pinSelect.value} to ${app} v${version}`, "PUT", `/fleets/${enc(fleet)}/target`,
              {app, version, device: pinSelect.value}, message);
        }}, "Pin device")),
      h("button", {type: "button", id: "retry-failed", onclick: () =>
        act(`Retry ${app} v${version} on every device that failed it`, "POST", `${path}/retry`,
            undefined, message)}, "Retry failed"));
    fill(main, h("p", {}, h("a", {href: "#/releases"}, "← Releases")),
         h("h1", {}, `${app} `, fmtVersion(version), h("span", {class: "muted"}, ` fleet ${fleet}`)),
         info, summary, rolloutLine, h("h2", {}, "Actions"), actions, message, h("h2", {}, "Devices"),
         devicesBox, h("h2", {}, "Layers"), layers);
    get(path, ctx.signal).then((detail) => {
      fill(info, h("p", {class: "muted"},
        `published ${fmtTime(detail.published_at)} · signed by key ${detail.key_id} · `,
        `${fmtBytes(detail.size)} in ${detail.layers.length} layers`));
      fill(layers, table(["#", "Layer", "Size", "Full download (chunks)", "With deltas",
                          "Saving"], layerRows(detail), {id: "layers"}));
    }).catch((e) => {
      if (!(e instanceof SignedOut) && !ctx.signal.aborted) fill(info, h("p", {class: "bad"},
        e.message));
    });
    let pinChoices = "";
    poll(ctx, async () => {
      const {devices} = await get(`/devices?fleet=${enc(fleet)}`, ctx.signal);
      const names = devices.filter((d) => d.state === "active").map((d) => d.name).sort();
      if (names.join("\n") !== pinChoices) {  // rebuilt only when it changes: keeps a choice
        const chosen = pinSelect.value;
        fill(pinSelect, h("option", {value: ""}, "device…"),
             names.map((n) => h("option", {value: n, selected: n === chosen}, n)));
        pinChoices = names.join("\n");
      }
      const st = await releaseStatus(fleet, app, version, devices, ctx.signal);
      const s = st.summary;
      let done = 0, total = 0;
      for (const r of st.devices) { done += r.bytes_done || 0; total += r.bytes_total || 0; }
      fill(summary,
        card("Devices", s.total, "data-count", "total"),
        card("Running", s.running, "data-count", "running"),
        card("Downloading", s.downloading, "data-count", "downloading"),
        card("Waiting for lock", s.waiting, "data-count", "waiting"),
        card("Failed", s.failed, "data-count", "failed"),
        h("div", {class: "card wide"}, progress(done, total, {"data-total": "bytes"}),
          h("div", {class: "label"}, "bytes, all devices")));
      const rows = st.devices.map((r) => h("tr", {"data-device": r.device},
        h("td", {}, h("a", {href: `#/device/${enc(r.device)}`}, r.device)),
        h("td", {}, onlineBadge(r.online)), h("td", {}, badge(r.state)),
        h("td", {}, r.bytes_total > 0
          ? progress(r.bytes_done, r.bytes_total, {"data-device": r.device}) : dash),
        h("td", {}, fmtVersion(r.running)), h("td", {}, fmtVersion(r.target)),
        h("td", {}, sources(r.by_source)), h("td", {}, lockText(r)),
        h("td", {class: "error"}, r.error || ""),
        st.rollout ? h("td", {"data-col": "phase"}, typeof r.phase === "number"
          ? r.phase + 1 : dash) : null,
        h("td", {}, appActions(r.device, {app, state: r.state, failed: []}, message))));
      fill(rolloutLine, st.rollout ? [h("a", {href: "#/rollouts"}, "rollout"), " ",
        badge(st.rollout.state), ` phase ${st.rollout.phase + 1} of ${st.rollout.phases}`,
        st.rollout.reason ? h("span", {class: "bad"}, ` — ${st.rollout.reason}`) : null]
        : null);
      fill(devicesBox, st.derived ? h("p", {class: "muted"},
        "(from the devices' own reports: this coordinator has no release status)") : null,
        table(["Device", "Online", "State", "Progress", "Running", "Target", "Bytes from",
               "Lock", "Error", ...(st.rollout ? ["Phase"] : []), ""], rows,
              {id: "release-devices"}));
    });
  }

  function sources(by) {
    if (!by) return dash;
    const parts = [["LAN", by.lan], ["WAN peers", by.wan_peer], ["coordinator", by.coordinator]]
      .filter(([, n]) => n > 0).map(([k, n]) => `${k} ${fmtBytes(n)}`);
    return parts.join(" · ") || dash;
  }

  // ------------------------------------------------------------------ routing and sign-in

  function route() {
    if (current) current.controller.abort();
    const controller = new AbortController();
    current = {controller};
    const ctx = {signal: controller.signal};
    const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean)
      .map((p) => { try { return decodeURIComponent(p); } catch (_) { return p; } });
    const main = document.getElementById("main");
    const page = parts[0] || "overview";
    for (const a of document.querySelectorAll("nav a")) {
      const nav = a.getAttribute("data-nav");
      a.classList.toggle("active", nav === page || (nav === "devices" && page === "device") ||
                                   (nav === "releases" && page === "release"));
    }
    if (page === "devices") devicesView(main, ctx);
    else if (page === "device" && parts[1]) deviceView(main, ctx, parts[1]);
    else if (page === "releases") releasesView(main, ctx);
    else if (page === "rollouts") rolloutsView(main, ctx);
    else if (page === "release" && parts.length === 4) releaseView(main, ctx, ...parts.slice(1));
    else overview(main, ctx);
  }

  function showSignIn() {
    if (current) current.controller.abort();
    current = null;
    csrf = "";
    document.getElementById("app").hidden = true;
    document.getElementById("main").replaceChildren();
    document.getElementById("signin").hidden = false;
    document.getElementById("key").focus();
  }

  async function start() {
    document.getElementById("logout").addEventListener("click", async () => {
      try { await api("POST", "/dashboard/logout"); } catch (_) { /* signed out anyway */ }
      showSignIn();
    });
    let session;
    try {
      session = await api("GET", "/dashboard/session");
    } catch (e) {
      showSignIn();  // 401, or no answer: either way, nothing to show but the sign-in form
      return;
    }
    csrf = session.csrf;
    document.getElementById("signin").hidden = true;
    document.getElementById("app").hidden = false;
    window.addEventListener("hashchange", route);
    route();
  }

  start();
})();
