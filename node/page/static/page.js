// The node's page: polls /page.json and draws it. Every value from the node (and so from
// peers) is written with textContent or as an SVG attribute of numbers: never parsed as markup.
"use strict";
(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const W = 400, H = 180, PAD = { l: 44, r: 8, t: 8, b: 18 };
  let sortKey = "short_id", sortDir = 1, lastState = null, lastOk = 0, pollMs = 2000;

  const $ = (sel) => document.querySelector(sel);
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function svgEl(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }
  const num = (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
  function bytes(n) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
  }
  function duration(s) {
    s = Math.round(s);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  }
  function fill(dl, facts) {
    dl.replaceChildren();
    for (const [k, v] of facts) { dl.append(el("dt", k), el("dd", v)); }
  }

  // ---- charts: one SVG per figure, line series or outcome-coloured points
  function chart(name, xs, series, opts = {}) {
    const fig = document.querySelector(`figure[data-chart="${name}"]`);
    const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
    const pts = [];
    series.forEach((s) => s.ys.forEach((y, i) => { if (y !== null && Number.isFinite(y) && Number.isFinite(xs[i])) pts.push([xs[i], y]); }));
    const old = fig.querySelector("svg");
    if (old) old.remove();
    fig.append(svg);
    fig.dataset.points = String(pts.length);
    if (!pts.length) {
      svg.append(Object.assign(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }), { textContent: "no data yet" }));
      return;
    }
    let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
    if (opts.zero) y0 = Math.min(0, y0);
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y1 += Math.abs(y1) * 0.1 || 1; y0 -= opts.zero ? 0 : Math.abs(y0) * 0.1 || 1; }
    const sx = (x) => PAD.l + ((x - x0) / (x1 - x0)) * (W - PAD.l - PAD.r);
    const sy = (y) => H - PAD.b - ((y - y0) / (y1 - y0)) * (H - PAD.t - PAD.b);
    svg.append(svgEl("line", { class: "axis", x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b }),
               svgEl("line", { class: "axis", x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: H - PAD.b }));
    const label = (x, y, text, anchor) => svg.append(Object.assign(svgEl("text", { x, y, "text-anchor": anchor }), { textContent: text }));
    const fmt = opts.fmt || ((v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3)));
    label(PAD.l - 3, PAD.t + 8, fmt(y1), "end"); label(PAD.l - 3, H - PAD.b, fmt(y0), "end");
    label(PAD.l, H - 4, String(Math.round(x0)), "start"); label(W - PAD.r, H - 4, String(Math.round(x1)), "end");
    series.forEach((s, k) => {
      const p = s.ys.map((y, i) => [xs[i], y]).filter(([x, y]) => y !== null && Number.isFinite(y) && Number.isFinite(x));
      if (!p.length) return;
      if (s.classes) {
        p.forEach(([x, y], i) => svg.append(svgEl("circle", { cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 2.5, class: s.classes[i] })));
      } else {
        svg.append(svgEl("polyline", { class: `series s${k}`, "data-series": s.name, "data-points": p.length,
                                       points: p.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ") }));
      }
    });
  }

  function drawCharts(st) {
    chart("loss-step", st.loss.step, [{ name: "train", ys: st.loss.train }, { name: "val", ys: st.loss.val }]);
    chart("loss-time", st.loss.t, [{ name: "train", ys: st.loss.train }, { name: "val", ys: st.loss.val }]);
    chart("throughput", st.rates.t, [{ name: "samples_per_s", ys: st.rates.samples_per_s }], { zero: true });
    chart("network", st.rates.t, [{ name: "sent", ys: st.rates.tx_bps }, { name: "received", ys: st.rates.rx_bps }],
          { zero: true, fmt: (v) => bytes(v) });
    const cls = (o) => (o === "ok" ? "ok" : o === "resync" ? "resync" : "other");
    chart("rounds", st.rounds.map((r) => r.t), [{ name: "rounds", ys: st.rounds.map((r) => r.duration_s),
                                                   classes: st.rounds.map((r) => cls(r.outcome)) }], { zero: true });
    const counts = {};
    st.rounds.forEach((r) => { counts[r.outcome] = (counts[r.outcome] || 0) + 1; });
    const legend = $("#round-legend");
    legend.replaceChildren();
    for (const [o, n] of Object.entries(counts)) { legend.append(el("i", null, cls(o)), el("span", `${o} ${n}`)); }
    chart("stragglers", st.rates.t, [{ name: "stragglers", ys: st.rates.stragglers }], { zero: true });
  }

  // ---- tables
  function drawPeers(peers) {
    const rows = [...peers].sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      return (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y))) * sortDir;
    });
    const body = $("#peers tbody");
    body.replaceChildren();
    for (const p of rows) {
      const tr = el("tr", null, p.is_self ? "self" : "");
      tr.dataset.peer = p.peer_id;
      tr.title = p.peer_id;
      tr.append(el("td", p.short_id + (p.is_self ? " (this node)" : "")), el("td", p.state), el("td", p.role),
                el("td", p.device), el("td", num(p.samples_per_s, 1)), el("td", p.step),
                el("td", p.is_self ? "now" : `${num(p.last_seen_s, 1)}s ago`));
      body.append(tr);
    }
    document.querySelectorAll("#peers th").forEach((th) => {
      th.classList.toggle("sorted-asc", th.dataset.key === sortKey && sortDir > 0);
      th.classList.toggle("sorted-desc", th.dataset.key === sortKey && sortDir < 0);
    });
    $("#peer-count").textContent = `(${peers.length} peer${peers.length === 1 ? "" : "s"})`;
  }

  function drawPanel(panel) {
    const sec = $("#panel");
    sec.hidden = !panel;
    if (!panel) return;
    sec.dataset.kind = panel.kind;
    $("#panel-title").textContent = panel.title;
    fill($("#panel-facts"), panel.facts);
    const head = el("tr");
    panel.columns.forEach((c) => head.append(el("th", c)));
    $("#panel-table thead").replaceChildren(head);
    const body = $("#panel-table tbody");
    body.replaceChildren();
    for (const row of panel.rows) {
      const tr = el("tr");
      row.forEach((c) => tr.append(el("td", c === null ? "–" : typeof c === "number" && !Number.isInteger(c) ? c.toFixed(3) : c)));
      body.append(tr);
    }
  }

  function drawWarnings(ws) {
    const ul = $("#warnings");
    ul.replaceChildren();
    for (const w of ws) {
      const li = el("li", w.text, `warning ${w.level}`);
      li.dataset.code = w.code;
      ul.append(li);
    }
    $("#all-well").hidden = ws.length > 0;
  }

  function draw(st) {
    const n = st.node;
    document.title = `swarm-node ${n.short_id} · ${n.phase}`;
    $("#short-id").textContent = `…${n.short_id}`;
    const phase = $("#phase");
    phase.textContent = n.phase;
    phase.className = `badge ${n.phase}`;
    fill($("#node-facts"), [
      ["peer id", n.peer_id], ["run", n.run_id], ["strategy", n.strategy], ["role / stage", n.role],
      ["device", n.device], ["memory", bytes(n.memory_bytes)], ["step", n.step],
      ["samples/s", num(n.samples_per_s, 1)], ["train loss", num(n.train_loss)], ["held-out loss", num(n.val_loss)],
      ["uptime", duration(n.uptime_s)], ["version", n.version], ...(n.waiting_for ? [["waiting for", n.waiting_for]] : []),
    ]);
    $("#join-line").textContent = n.join_line || "(no address others can dial yet)";
    $("#copy-join").disabled = !n.join_line;
    drawWarnings(st.warnings);
    drawCharts(st);
    drawPanel(st.panel);
    drawPeers(st.peers);
    document.body.dataset.loaded = "1";
  }

  async function poll() {
    try {
      const r = await fetch("/page.json", { cache: "no-store" });
      if (r.ok) {
        lastState = await r.json();
        lastOk = Date.now();
        pollMs = Math.max(1000, Math.min(10000, 1000 * (lastState.sample_interval_s || 2)));
        draw(lastState);
      } else {
        $("#updated").textContent = r.status === 503 ? "the node is starting…" : `the node answered ${r.status}`;
      }
    } catch (e) {
      $("#phase").textContent = "unreachable";
      $("#phase").className = "badge stopped";
    }
    if (lastOk) $("#updated").textContent = `updated ${duration((Date.now() - lastOk) / 1000)} ago`;
    setTimeout(poll, pollMs);
  }

  function copyJoin() {
    const text = lastState && lastState.node.join_line;
    if (!text) return;
    const done = () => { $("#copied").textContent = "copied"; setTimeout(() => { $("#copied").textContent = ""; }, 2000); };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
    } else {
      fallbackCopy(text, done);
    }
  }
  function fallbackCopy(text, done) {  // plain http on another host: no clipboard API there
    const range = document.createRange();
    range.selectNodeContents($("#join-line"));
    const sel = window.getSelection();
    sel.removeAllRanges(); sel.addRange(range);
    if (document.execCommand && document.execCommand("copy")) done();
    else $("#copied").textContent = "selected: press Ctrl+C";
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#copy-join").addEventListener("click", copyJoin);
    document.querySelectorAll("#peers th[data-key]").forEach((th) => th.addEventListener("click", () => {
      sortDir = th.dataset.key === sortKey ? -sortDir : 1;
      sortKey = th.dataset.key;
      if (lastState) drawPeers(lastState.peers);
    }));
    poll();
  });
})();
