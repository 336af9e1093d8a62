// obsledger · tonight — the night at a glance, live. Plain JS, no external host: every
// request goes to this server (summary, health, the live stream).
"use strict";

const TOKEN_KEY = "obsledger.token";
const ACTIVITY_ROWS = 200;
const RECENT = 20;
const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  position: 0,            // the last log position applied to the page
  source: null,           // the EventSource
  executions: new Map(), packages: new Map(), staging: new Map(), downloads: new Map(),
  jobs: new Map(), perMinute: new Map(), counts: {}, filesTotal: null,
  live: new Map(),        // download job id -> live progress (download_progress messages)
  dirty: new Set(), frame: 0, refreshTimer: 0, ticketTimer: 0, healthTimer: 0,
  chart: null,
  readyMs: null, shown: new Map(),  // when the page was ready; each command first on screen
};
window.obsledgerDashboard = state;  // tests and the bench read it

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v; else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}
function hhmmss(t) { return t ? String(t).replace(" ", "T").slice(11, 19) : ""; }
function stamp(t) { const d = new Date(String(t).replace(" ", "T")); return isNaN(d) ? null : d; }

// -- talking to the API ----------------------------------------------------------------
async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const r = await fetch(path, Object.assign({}, options, { headers, credentials: "same-origin" }));
  if (r.status === 401) { signOut("Your session has ended: sign in again."); throw new Error("401"); }
  return r;
}

async function signIn(event) {
  event.preventDefault();
  const form = new FormData($("sign-in"));
  $("sign-in-error").textContent = "";
  const body = new URLSearchParams({ username: form.get("username"), password: form.get("password") });
  const r = await fetch("/auth/token", { method: "POST", body });
  if (!r.ok) {
    const err = await r.json().catch(() => ({}));
    $("sign-in-error").textContent = err.detail || `Sign-in refused (${r.status})`;
    return;
  }
  state.token = (await r.json()).access_token;
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $("sign-in").reset();
  await start();
}

function signOut(message) {
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  if (state.source) state.source.close();
  state.source = null;
  clearInterval(state.ticketTimer); clearInterval(state.healthTimer);
  $("night").hidden = true; $("sign-out").hidden = true; $("who").textContent = "";
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
  setPill("stream-state", "offline", "");
}

async function start() {
  const me = await api("/auth/me");
  if (!me.ok) { signOut(); return; }
  const who = await me.json();
  $("who").textContent = `${who.username || who.actor || ""}`;
  $("sign-in").hidden = true; $("night").hidden = false; $("sign-out").hidden = false;
  await ticket();
  state.ticketTimer = setInterval(ticket, 5 * 60 * 1000);
  await loadSummary();
  openStream();
  health();
  state.healthTimer = setInterval(health, 2000);
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  state.readyMs = performance.now();  // first complete render, from navigation start
  document.body.dataset.ready = "true";
}

// the stream ticket cookie: what the EventSource presents (it cannot send the token)
async function ticket() { await api("/stream/session", { method: "POST" }); }

async function loadSummary() {
  const r = await api("/dashboard/summary");
  if (!r.ok) return;
  const s = await r.json();
  setPill("models-state", `read models ${s.read_models}`, s.read_models === "available" ? "ok" : "bad");
  if (!state.source && s.read_model_position !== null) state.position = Math.max(state.position, s.read_model_position);
  state.counts = {
    executions: s.executions.by_status, packages: s.packages.by_status,
    packageBytes: s.packages.bytes_by_status, staging: s.staging.by_status,
    jobs: s.processing_jobs.by_status, fulfillment: s.observation_results.fulfillment_status,
    products: s.observation_results.data_product_status,
  };
  replace(state.executions, s.executions.items);
  replace(state.packages, s.packages.items);
  replace(state.staging, s.staging.queue);
  replace(state.downloads, s.downloads.items);
  replace(state.jobs, s.processing_jobs.items);
  if (s.files.per_minute) {
    state.perMinute = new Map(s.files.per_minute.map((b) => [b.minute.slice(0, 16), b.files]));
  }
  state.filesTotal = s.files.total;
  for (const k of ["executions", "packages", "staging", "downloads", "jobs", "files", "counts"]) state.dirty.add(k);
  schedule();
}

function replace(map, items) {
  // rows only the stream knows (pending, newer than the summary) are kept
  const keep = [...map.values()].filter((r) => r.pending || (r.last_position || 0) > state.position);
  map.clear();
  for (const row of items || []) map.set(String(row.id), row);
  for (const row of keep) if (!map.has(String(row.id))) map.set(String(row.id), row);
}

function refreshSoon() {  // counts by status: read again, at most every 3 s
  if (state.refreshTimer) return;
  state.refreshTimer = setTimeout(() => { state.refreshTimer = 0; loadSummary().catch(() => {}); }, 3000);
}

async function health() {
  try {
    const h = await (await fetch("/health")).json();
    const storeOk = h.store && h.store.reachable;
    setPill("store-state", storeOk ? "store reachable" : "store unreachable", storeOk ? "ok" : "bad");
    const modelsOk = !(h.down || []).includes("read_models");
    setPill("models-state", modelsOk ? "read models available" : "read models unavailable", modelsOk ? "ok" : "bad");
    $("sys-store").textContent = storeOk ? `reachable (${h.store.kind}, head ${h.store.head_position ?? "?"})` : "UNREACHABLE";
    $("sys-models").textContent = modelsOk ? "available" : "UNAVAILABLE (answers from the journal)";
    $("sys-depth").textContent = h.journal.depth;
    $("sys-oldest").textContent = h.journal.oldest_pending_age_s === null ? "none" : seconds(h.journal.oldest_pending_age_s);
    const p = h.projector || {};
    $("sys-projection").textContent = p.lag_events === null || p.lag_events === undefined ? "?" : `${p.lag_events} events`;
    const k = h.kafka;
    $("sys-relay").textContent = !k ? "no relay (Kafka not configured)" :
      (k.lag ? `${k.lag.events} events, ${seconds(k.lag.seconds)}` : "?");
  } catch (e) {
    setPill("store-state", "server unreachable", "bad");
  }
}

function setPill(id, text, cls) { const p = $(id); p.textContent = text; p.className = `pill ${cls}`; }

// -- the live stream -------------------------------------------------------------------
function openStream() {
  if (state.source) state.source.close();
  const source = new EventSource(`/stream?after=${state.position}`);
  state.source = source;
  source.onopen = () => setPill("stream-state", "live", "ok");
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {  // refused (ticket expired?): renew, reopen
      setPill("stream-state", "reconnecting", "warn");
      setTimeout(() => ticket().then(openStream).catch(() => {}), 1000);
    } else {
      setPill("stream-state", "reconnecting", "warn");  // the browser resumes (Last-Event-ID)
    }
  };
  source.addEventListener("change", (e) => onChange(JSON.parse(e.data)));
  source.addEventListener("command", (e) => onCommand(JSON.parse(e.data)));
  source.addEventListener("download_progress", (e) => onProgress(JSON.parse(e.data)));
}

const TABLES = {
  executed_obs_units: ["executions", "executions"], raw_data_packages: ["packages", "packages"],
  staging_requests: ["staging", "staging"], download_jobs: ["downloads", "downloads"],
  processing_jobs: ["jobs", "jobs"],
};

function onChange(m) {
  state.position = Math.max(state.position, m.position);
  for (const c of m.changes || []) {
    const target = TABLES[c.read_model];
    if (c.read_model === "raw_data_files" && c.op === "insert") {
      const minute = String(m.recorded_at).replace(" ", "T").slice(0, 16);
      state.perMinute.set(minute, (state.perMinute.get(minute) || 0) + 1);
      if (state.filesTotal !== null) state.filesTotal += 1;
      state.dirty.add("files");
    }
    if (!target || !c.id) continue;
    const map = state[target[0]];
    const row = Object.assign(map.get(c.id) || { id: c.id }, c.values || {});
    row.pending = false;
    row.last_position = m.position;
    row.fresh = performance.now();
    map.set(c.id, row);
    state.dirty.add(target[1]);
  }
  activity({ id: m.command_id, what: m.event, position: m.position, pending: false });
  state.dirty.add("counts");
  refreshSoon();
  schedule();
}

const PENDING_KINDS = { executed_obs_unit: "executions", raw_data_package: "packages", staging: "staging" };

function onCommand(m) {
  const pending = m.status === "accepted";
  for (const [kind, rows] of Object.entries(m.rows || {})) {
    const target = PENDING_KINDS[kind];
    if (!target) continue;
    for (const row of rows) {
      const existing = state[target].get(String(row.id));
      if (existing && !existing.pending) continue;  // projected already
      state[target].set(String(row.id), Object.assign({}, row, { pending: true }));
      state.dirty.add(target);
    }
  }
  if (m.command_type === "download_job.request" && pending && m.ids.download_job_id) {
    const id = String(m.ids.download_job_id);
    if (!state.downloads.has(id)) {
      state.downloads.set(id, { id, status: "requested", destination: "", bytes_done: 0, bytes_total: null, pending: true });
      state.dirty.add("downloads");
    }
  }
  if (!pending) {  // applied or rejected: the rows it made are no longer pending
    for (const target of Object.values(PENDING_KINDS)) {
      for (const row of state[target].values()) {
        if (row.pending && (row.pending_command_ids || []).includes(m.command_id)) {
          if (m.status === "rejected") state[target].delete(String(row.id)); else row.pending = false;
          state.dirty.add(target);
        }
      }
    }
  }
  activity({ id: m.command_id, what: `${m.command_type}: ${m.status}${m.reason ? " (" + m.reason + ")" : ""}`,
             position: m.position, pending, status: m.status });
  schedule();
}

function onProgress(p) {
  state.live.set(String(p.id), p);
  state.dirty.add("downloads");
  schedule();
}

const activityRows = [];
function activity(a) {
  if (a.status) {  // a command's outcome updates the row of its acceptance
    const i = activityRows.findIndex((r) => r.status && r.id === a.id);
    if (i >= 0) { Object.assign(activityRows[i], a); state.dirty.add("activity"); return; }
  }
  activityRows.unshift(Object.assign({ at: new Date().toISOString() }, a));
  if (activityRows.length > ACTIVITY_ROWS) activityRows.length = ACTIVITY_ROWS;
  state.dirty.add("activity");
}

// -- rendering (one frame at a time) ---------------------------------------------------
function schedule() {
  if (!state.frame) state.frame = requestAnimationFrame(render);
}

function render() {
  state.frame = 0;
  const dirty = state.dirty;
  state.dirty = new Set();
  if (dirty.has("counts")) renderCounts();
  if (dirty.has("executions")) renderExecutions();
  if (dirty.has("files")) renderFiles();
  if (dirty.has("packages")) renderRows("pkg-rows", state.packages, (r) => [r.name, status(r.status), r.file_count, bytes(r.total_size)]);
  if (dirty.has("staging")) renderRows("stg-rows", new Map([...state.staging].filter(([, r]) => ["pending", "in_progress"].includes(r.status))),
    (r) => [r.destination, status(r.status), `${bytes(r.bytes_transferred)} / ${bytes(r.bytes_total)}`]);
  if (dirty.has("downloads")) renderDownloads();
  if (dirty.has("jobs")) renderRows("job-rows", state.jobs, (r) => [r.kind, status(r.status), r.progress !== undefined && r.progress !== null ? `${Math.round(100 * r.progress)} %` : ""]);
  if (dirty.has("activity")) renderActivity();
  $("sys-position").textContent = state.position;
}

function status(s) { return el("span", { class: `status-${s}` }, s); }

function counts(id, values, extra) {
  const box = $(id);
  box.replaceChildren();
  if (!values) { box.append(el("span", { class: "count" }, "unavailable")); return; }
  if (!Object.keys(values).length) { box.append(el("span", { class: "count" }, "none yet")); return; }
  for (const [k, n] of Object.entries(values).sort()) {
    box.append(el("span", { class: `count status-${k}` }, k, el("b", {}, n), extra ? ` ${extra(k)}` : null));
  }
}

function renderCounts() {
  const c = state.counts;
  counts("exec-counts", c.executions);
  counts("pkg-counts", c.packages, (k) => bytes((c.packageBytes || {})[k]));
  counts("stg-counts", c.staging);
  counts("job-counts", c.jobs);
  counts("res-fulfillment", c.fulfillment);
  counts("res-products", c.products);
}

function sortedRows(map, key) {
  const rows = [...map.values()];
  rows.sort((a, b) => (b.pending - a.pending) || String(key(b)).localeCompare(String(key(a))));
  return rows;
}

function renderRows(id, map, cells) {
  const tbody = $(id);
  const now = performance.now();
  const rows = sortedRows(map, (r) => r.last_position || 0).slice(0, RECENT);
  tbody.replaceChildren(...rows.map((r) => el("tr", {
    "data-id": r.id, "data-command-ids": (r.pending_command_ids || []).join(" ") || null,
    class: [r.pending ? "pending" : "", r.fresh && now - r.fresh < 1500 ? "fresh" : ""].join(" ").trim() || null,
  }, ...cells(r).map((c) => el("td", {}, c)))));
}

function renderExecutions() {
  const rows = sortedRows(state.executions, (r) => r.start_time || "");
  const tbody = $("exec-rows");
  tbody.replaceChildren(...rows.slice(0, RECENT).map((r) => el("tr", {
    "data-id": r.id, "data-command-ids": (r.pending_command_ids || []).join(" ") || null,
    class: r.pending ? "pending" : null,
  }, el("td", {}, r.obs_unit_id), el("td", {}, r.instrument), el("td", {}, status(r.status)),
     el("td", {}, hhmmss(r.start_time)), el("td", {}, hhmmss(r.end_time)))));
  // the timeline: one bar per execution over the last 12 hours
  const line = $("exec-timeline");
  const end = Date.now(), begin = end - 12 * 3600 * 1000;
  const bars = rows.slice(0, 200).map((r, i) => {
    const s = stamp(r.start_time), f = r.end_time ? stamp(r.end_time) : new Date(end);
    if (!s) return null;
    const bar = el("div", { class: `bar ${r.pending ? "pending" : r.status}`, title: `${r.obs_unit_id} ${r.status}` });
    bar.style.left = `${Math.max(0, (s - begin) / (end - begin) * 100)}%`;
    bar.style.width = `${Math.max(0.2, (f - Math.max(s, begin)) / (end - begin) * 100)}%`;
    bar.style.top = `${4 + (i % 12) * 8}px`;
    return bar;
  }).filter(Boolean);
  line.style.height = `${Math.min(12, Math.max(1, bars.length)) * 8 + 8}px`;
  line.replaceChildren(...bars);
}

function renderFiles() {
  $("files-total").textContent = state.filesTotal === null ? "" : `${state.filesTotal} in all`;
  const now = Math.floor(Date.now() / 60000) * 60;
  const xs = [], ys = [];
  for (let t = now - 59 * 60; t <= now; t += 60) {
    xs.push(t);
    ys.push(state.perMinute.get(new Date(t * 1000).toISOString().slice(0, 16)) || 0);
  }
  if (!window.uPlot) return;
  const box = $("files-chart");
  if (!state.chart) {
    state.chart = new uPlot({
      width: Math.max(300, box.clientWidth || 600), height: 180,
      series: [{}, { label: "files / min", stroke: "#5aa9e6", fill: "rgba(90,169,230,0.25)",
                     paths: uPlot.paths.bars({ size: [0.8, 40] }) }],
      axes: [{ stroke: "#8a98a8", grid: { stroke: "#2a3541" } }, { stroke: "#8a98a8", grid: { stroke: "#2a3541" } }],
      scales: { x: { time: true } },
    }, [xs, ys], box);
  } else {
    state.chart.setData([xs, ys]);
  }
}

function renderDownloads() {
  const tbody = $("dl-rows");
  const rows = sortedRows(state.downloads, (r) => r.requested_at || r.last_position || "").slice(0, RECENT);
  tbody.replaceChildren(...rows.map((r) => {
    const live = state.live.get(String(r.id));
    const running = r.status === "running" || r.status === "requested";
    const done = live && running ? live.bytes_done : r.bytes_done;
    const total = (live && live.bytes_total) || r.bytes_total;
    const speed = live && running ? live.bytes_per_s : r.bytes_per_s;
    const eta = live && running ? live.eta_s : r.eta_s;
    const bar = el("progress", { max: total || 1, value: total ? done : 0, "data-job": r.id });
    return el("tr", { "data-id": r.id, class: r.pending ? "pending" : null },
      el("td", {}, r.destination || ""), el("td", {}, status(r.status)),
      el("td", {}, bar, total ? ` ${(100 * done / total).toFixed(1)} %` : ""),
      el("td", {}, `${bytes(done)} / ${bytes(total)}`),
      el("td", {}, speed ? `${bytes(speed)}/s` : "–"), el("td", { class: "eta" }, running ? seconds(eta) : "–"));
  }));
}

function renderActivity() {
  const now = Date.now();
  for (const a of activityRows) if (a.id && !state.shown.has(a.id)) state.shown.set(a.id, now);
  while (state.shown.size > 20000) state.shown.delete(state.shown.keys().next().value);
  $("activity-rows").replaceChildren(...activityRows.map((a) => el("tr", {
    "data-command-id": a.id || null, class: a.pending ? "pending" : null,
  }, el("td", {}, hhmmss(a.at)), el("td", { class: a.status ? `status-${a.status}` : null }, a.what),
     el("td", {}, a.id || ""), el("td", {}, a.position ?? ""))));
}

// -- start -----------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("sign-in").addEventListener("submit", (e) => { signIn(e).catch((err) => { $("sign-in-error").textContent = String(err); }); });
  $("sign-out").addEventListener("click", () => signOut());
  if (state.token) start().catch(() => signOut()); else signOut();
});
