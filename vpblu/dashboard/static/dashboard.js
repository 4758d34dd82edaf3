// vpblu dashboard: renders the mesh document and keeps it live over SSE.
// Everything is built with DOM calls and textContent (never innerHTML), so
// names and messages from the API are shown, never run.
"use strict";
(function () {
  const body = document.body;
  const page = body.dataset.page;
  const nodeName = body.dataset.node || null;
  const SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
    return e;
  }
  function age(s) {
    if (s === null || s === undefined) return "never";
    s = Math.floor(s);
    if (s >= 172800) return Math.floor(s / 86400) + "d";
    if (s >= 7200) return Math.floor(s / 3600) + "h";
    if (s >= 120) return Math.floor(s / 60) + "m";
    return s + "s";
  }
  function bytes(v) {
    v = Number(v || 0);
    for (const u of ["B", "KB", "MB", "GB"]) { if (v < 1000) return (u === "B" ? v.toFixed(0) : v.toFixed(1)) + " " + u; v /= 1000; }
    return v.toFixed(1) + " TB";
  }
  function rate(v) { return bytes(v) + "/s"; }
  function cls(status) { return status === "True" ? "ok" : status === "False" ? "down" : "stale"; }
  function fill(tbody, rows) { tbody.replaceChildren(...rows); }
  function nodeTraffic(n) {
    let rx = 0, tx = 0;
    for (const t of n.tunnels || []) { rx += t.rxRate; tx += t.txRate; }
    return n.tunnels ? "↓" + rate(rx) + " ↑" + rate(tx) : "-";
  }

  function renderMesh(view) {
    document.getElementById("summary").replaceChildren(
      el("span", { id: "ready-count" }, `${view.ready}/${view.nodes.length} nodes Ready`),
      el("span", {}, " · leader "), el("b", { id: "leader" }, view.leader || "none"),
      el("span", {}, " · served by " + view.servedBy),
      el("span", { class: "note" }, view.telemetry === "live" ? "" : " · " + view.telemetry));
    fill(document.querySelector("#nodes tbody"), view.nodes.map((n) => el("tr", { id: "node-" + n.name, "data-node": n.name },
      el("td", {}, el("a", { href: "/nodes/" + encodeURIComponent(n.name) }, n.name)),
      el("td", { class: cls(n.ready) }, n.ready), el("td", { class: cls(n.connected) }, n.connected),
      el("td", {}, n.peers || "-"), el("td", {}, n.generation ?? "-"), el("td", {}, age(n.keyAge)),
      el("td", {}, n.rotation || "-"), el("td", {}, nodeTraffic(n)))));
    drawMap(view);
  }

  function drawMap(view) {
    const svg = document.getElementById("map");
    const n = view.nodes.length, cx = 200, cy = 200, r = n > 1 ? 150 : 0;
    const pos = {};
    view.nodes.forEach((node, i) => {
      const a = (2 * Math.PI * i) / Math.max(n, 1) - Math.PI / 2;
      pos[node.name] = [cx + r * Math.cos(a), cy + r * Math.sin(a)];
    });
    const parts = [];
    const drawn = new Set();
    for (const node of view.nodes) {
      for (const t of node.tunnels || []) {
        if (!pos[t.peer]) continue;
        const key = [node.name, t.peer].sort().join("|");
        if (drawn.has(key)) continue;
        drawn.add(key);
        const line = document.createElementNS(SVG, "line");
        const [x1, y1] = pos[node.name], [x2, y2] = pos[t.peer];
        for (const [k, v] of Object.entries({ x1, y1, x2, y2, class: "tunnel " + t.state })) line.setAttribute(k, v);
        const title = document.createElementNS(SVG, "title");
        title.textContent = `${node.name} ↔ ${t.peer}: handshake ${age(t.handshakeAge)} ago, ↓${rate(t.rxRate)} ↑${rate(t.txRate)}`;
        line.append(title);
        parts.push(line);
      }
    }
    for (const node of view.nodes) {
      const [x, y] = pos[node.name];
      const a = document.createElementNS(SVG, "a");
      a.setAttribute("href", "/nodes/" + encodeURIComponent(node.name));
      const c = document.createElementNS(SVG, "circle");
      for (const [k, v] of Object.entries({ cx: x, cy: y, r: 14, class: "node " + cls(node.ready) })) c.setAttribute(k, v);
      const t = document.createElementNS(SVG, "text");
      for (const [k, v] of Object.entries({ x, y: y + 28, class: "label" })) t.setAttribute(k, v);
      t.textContent = node.name;
      a.append(c, t);
      parts.push(a);
    }
    svg.replaceChildren(...parts);
  }

  function renderNode(view) {
    const n = view.nodes.find((x) => x.name === nodeName);
    const detail = document.getElementById("node-detail");
    if (!n) { detail.replaceChildren(el("p", { class: "warn", id: "node-missing" }, "This node is not in the mesh (now).")); return; }
    const last = n.lastRotation || {};
    const rows = [["Ready", n.ready], ["Connected", n.connected], ["Applied", n.applied], ["Key published", n.keyPublished],
      ["Peers up", n.peers || "-"], ["Applied generation", n.generation ?? "-"], ["Key age", age(n.keyAge)],
      ["Public key", n.publicKey || "-"], ["Endpoint", n.endpoint || "-"], ["MTU", n.mtu ?? "-"],
      ["Rotation", n.rotation || "none running"], ["Last rotation", last.outcome ? `${last.outcome} (${last.trigger || ""}) at ${last.finished}` : "-"],
      ["Problem", n.problem || "-"]];
    detail.replaceChildren(el("dl", { id: "facts" }, ...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-fact": k }, v)])));
    fill(document.querySelector("#tunnels tbody"), (n.tunnels || []).map((t) => el("tr", { id: "tunnel-" + t.peer },
      el("td", {}, t.peer), el("td", { class: t.state }, age(t.handshakeAge)), el("td", {}, bytes(t.rxBytes)),
      el("td", {}, bytes(t.txBytes)), el("td", {}, rate(t.rxRate)), el("td", {}, rate(t.txRate)), el("td", {}, t.endpoint))));
    if (!n.tunnels) fill(document.querySelector("#tunnels tbody"), [el("tr", {}, el("td", { colspan: 7 }, view.telemetry))]);
    fill(document.querySelector("#conditions tbody"), n.conditions.map((c) => el("tr", {},
      el("td", {}, c.type), el("td", { class: cls(c.status) }, c.status), el("td", {}, c.reason || ""),
      el("td", {}, c.message || ""), el("td", {}, c.lastTransitionTime || ""))));
  }

  function renderPolicies(view) {
    fill(document.querySelector("#policies tbody"), view.policies.map((p) => el("tr", { id: "policy-" + p.kind + "-" + p.name },
      el("td", {}, p.kind), el("td", {}, p.name), el("td", { class: cls(p.accepted) }, p.accepted),
      el("td", {}, p.appliedOn), el("td", {}, p.summary),
      el("td", {}, p.conditions.map((c) => `${c.type}=${c.status} ${c.reason || ""}: ${c.message || ""}`).join("; ")))));
  }

  function renderEvents(view) {
    fill(document.querySelector("#events tbody"), view.events.map((e) => el("tr", {},
      el("td", {}, e.time), el("td", {}, e.object), el("td", {}, e.type), el("td", { class: cls(e.status) }, e.status),
      el("td", {}, e.reason || ""), el("td", {}, e.message || ""))));
  }

  const render = { mesh: renderMesh, node: renderNode, policies: renderPolicies, events: renderEvents }[page];
  if (!render) return;
  const initial = document.getElementById("mesh-data");
  if (initial) render(JSON.parse(initial.textContent));
  const live = document.getElementById("live");
  const source = new EventSource("/api/stream");
  source.addEventListener("mesh", (ev) => { render(JSON.parse(ev.data)); live.className = "live on"; body.dataset.updated = String(Date.now()); });
  source.addEventListener("unavailable", () => { live.className = "live off"; });
  source.addEventListener("refused", () => { source.close(); window.location.reload(); });
  source.addEventListener("expired", () => { source.close(); window.location.assign("/login"); });
  source.onerror = () => { live.className = "live off"; };
})();
