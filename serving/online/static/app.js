// dxassist reading worklist: plain JS, no build step, no third-party code.
// Every data call carries the reader's bearer token; nothing identifying is logged.
"use strict";

const POLL_MS = 5000;          // without the event stream: poll the worklist
const KEEP_FRESH_MS = 60000;   // with it: still re-read now and then (ranks age with time)
const STREAM_RETRY_MS = 30000; // a stream refused or cut short: poll, try it again after this
const STREAM_SILENT_MS = 40000; // nothing from the stream this long (it writes every 15 s): give it up
const TOKEN_KEY = "dxassist-token";
const state = { rows: [], selected: 0, view: null, base: null, zoom: 1, ww: 256, wl: 128, overlay: true, timer: null,
  stream: null, retry: null, events: 0 };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "title" || k === "type") node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c.nodeType ? c : String(c));
  return node;
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}` }, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401 || response.status === 403) { showLogin("The token was refused."); throw new Error("auth"); }
  return response;
}

function showLogin(message) {
  $("app").hidden = true; $("login").hidden = false; $("login-error").textContent = message || "";
  stopLive();
  $("token").focus();
}

// -- worklist ------------------------------------------------------------------------------

function outcomeClass(row) {
  if (row.outcome !== "SCREENED") return "not-screened";
  return row.positive_findings.length ? "findings" : "negative";
}
function deliveryFailed(row) { return row.deliveries.some((d) => d.failed); }
function priorityOf(row) { return row.requested_priority === "stat" ? "STAT" : row.ai_priority || "NONE"; }
function ageMinutes(iso) { return Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 60000)); }

function matches(row) {
  const p = $("f-priority").value, m = $("f-modality").value, s = $("f-status").value;
  const r = $("f-reason").value, d = $("f-date").value;
  if (p && priorityOf(row) !== p) return false;
  if (m && !row.modality.split("/").includes(m)) return false;
  if (s === "delivery-failed" ? !deliveryFailed(row) : s && outcomeClass(row) !== s) return false;
  if (r && row.reason !== r) return false;
  if (d && !row.screened_at.startsWith(d)) return false;
  return true;
}

function fillOptions(select, values) {
  const current = select.value;
  const known = new Set([...select.options].map((o) => o.value));
  for (const v of [...values].sort()) if (v && !known.has(v)) select.append(el("option", { value: v }, v));
  select.value = current;
}

function deliveryCell(row) {
  if (!row.deliveries.length) return el("span", { class: "muted" }, "—");
  return el("span", {}, ...row.deliveries.map((d) => el("div", {
    class: d.failed ? "failed" : d.status === "DONE" ? "ok" : "pending",
    "data-sink": d.sink,
  }, `${d.sink}: ${d.failed ? (d.status === "DEAD" ? "FAILED" : "FAILED, retrying") : d.status === "DONE" ? "delivered" : "pending"}`)));
}

function resultCell(row) {
  if (row.outcome !== "SCREENED") {
    return el("span", { class: "muted" }, `Not screened: ${row.reason || "unknown"}`,
      row.reason_detail ? el("div", { class: "muted" }, row.reason_detail) : null);
  }
  if (!row.positive_findings.length) return el("span", { class: "negative" }, "No finding above threshold");
  return el("span", { class: "positive" }, row.positive_findings.join(", "));
}

function renderList() {
  const body = $("worklist").tBodies[0];
  const shown = state.rows.filter(matches);
  body.replaceChildren(...shown.map((row, i) => {
    const prio = priorityOf(row);
    const tr = el("tr", {
      tabIndex: 0, "data-screening-id": row.screening_id, "data-outcome": outcomeClass(row),
      "data-delivery-failed": String(deliveryFailed(row)), "aria-selected": String(i === state.selected),
    },
      el("td", {}, el("span", { class: `prio ${prio}` }, prio === "NONE" ? "—" : prio), el("div", { class: "muted" }, row.rank_reason)),
      el("td", {}, row.patient_name || row.study_ref, el("div", { class: "muted" }, [row.patient_id, row.accession_number].filter(Boolean).join(" · "))),
      el("td", {}, row.modality || "—"),
      el("td", {}, resultCell(row)),
      el("td", {}, deliveryCell(row)),
      el("td", {}, new Date(row.screened_at).toLocaleTimeString(), el("div", { class: "muted" }, `${ageMinutes(row.screened_at)} min ago`)),
    );
    tr.addEventListener("click", () => { state.selected = i; openStudy(row.screening_id); });
    return tr;
  }));
  $("empty").hidden = shown.length > 0;
  state.selected = Math.min(state.selected, Math.max(0, shown.length - 1));
}

async function refresh(cause = "poll") {
  $("live").dataset.cause = cause;
  try {
    const response = await api("/v1/ui/worklist");
    if (!response.ok) { $("live").textContent = `worklist unavailable (${response.status})`; return; }
    state.rows = await response.json();
    fillOptions($("f-modality"), new Set(state.rows.flatMap((r) => r.modality.split("/"))));
    fillOptions($("f-reason"), new Set(state.rows.map((r) => r.reason).filter(Boolean)));
    renderList();
    $("live").textContent = `updated ${new Date().toLocaleTimeString()} · ${state.rows.length} studies`;
    if (state.view && !$("study").hidden) refreshStudySide();
  } catch (e) { if (e.message !== "auth") $("live").textContent = "connection lost, retrying"; }
}

// -- study view ----------------------------------------------------------------------------

function imageOf(view) {
  const top = view.result.findings.filter((f) => f.positive).sort((a, b) => b.score - a.score)[0];
  const image = (top && view.images.find((i) => i.sop_instance_uid === top.sop_instance_uid)) || view.images[0];
  return { image, frame: top && top.frame_index ? top.frame_index : 0 };
}

async function openStudy(id) {
  const response = await api(`/v1/screenings/${encodeURIComponent(id)}/view`);
  if (!response.ok) { $("live").textContent = `study unavailable (${response.status})`; return; }
  state.view = await response.json();
  state.zoom = 1; state.ww = 256; state.wl = 128; $("ww").value = 256; $("wl").value = 128;
  $("list").hidden = true; $("study").hidden = false;
  const r = state.view.result;
  $("study-title").textContent = `${r.patient_name || r.study_ref} ${r.accession_number ? "· " + r.accession_number : ""}`;
  $("study-outcome").textContent = r.outcome === "SCREENED"
    ? `Screened by ${r.models.join(", ")} · AI priority ${r.priority}`
    : `Not screened: ${r.reason}${r.reason_detail ? " (" + r.reason_detail + ")" : ""}`;
  const ohif = $("ohif");
  ohif.hidden = !state.view.ohif_url; if (state.view.ohif_url) ohif.href = state.view.ohif_url;
  renderFindings(); refreshStudySide();
  await loadImage();
  $("back").focus();
}

function renderFindings() {
  const view = state.view;
  const saved = {};
  for (const f of view.feedback) saved[f.finding_key] = f;  // the newest verdict per finding
  $("findings").tBodies[0].replaceChildren(...view.result.findings.map((f) => {
    const comment = el("input", { type: "text", placeholder: "comment", "aria-label": `Comment on ${f.display}` });
    if (saved[f.key] && saved[f.key].comment) comment.value = saved[f.key].comment;
    const buttons = ["agree", "disagree", "uncertain"].map((verdict) => {
      const b = el("button", { type: "button", "data-verdict": verdict, "aria-pressed": String(saved[f.key]?.verdict === verdict) }, verdict);
      b.addEventListener("click", () => sendFeedback(f.key, verdict, comment.value, b));
      return b;
    });
    return el("tr", { "data-finding": f.key },
      el("td", { class: f.positive ? "positive" : "" }, f.display),
      el("td", {}, f.score.toFixed(3)), el("td", {}, f.threshold.toFixed(3)),
      el("td", { class: f.positive ? "positive" : "negative" }, f.positive ? "POSITIVE" : "negative"),
      el("td", { class: "muted" }, `${f.model_id}@${f.model_version}`),
      el("td", { class: "fb" }, ...buttons, el("div", {}, comment)));
  }));
  if (!view.result.findings.length) $("findings").tBodies[0].append(el("tr", {}, el("td", { colSpan: 6, class: "muted" }, "No findings: the study was not screened.")));
}

function refreshStudySide() {
  const view = state.view;
  const row = state.rows.find((r) => r.screening_id === view.screening_id);
  const deliveries = row ? row.deliveries : view.deliveries;
  $("deliveries").replaceChildren(...(deliveries.length ? deliveries.map((d) => el("li", { class: d.failed ? "failed" : d.status === "DONE" ? "ok" : "pending" },
    `${d.sink}: ${d.failed ? "FAILED" : d.status === "DONE" ? "delivered" : "pending"} (${d.attempts} attempt${d.attempts === 1 ? "" : "s"})`)) : [el("li", { class: "muted" }, "no destination configured")]));
  $("images").replaceChildren(...view.result.images.map((i, n) => el("li", {},
    `Image ${n + 1}: ${i.outcome === "SCREENED" ? `screened (${i.frames_screened} frame${i.frames_screened === 1 ? "" : "s"}) by ${i.model_ref}` : `not screened: ${i.reason}`}`)));
}

async function sendFeedback(key, verdict, comment, button) {
  const response = await api(`/v1/screenings/${encodeURIComponent(state.view.screening_id)}/feedback`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ finding_key: key, verdict, comment: comment || null }),
  });
  if (!response.ok) { $("live").textContent = `feedback not saved (${response.status})`; return; }
  for (const b of button.parentElement.querySelectorAll("button")) b.setAttribute("aria-pressed", String(b === button));
  $("live").textContent = `feedback saved: ${verdict}`;
}

async function loadImage() {
  const { image, frame } = imageOf(state.view);
  state.base = null;
  $("image-note").textContent = "";
  if (image) {
    const url = `/v1/screenings/${encodeURIComponent(state.view.screening_id)}/image.png?sop=${encodeURIComponent(image.sop_instance_uid)}&frame=${frame}`;
    try {
      const response = await api(url);
      if (response.ok) state.base = await createImageBitmap(await response.blob());
      else $("image-note").textContent = "The image is not available from the store; AI regions are drawn on a blank frame.";
    } catch (e) { $("image-note").textContent = "The image could not be loaded."; }
  }
  const w = state.base ? state.base.width : image ? Math.round(image.columns * 800 / Math.max(image.rows, image.columns)) : 800;
  const h = state.base ? state.base.height : image ? Math.round(image.rows * 800 / Math.max(image.rows, image.columns)) : 800;
  const canvas = $("canvas"); canvas.width = w; canvas.height = h;
  draw();
}

function draw() {
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, w, h);
  if (state.base) {
    ctx.drawImage(state.base, 0, 0);
    if (state.ww !== 256 || state.wl !== 128) {  // window/level on the display-ready frame
      const data = ctx.getImageData(0, 0, w, h), px = data.data, lo = state.wl - state.ww / 2;
      const lut = new Uint8ClampedArray(256);
      for (let v = 0; v < 256; v++) lut[v] = ((v - lo) / state.ww) * 255;
      for (let i = 0; i < px.length; i += 4) { px[i] = lut[px[i]]; px[i + 1] = lut[px[i + 1]]; px[i + 2] = lut[px[i + 2]]; }
      ctx.putImageData(data, 0, 0);
    }
  }
  canvas.style.width = `${Math.round(100 * state.zoom)}%`;
  canvas.style.maxWidth = state.zoom > 1 ? "none" : "100%";
  const boxes = [];
  if (state.overlay) {
    const { image, frame } = imageOf(state.view);
    const font = Math.max(14, Math.round(Math.min(w, h) / 40));
    ctx.lineWidth = Math.max(2, Math.round(Math.min(w, h) / 250)); ctx.font = `bold ${font}px system-ui, sans-serif`;
    for (const f of state.view.result.findings) {
      if (!f.positive || !f.region) continue;
      if (image && f.sop_instance_uid && f.sop_instance_uid !== image.sop_instance_uid) continue;
      if ((f.frame_index || 0) !== frame) continue;
      const x = f.region.x * w, y = f.region.y * h, rw = f.region.width * w, rh = f.region.height * h;
      ctx.strokeStyle = f.critical ? "#ff4040" : "#ffc400"; ctx.strokeRect(x, y, rw, rh);
      const label = `AI: ${f.display} ${f.score.toFixed(2)}`;
      ctx.fillStyle = "rgba(0,0,0,.7)"; ctx.fillRect(x, y, ctx.measureText(label).width + 10, font + 8);
      ctx.fillStyle = ctx.strokeStyle; ctx.fillText(label, x + 5, y + font);
      boxes.push([Math.round(x), Math.round(y), Math.round(rw), Math.round(rh)]);
    }
  }
  canvas.dataset.regions = String(boxes.length);
  canvas.dataset.boxes = JSON.stringify(boxes);  // where the outlines are (for checks and tools)
  $("overlay").setAttribute("aria-pressed", String(state.overlay));
  $("overlay").textContent = `AI regions: ${state.overlay ? "on" : "off"}`;
}

function backToList() { $("study").hidden = true; $("list").hidden = false; state.view = null; focusRow(); }
function focusRow() { const rows = $("worklist").tBodies[0].rows; if (rows[state.selected]) rows[state.selected].focus(); }

function onKey(event) {
  if (["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName) && event.key !== "Escape") return;
  const inStudy = !$("study").hidden;
  const rows = $("worklist").tBodies[0].rows;
  const act = {
    j: () => { state.selected = Math.min(rows.length - 1, state.selected + 1); renderList(); focusRow(); },
    k: () => { state.selected = Math.max(0, state.selected - 1); renderList(); focusRow(); },
    Enter: () => { if (rows[state.selected]) openStudy(rows[state.selected].dataset.screeningId); },
  };
  act.ArrowDown = act.j; act.ArrowUp = act.k;
  const study = {
    Escape: backToList, o: () => { state.overlay = !state.overlay; draw(); },
    "+": () => { state.zoom = Math.min(8, state.zoom * 1.25); draw(); }, "-": () => { state.zoom = Math.max(0.25, state.zoom / 1.25); draw(); },
    "]": () => setWindow(state.ww + 16, state.wl), "[": () => setWindow(state.ww - 16, state.wl),
    ".": () => setWindow(state.ww, state.wl + 8), ",": () => setWindow(state.ww, state.wl - 8), r: reset,
  };
  const handler = (inStudy ? study : act)[event.key];
  if (handler) { event.preventDefault(); handler(); }
}

function setWindow(ww, wl) {
  state.ww = Math.max(16, Math.min(512, ww)); state.wl = Math.max(0, Math.min(255, wl));
  $("ww").value = state.ww; $("wl").value = state.wl; draw();
}
function reset() { state.zoom = 1; setWindow(256, 128); }

// -- live updates: Server-Sent Events read with fetch (EventSource cannot send the bearer token),
// polling while the stream is unavailable ---------------------------------------------------

function setMode(mode) {
  $("live").dataset.mode = mode;
  if (state.timer) clearInterval(state.timer);
  state.timer = setInterval(() => refresh(mode === "stream" ? "keep-fresh" : "poll"), mode === "stream" ? KEEP_FRESH_MS : POLL_MS);
}

function stopLive() {
  if (state.timer) clearInterval(state.timer);
  if (state.retry) clearTimeout(state.retry);
  if (state.stream) state.stream.abort();
  state.timer = state.retry = state.stream = null;
}

async function listen() {
  const controller = new AbortController();
  state.stream = controller;
  const opened = Date.now();
  let heard = opened, silent = false;
  // the server writes at least every 15 s: silence means a dead or buffered stream
  const watchdog = setInterval(() => { if (Date.now() - heard > STREAM_SILENT_MS) { silent = true; controller.abort(); } }, 5000);
  try {
    const response = await api("/v1/ui/events", { signal: controller.signal, headers: { Accept: "text/event-stream" } });
    if (!response.ok || !response.body) throw new Error(`stream ${response.status}`);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      heard = Date.now();
      buffer += value.replace(/\r\n?/g, "\n");
      for (let cut = buffer.indexOf("\n\n"); cut >= 0; cut = buffer.indexOf("\n\n")) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!/^event: worklist$/m.test(block)) continue;
        if ($("live").dataset.mode !== "stream") setMode("stream"); // events arrive: polling stops
        state.events += 1; $("live").dataset.events = String(state.events);
        refresh("event");
      }
    }
  } catch (e) {
    if (e.message === "auth" || (controller.signal.aborted && !silent)) return;
  } finally {
    clearInterval(watchdog);
  }
  if (state.stream !== controller) return;
  // the server ends a stream after a few minutes: reconnect at once; one that failed, went
  // silent or ended soon (a draining service, a proxy) means polling for a while
  if (!silent && Date.now() - opened > STREAM_RETRY_MS) { listen(); return; }
  setMode("polling");
  state.retry = setTimeout(listen, STREAM_RETRY_MS);
}

function start() {
  $("login").hidden = true; $("app").hidden = false;
  stopLive();
  setMode("polling");
  refresh("start");
  listen();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (e) => { e.preventDefault(); sessionStorage.setItem(TOKEN_KEY, $("token").value); start(); });
  for (const id of ["f-priority", "f-modality", "f-status", "f-reason", "f-date"]) $(id).addEventListener("change", () => { state.selected = 0; renderList(); });
  $("back").addEventListener("click", backToList);
  $("overlay").addEventListener("click", () => { state.overlay = !state.overlay; draw(); });
  $("zoom-in").addEventListener("click", () => { state.zoom = Math.min(8, state.zoom * 1.25); draw(); });
  $("zoom-out").addEventListener("click", () => { state.zoom = Math.max(0.25, state.zoom / 1.25); draw(); });
  $("ww").addEventListener("input", () => setWindow(Number($("ww").value), state.wl));
  $("wl").addEventListener("input", () => setWindow(state.ww, Number($("wl").value)));
  $("reset").addEventListener("click", reset);
  document.addEventListener("keydown", onKey);
  if (sessionStorage.getItem(TOKEN_KEY)) start(); else showLogin("");
});
