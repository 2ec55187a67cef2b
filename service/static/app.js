// Graft dashboard: plain JS over the public API (no build step). User data is only ever put in
// the page as text nodes (el() below), never as HTML.
"use strict";

const TERMINAL = ["succeeded", "failed", "cancelled"];
const MAX_STREAMS = 3;
const state = {
  datasets: [], jobs: [], models: [], aliases: [],
  history: {},         // job id -> [{epoch, epochs, train_loss, val_loss, val_accuracy}]
  followed: new Set(), // job ids whose events we are reading (stream or polling)
  historyLoaded: new Set(), // ended job ids whose epochs were read from the event log
  streams: 0,          // open event streams
  selectedModel: null,
  uploadFile: null,
};

// -- helpers --------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (sel) => document.querySelector(sel);
const fmt = (x, digits = 3) => (typeof x === "number" ? x.toFixed(digits) : (x ?? "–"));

function authHeaders() {
  const key = localStorage.getItem("graft.apiKey");
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!resp.ok) {
    let detail = resp.statusText;
    try { detail = (await resp.json()).detail || detail; } catch (_) { /* not JSON */ }
    const error = new Error(`${resp.status}: ${detail}`);
    error.status = resp.status;
    throw error;
  }
  return resp.headers.get("content-type")?.includes("json") ? resp.json() : resp;
}

function showError(error) {
  const box = $("#error");
  box.textContent = error.message || String(error);
  box.hidden = false;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => { box.hidden = true; }, 8000);
}

function dropzone(zone, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer?.files?.length) onFiles([...e.dataTransfer.files]);
  });
}

// -- health -----------------------------------------------------------------------------------
async function refreshHealth() {
  const badge = $("#health");
  try {
    const resp = await fetch("/readyz");
    const body = await resp.json();
    badge.textContent = resp.ok ? "ready" : "not ready";
    badge.title = resp.ok ? "" : body.detail;
    badge.className = `badge ${resp.ok ? "ok" : "bad"}`;
  } catch (e) {
    badge.textContent = "unreachable";
    badge.className = "badge bad";
  }
}

// -- datasets ---------------------------------------------------------------------------------
function chooseUpload(file) {
  state.uploadFile = file;
  $("#upload-chosen").textContent = `${file.name} (${(file.size / 1e6).toFixed(1)} MB)`;
  $("#upload-submit").disabled = false;
  if (!$("#upload-name").value) $("#upload-name").value = file.name.replace(/\.zip$/i, "");
}

function uploadDataset(event) {
  event.preventDefault();
  const file = state.uploadFile;
  if (!file) return;
  const form = new FormData();
  form.append("file", file, file.name);
  const name = $("#upload-name").value.trim();
  if (name) form.append("name", name);
  const bar = $("#upload-progress");
  bar.hidden = false;
  bar.value = 0;
  $("#upload-submit").disabled = true;
  // XMLHttpRequest, not fetch: it reports upload progress.
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/v1/datasets");
  for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = e.loaded / e.total; };
  xhr.onload = async () => {
    bar.hidden = true;
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
    if (xhr.status !== 201) {
      $("#upload-submit").disabled = false;
      return showError(new Error(`${xhr.status}: ${body.detail || xhr.statusText}`));
    }
    state.uploadFile = null;
    $("#upload-chosen").textContent = `uploaded ${body.name}`;
    $("#upload-name").value = "";
    await refreshDatasets();
    $("#train-dataset").value = body.id;
  };
  xhr.onerror = () => { bar.hidden = true; $("#upload-submit").disabled = false; showError(new Error("upload failed")); };
  xhr.send(form);
}

function datasetCard(d) {
  const splits = Object.keys(d.split_counts).sort();
  const table = el("table", {},
    el("tr", {}, el("th", {}, "class"), splits.map((s) => el("th", {}, s)), el("th", {}, "total")),
    d.classes.map((label) => el("tr", {}, el("td", {}, label),
      splits.map((s) => el("td", {}, d.split_counts[s][label] ?? 0)), el("td", {}, d.class_counts[label]))));
  const rejected = d.rejected.length
    ? el("details", { class: "rejected" }, el("summary", {}, `${d.rejected.length} file(s) skipped`),
        el("ul", {}, d.rejected.slice(0, 200).map((r) => el("li", {}, `${r.path}: ${r.reason}`))))
    : el("div", { class: "stats" }, "every file was usable");
  const report = d.report || {};
  const notes = [...(report.problems || []).map((p) => el("div", { class: "problem" }, `cannot train: ${p}`)),
                 ...(report.warnings || []).map((w) => el("div", { class: "rejected" }, `warning: ${w}`))];
  if (d.task === "multi_label") {  // issue 17: the counts are per label; say how many images have none
    const none = (report.images_without_labels || {}).total || 0;
    notes.unshift(el("div", { class: "stats", "data-testid": "multi-label" },
      `multi-label: images have several labels (counts per label); ${none} image(s) have none of them`));
  }
  return el("div", { class: "card dataset", "data-id": d.id, "data-testid": "dataset" },
    el("b", {}, d.name), " ", el("span", { class: "id" }, d.id),
    el("div", { class: "stats" }, `${d.num_images} images · ${d.classes.length} classes · `
      + (d.has_val_split ? "train/val split given" : "val held out per job")),
    table, notes, rejected);
}

async function refreshDatasets() {
  state.datasets = await api("/v1/datasets");
  $("#datasets").replaceChildren(...state.datasets.map(datasetCard));
  const select = $("#train-dataset");
  const chosen = select.value;
  select.replaceChildren(...state.datasets.map((d) => el("option", { value: d.id }, `${d.name} (${d.num_images})`)));
  if (chosen && state.datasets.some((d) => d.id === chosen)) select.value = chosen;
}

// The form follows the server's schema: its strategies, limits and defaults (recipe.js).
async function loadTrainForm() {
  const [backbones, openapi] = await Promise.all([api("/v1/backbones"), api("/openapi.json")]);
  const schema = jobRequestSchema(openapi);
  const backbone = recipeField(schema, "backbone");
  // No default backbone: the server's choice (strategy auto chooses one), the first option.
  const serverChoice = backbone.default === null ? [el("option", { value: "" }, "default (auto chooses)")] : [];
  $("#train-backbone").replaceChildren(...serverChoice, ...backbones.map((b) =>
    el("option", { value: b.name, disabled: !b.weights_available }, b.name + (b.weights_available ? "" : " (no weights)"))));
  $("#train-backbone").value = backbone.default ?? "";
  $("#train-backbone").title = backbone.description;
  const strategy = recipeField(schema, "strategy");
  $("#train-strategy").replaceChildren(...strategy.choices.map((s) => el("option", { value: s }, s)));
  $("#train-strategy").value = strategy.default;
  $("#train-strategy").title = strategy.description;
  for (const input of document.querySelectorAll("#train-form input[data-field]")) {
    const field = recipeField(schema, input.dataset.field);
    Object.assign(input, { placeholder: field.hint, title: field.description });
    if (field.minimum !== undefined) input.min = field.minimum;
    if (field.maximum !== undefined) input.max = field.maximum;
  }
}

// -- jobs -------------------------------------------------------------------------------------
async function startJob(event) {
  event.preventDefault();
  const body = { dataset_id: $("#train-dataset").value, strategy: $("#train-strategy").value };
  if ($("#train-backbone").value) body.backbone = $("#train-backbone").value;
  for (const [field, id] of [["epochs", "#train-epochs"], ["image_size", "#train-image-size"],
                             ["batch_size", "#train-batch-size"]]) {
    if ($(id).value) body[field] = Number($(id).value);
  }
  try {
    const job = await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                                        body: JSON.stringify(body) });
    state.jobs.unshift(job);
    renderJobs();
    followJob(job.id);
  } catch (e) { showError(e); }
}

function recordEpoch(jobId, data) {
  if (data.epoch === undefined || data.val_accuracy === undefined) return;
  const history = (state.history[jobId] ||= []);
  if (!history.some((h) => h.epoch === data.epoch)) history.push({ ...data });
}

// A job that ended before we followed it (a fast job, or a page opened later) has no live
// history: read its epochs once from the event log.
async function loadHistory(jobId) {
  if ((state.history[jobId] || []).length > 1 || state.historyLoaded.has(jobId)) return;
  state.historyLoaded.add(jobId);
  const events = await api(`/v1/jobs/${jobId}/events`);
  for (const e of events) if (e.kind === "epoch") recordEpoch(jobId, e.data);
}

function updateJob(jobId, patch) {
  const job = state.jobs.find((j) => j.id === jobId);
  if (!job) return;
  const wasFollowed = state.followed.has(jobId);
  Object.assign(job, patch);
  renderJobs();
  if (TERMINAL.includes(job.status) && wasFollowed) {
    state.followed.delete(jobId);
    jobFinished(jobId).catch(showError);
  }
}

// A job we watched has ended: show its final state and, when it produced one, its model.
async function jobFinished(jobId) {
  const job = await api(`/v1/jobs/${jobId}`);
  Object.assign(state.jobs.find((j) => j.id === jobId) || {}, job);
  await loadHistory(jobId);
  renderJobs();
  await refreshModels();
  if (job.model_id) await selectModel(job.model_id);
}

// A job's progress, as GET /v1/jobs/{id} has it and its events update it (the shape is
// workers/progress.py's): the current phase's fields (phase, unit, done, total, rate, eta_s, and
// for auto the candidate being tried), `phases` (every phase so far, in order) and `leaderboard`
// (auto's finished candidates, best first). `seq` orders two copies: the larger is newer.
const phaseKey = (p) => `${p.phase}\u0000${p.backbone ?? ""}`;
const byScore = (a, b) => (b.val_accuracy ?? 0) - (a.val_accuracy ?? 0) || (a.val_loss ?? 0) - (b.val_loss ?? 0);

function withPhase(progress, data) {
  const old = progress || {};
  const phases = [...(old.phases || [])];
  const summary = { phase: data.phase, backbone: data.backbone ?? null, unit: data.unit ?? null,
                    done: data.done ?? null, total: data.total ?? null, seconds: data.elapsed_s ?? null };
  const i = phases.findIndex((x) => phaseKey(x) === phaseKey(data));
  if (i >= 0) phases[i] = summary; else phases.push(summary);
  const kept = phaseKey(old) === phaseKey(data) ? old : {};  // another phase: its own fields only
  return { ...kept, ...data, phases, leaderboard: old.leaderboard, seq: Math.max(old.seq ?? 0, data.seq ?? 0) };
}

function withCandidate(progress, data) {
  const entry = { ...data };
  for (const k of ["rank", "of", "created_at"]) delete entry[k];
  return { ...progress, leaderboard: [...(progress?.leaderboard || []), entry].sort(byScore) };
}

function applyEvent(jobId, event) {
  const data = event.data || {};
  const job = state.jobs.find((j) => j.id === jobId);
  if (event.kind === "status") updateJob(jobId, { status: data.status, model_id: data.model_id ?? job?.model_id });
  else if (!job) return;
  else if (event.kind === "progress") updateJob(jobId, { progress: withPhase(job.progress, data) });
  else if (event.kind === "candidate") updateJob(jobId, { progress: withCandidate(job.progress, data) });
  else if (event.kind === "epoch") {
    recordEpoch(jobId, data);
    updateJob(jobId, { progress: { ...job.progress, ...data } });
  }
}

// Live progress: the job's server-sent event stream, read with fetch so it can carry the API
// key; a server without it (404) is polled instead.
async function followJob(jobId) {
  if (state.followed.has(jobId)) return;
  state.followed.add(jobId);
  // A browser opens ~6 connections per server: keep most of them for the rest of the page.
  if (state.streams >= MAX_STREAMS) return pollJob(jobId);
  state.streams += 1;
  try {
    const resp = await fetch(`/v1/jobs/${jobId}/events`, { headers: { Accept: "text/event-stream", ...authHeaders() } });
    if (resp.ok && resp.headers.get("content-type")?.startsWith("text/event-stream")) {
      await readEvents(jobId, resp.body);
      if (!TERMINAL.includes(state.jobs.find((j) => j.id === jobId)?.status)) {
        state.followed.delete(jobId); // the stream ended early: the next refresh follows again
      }
      return;
    }
  } catch (_) { /* fall through to polling */ } finally { state.streams -= 1; }
  pollJob(jobId);
}

async function readEvents(jobId, body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const fields = { data: [] };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const name = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (name === "data") fields.data.push(val); else fields[name] = val;
      }
      if (!fields.data.length) continue;
      let payload = {};
      try { payload = JSON.parse(fields.data.join("\n")); } catch (_) { continue; }
      const event = payload.kind && payload.data !== undefined ? payload : { kind: fields.event || "message", data: payload };
      applyEvent(jobId, event);
      if (event.kind === "status" && TERMINAL.includes(event.data.status)) { reader.cancel(); return; }
    }
  }
}

async function pollJob(jobId) {
  while (state.followed.has(jobId)) {
    try {
      const job = await api(`/v1/jobs/${jobId}`);
      recordEpoch(jobId, job.progress);
      updateJob(jobId, job);
      if (TERMINAL.includes(job.status)) return;
    } catch (e) { if (e.status === 404) return; }
    await new Promise((r) => setTimeout(r, 700));
  }
}

const count = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : "?");
const duration = (s) => (s >= 60 ? `${Math.floor(s / 60)}:${String(Math.round(s % 60)).padStart(2, "0")}` : `${Math.round(s)} s`);

// A recipe in words; with `keys`, only those (a leaderboard names what differs between its rows).
function recipeText(r, keys = null) {
  const names = { logistic_c: "C", learning_rate: "lr", unfreeze_stages: "stages" };
  const shown = Object.entries(r).filter(([k]) => k !== "strategy" && (keys ? keys.has(k) : k !== "backbone"));
  return [r.strategy, ...shown.map(([k, v]) => (k === "backbone" ? v : `${names[k] || k}=${v}`))].join(" ");
}

function varyingKeys(recipes) {
  const keys = new Set(recipes.flatMap((r) => Object.keys(r)));
  return new Set([...keys].filter((k) => new Set(recipes.map((r) => JSON.stringify(r[k]))).size > 1));
}

// The phase a job is in, in words: "extracting features · 120/472 images · 41 images/s · ETA 9 s".
function phaseText(p, running) {
  if (!p.phase) return "";
  const parts = [p.phase];
  if (p.auto_choice) parts.push(recipeText(p.auto_choice));
  if (p.done !== undefined && p.done !== null) parts.push(`${count(p.done)}${p.total ? `/${count(p.total)}` : ""} ${p.unit || ""}`.trim());
  if (running && p.rate) parts.push(`${p.rate} ${p.unit || ""}/s`);
  if (running && p.eta_s !== undefined && p.eta_s !== null && p.done !== p.total) parts.push(`ETA ${duration(p.eta_s)}`);
  return parts.join(" · ");
}

function phaseList(p, backbones) {
  const phases = p.phases || [];
  if (phases.length < 2) return null;
  return el("ol", { class: "phases", "data-testid": "job-phases" }, phases.map((x) =>
    el("li", { class: phaseKey(x) === phaseKey(p) ? "current" : "" },
      `${x.phase}${backbones > 1 && x.backbone ? ` · ${x.backbone}` : ""}`,
      x.done !== null && x.done !== undefined ? ` ${count(x.done)}${x.total ? `/${count(x.total)}` : ""} ${x.unit || ""}` : "",
      x.seconds !== null && x.seconds !== undefined ? ` · ${x.seconds.toFixed(1)} s` : "")));
}

function leaderboard(p) {
  const rows = p.leaderboard || [];
  if (!rows.length) return null;
  const keys = rows.length > 1 ? varyingKeys(rows.map((e) => e.recipe || {})) : null;
  return el("table", { class: "leaderboard", "data-testid": "job-leaderboard" },
    el("tr", {}, ["#", "candidate", "accuracy", "loss", "on", "s"].map((h) => el("th", {}, h))),
    rows.slice(0, 8).map((e, i) => el("tr", { title: recipeText(e.recipe || {}) }, el("td", {}, i + 1),
      el("td", { class: "recipe" }, recipeText(e.recipe || {}, keys)),
      el("td", {}, fmt(e.val_accuracy)), el("td", {}, fmt(e.val_loss)), el("td", {}, e.scored_on || ""),
      el("td", {}, fmt(e.seconds, 1)))),
    rows.length > 8 ? el("tr", {}, el("td", {}, "…"), el("td", { class: "recipe" }, `${rows.length - 8} more`)) : null);
}

function jobCard(j) {
  const p = j.progress || {};
  const running = j.status === "running";
  // The bar is the current phase's; a job from before phases had totals counts its epochs.
  const total = p.total || (p.done === undefined ? p.epochs || j.config.epochs : null) || 1;
  const done = j.status === "succeeded" ? total : Math.min(total, p.done ?? p.epoch ?? 0);
  const stats = [p.epoch ? `epoch ${p.epoch}/${p.epochs}` : null,
                 p.train_loss !== undefined ? `loss ${fmt(p.train_loss, 4)}` : null,
                 p.val_accuracy !== undefined ? `val acc ${fmt(p.val_accuracy)}` : null].filter(Boolean).join(" · ");
  const backbones = new Set((p.phases || []).map((x) => x.backbone).filter(Boolean)).size;
  const history = state.history[j.id] || [];
  const card = el("div", { class: "card job", "data-id": j.id, "data-status": j.status, "data-testid": "job",
                           onclick: () => j.model_id && selectModel(j.model_id) },
    el("span", { class: `badge status-${j.status}`, "data-testid": "job-status" }, j.status), " ",
    el("b", {}, `${j.config.strategy} · ${j.config.backbone ?? "auto"}`), " ", el("span", { class: "id" }, j.id),
    el("div", { class: "phase", "data-testid": "job-phase" },
       phaseText(p, running) + (backbones > 1 && p.backbone ? ` (${p.backbone})` : "") || "\u00a0"),
    el("progress", { max: total, value: done, "data-testid": "job-progress", "data-phase": p.phase || "" }),
    el("div", { class: "stats" }, stats || "\u00a0"),
    running && p.candidate && typeof p.candidate === "object"
      ? el("div", { class: "stats", "data-testid": "job-candidate" }, `trying ${recipeText(p.candidate)}`) : null,
    phaseList(p, backbones),
    leaderboard(p),
    j.error ? el("div", { class: "rejected" }, `${j.error.code}: ${j.error.message}`) : null);
  if (history.length > 1) {
    const canvas = el("canvas", { width: 320, height: 110, class: "job-curves" });
    drawCurves(canvas, history);
    card.append(canvas);
  }
  return card;
}

function renderJobs() {
  $("#jobs").replaceChildren(...state.jobs.slice(0, 12).map(jobCard));
}

async function refreshJobs() {
  const jobs = await api("/v1/jobs?limit=50");
  // Keep live values from event streams for jobs we follow; the list may lag a second behind.
  state.jobs = jobs.map((j) => {
    const old = state.jobs.find((o) => o.id === j.id);
    const live = old && state.followed.has(j.id) && (old.progress?.seq || 0) > (j.progress?.seq || 0);
    return live ? { ...j, progress: old.progress } : j;
  });
  for (const j of state.jobs) {
    if (j.status === "running") followJob(j.id); // queued ones are refreshed with this list
  }
  await Promise.all(state.jobs.slice(0, 12).filter((j) => TERMINAL.includes(j.status))
    .map((j) => loadHistory(j.id).catch(() => {})));
  renderJobs();
}

// -- curves -----------------------------------------------------------------------------------
function drawCurves(canvas, history) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = 28;
  ctx.clearRect(0, 0, W, H);
  ctx.font = W < 400 ? "9px system-ui" : "11px system-ui"; ctx.lineWidth = 2;
  const n = Math.max(...history.map((h) => h.epoch), 1);
  const maxLoss = Math.max(...history.flatMap((h) => [h.train_loss, h.val_loss].filter((v) => v !== undefined)), 1e-6);
  const x = (epoch) => pad + (W - 2 * pad) * (n === 1 ? 0.5 : (epoch - 1) / (n - 1));
  const y = (v, max) => H - pad + 4 - (H - 2 * pad) * (v / max);
  ctx.strokeStyle = "#d9dee8"; ctx.beginPath(); ctx.moveTo(pad, pad - 4); ctx.lineTo(pad, H - pad + 4);
  ctx.lineTo(W - pad, H - pad + 4); ctx.stroke();
  // Losses share one scale (0..largest loss), accuracy its own (0..1).
  const series = [["train_loss", "#c4321f", maxLoss], ["val_loss", "#e59a3c", maxLoss], ["val_accuracy", "#2f6fed", 1]];
  let legendX = pad;
  for (const [key, color, max] of series) {
    const pts = history.filter((h) => h[key] !== undefined);
    if (!pts.length) continue;
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.beginPath();
    pts.forEach((h, k) => (k ? ctx.lineTo(x(h.epoch), y(h[key], max)) : ctx.moveTo(x(h.epoch), y(h[key], max))));
    ctx.stroke();
    const label = `${key} ${fmt(pts[pts.length - 1][key])}`;
    ctx.fillText(label, legendX, 12);
    legendX += ctx.measureText(label).width + 10;
  }
  ctx.fillStyle = "#667085"; ctx.fillText(`epoch ${n}`, W - pad - 40, H - 6);
}

// -- models -----------------------------------------------------------------------------------
// The aliases pointing at a model, as "prod, staging".
const aliasesOf = (modelId) => state.aliases.filter((a) => a.model_id === modelId).map((a) => a.name).join(", ");

async function refreshModels() {
  [state.models, state.aliases] = await Promise.all([api("/v1/models"), api("/v1/aliases")]);
  $("#models").replaceChildren(...state.models.map((m) =>
    el("div", { class: `card model${m.id === state.selectedModel ? " selected" : ""}`, "data-id": m.id,
                "data-testid": "model", onclick: () => selectModel(m.id) },
      el("b", {}, `${m.backbone} · ${m.recipe.strategy}`), " ", el("span", { class: "id" }, m.id),
      el("div", { class: "stats" }, `val accuracy ${fmt(m.metrics.val_accuracy)} · classes ${m.classes.join(", ")}`),
      aliasesOf(m.id) && el("div", { class: "stats", "data-testid": "model-aliases" }, `aliases: ${aliasesOf(m.id)}`))));
  if (state.selectedModel) showModelAliases(state.selectedModel);
  if (!state.selectedModel && state.models.length) selectModel(state.models[0].id);
}

async function selectModel(modelId) {
  state.selectedModel = modelId;
  document.querySelectorAll(".model").forEach((c) => c.classList.toggle("selected", c.dataset.id === modelId));
  const m = await api(`/v1/models/${modelId}`);
  const metrics = m.metrics;
  $("#model-detail").hidden = false;
  $("#model-detail").dataset.modelId = m.id;
  $("#model-title").textContent = `Model ${m.id}`;
  const rows = [["backbone", m.backbone], ["strategy", m.recipe.strategy], ["image size", m.recipe.image_size],
                ["val accuracy", fmt(metrics.val_accuracy)], ["balanced accuracy", fmt(metrics.balanced_accuracy)],
                ["macro F1", fmt(metrics.macro_f1)], ["val loss", fmt(metrics.val_loss, 4)],
                ["best epoch", metrics.best_epoch], ["train images/s", metrics.train_images_per_s],
                ["device", metrics.device]];
  if (metrics.task === "multi_label") {  // issue 17: mAP and the per-label scores instead of accuracy
    rows.splice(3, 4, ["mAP (macro)", fmt(metrics.map_macro)], ["mAP (micro)", fmt(metrics.map_micro)],
                ["subset accuracy", fmt(metrics.subset_accuracy)], ["Hamming loss", fmt(metrics.hamming_loss, 4)],
                ["micro F1", fmt(metrics.micro_f1)], ["thresholds", metrics.threshold_tuning?.method]);
  }
  if (metrics.ood) rows.push(["unknown below", `${metrics.ood.kind} ${fmt(metrics.ood.threshold)} (${fmt(metrics.ood.held_out_pass_rate)} of held-out pass)`]);
  $("#model-metrics").replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v ?? "–"))));
  const cm = metrics.confusion_matrix || { labels: [], matrix: [] };  // none for a multi-label model
  const peak = Math.max(1, ...cm.matrix.flat());
  $("#confusion").replaceChildren(
    el("tr", {}, el("th", {}, ""), cm.labels.map((l) => el("th", {}, l))),
    ...cm.matrix.map((row, i) => el("tr", {}, el("th", {}, cm.labels[i]), row.map((v, j) => {
      const shade = Math.round(255 - 150 * (v / peak));
      const color = i === j ? `rgb(${shade},255,${shade})` : `rgb(255,${shade},${shade})`;
      return el("td", { class: "cell", style: `background:${v ? color : "#fff"}`, title: "show these images",
                        onclick: () => showGallery(m, cm.labels[i], cm.labels[j]).catch(showError) }, v);
    }))));
  if (metrics.per_label) {  // multi-label: each label's AP, threshold and P/R/F1 there
    $("#per-class").replaceChildren(el("tr", {}, ["label", "AP", "threshold", "precision", "recall", "F1", "support"].map((h) => el("th", {}, h))),
      ...Object.entries(metrics.per_label).map(([label, c]) => el("tr", { "data-testid": "per-label" }, el("td", {}, label),
        el("td", {}, fmt(c.ap)), el("td", {}, fmt(c.threshold)), el("td", {}, fmt(c.precision)), el("td", {}, fmt(c.recall)),
        el("td", {}, fmt(c.f1)), el("td", {}, c.support))));
  } else $("#per-class").replaceChildren(el("tr", {}, ["class", "precision", "recall", "F1", "support"].map((h) => el("th", {}, h))),
    ...Object.entries(metrics.per_class).map(([label, c]) => el("tr", {}, el("td", {}, label), el("td", {}, fmt(c.precision)),
      el("td", {}, fmt(c.recall)), el("td", {}, fmt(c.f1)), el("td", {}, c.support))));
  drawCurves($("#model-curves"), metrics.history || []);
  $("#gallery-box").hidden = true;
  showPlots(m).catch(showError);
  $("#exports").replaceChildren("Export: ", ...["onnx", "safetensors", "torchscript"].map((f) =>
    el("a", { href: `/v1/models/${m.id}/export?format=${f}`, download: "", style: "margin-right:12px" }, f)),
    el("span", { class: "stats" }, " (a zip: the model file, manifest.json with the preprocessing, USAGE.md)"));
  $("#predict-results").replaceChildren();
  showModelAliases(m.id);
}

function showModelAliases(modelId) {
  const names = aliasesOf(modelId);
  $("#model-aliases").textContent = names ? `now: ${names}` : "";
}

// "Promote to …": point an alias at the selected model (the server loads it before the switch).
async function promoteModel(event) {
  event.preventDefault();
  const name = $("#promote-alias").value.trim();
  if (!state.selectedModel || !name) return;
  try {
    await api(`/v1/aliases/${encodeURIComponent(name)}`, {
      method: "PUT", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model_id: state.selectedModel }) });
    await refreshModels();
  } catch (e) { showError(e); }
}

// Images behind the API key (thumbnails, plots): fetched with it, shown from a blob URL.
async function authedImage(path, attrs = {}) {
  const img = el("img", attrs);
  const resp = await api(path);
  img.src = URL.createObjectURL(await resp.blob());
  return img;
}

// A confusion-matrix cell: the held-out images of that true and predicted label, worst first.
async function showGallery(m, trueLabel, predicted) {
  if (!m.evaluation) {
    $("#gallery-title").textContent = "this model keeps no per-image predictions (trained before they were kept)";
    $("#gallery").replaceChildren();
    $("#gallery-box").hidden = false;
    return;
  }
  const q = new URLSearchParams({ true: trueLabel, predicted, limit: "48" });
  const answer = await api(`${m.evaluation}?${q}`);
  $("#gallery-title").textContent = `true ${trueLabel}, predicted ${predicted}: ${answer.total} image(s)`
    + (answer.total ? ", highest loss first" : "");
  const cards = await Promise.all(answer.rows.map(async (r) => el("div", { class: "card thumb", "data-testid": "gallery-image" },
    await authedImage(r.thumbnail, { alt: r.image_id.slice(0, 12), title: r.image_id }),
    el("div", { class: "stats" }, `${r.predicted_label} ${fmt(r.probability)} · loss ${fmt(r.loss)}`))));
  $("#gallery").replaceChildren(...cards);
  $("#gallery-box").hidden = false;
}

async function showPlots(m) {
  const plots = Object.entries(m.plots || {});
  const imgs = await Promise.all(plots.map(([name, url]) =>
    authedImage(url, { alt: name, title: name, class: "plot", "data-testid": "plot" })));
  if (state.selectedModel === m.id) $("#plots").replaceChildren(...imgs);
}

// The answer's headline: the top class, or "unknown" when the image is none of the model's classes (issue 17).
function topLine(r) {
  if (r.labels) {  // a multi-label model (issue 17): every label over its threshold
    return el("div", { "data-testid": "labels" }, el("b", { class: "top-label" }, r.labels.length ? r.labels.join(", ") : "no label"),
      r.labels.length ? ` ${r.labels.map((l) => fmt(r.scores[l])).join(", ")}` : " (none over its threshold)");
  }
  if (r.unknown) return el("div", {}, el("b", { class: "top-label unknown", "data-testid": "unknown" }, "unknown"), " none of these");
  return el("div", {}, el("b", { class: "top-label" }, r.predictions[0].label), ` ${fmt(r.predictions[0].score)}`);
}

async function predictFiles(files) {
  const modelId = state.selectedModel;
  if (!modelId || !files.length) return;
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  try {
    const answer = await api(`/v1/models/${modelId}/predict?top_k=3`, { method: "POST", body: form });
    $("#predict-results").replaceChildren(...answer.results.map((r, i) => el("div", { class: "card prediction", "data-testid": "prediction" },
      el("img", { src: URL.createObjectURL(files[i]), alt: r.filename }),
      topLine(r),
      el("div", { class: "stats" }, r.filename),
      r.ood ? el("div", { class: "stats", "data-testid": "ood-score" },
        `${r.ood.kind} score ${fmt(r.ood.score)} (unknown below ${fmt(r.ood.threshold)})`) : null,
      r.predictions.map((p) => el("div", {}, el("div", { class: "stats" }, `${p.label} ${fmt(p.score)}`),
        el("div", { class: "bar", style: `width:${Math.max(2, Math.round(p.score * 120))}px` }))))));
    await explainFiles(modelId, form, files);
  } catch (e) { showError(e); }
}

// Where the model looked: a Grad-CAM overlay for each image, beside its prediction.
async function explainFiles(modelId, form, files) {
  const answer = await api(`/v1/models/${modelId}/explain`, { method: "POST", body: form });
  if (state.selectedModel !== modelId) return;
  document.querySelectorAll("#predict-results .prediction").forEach((card, i) => {
    const r = answer.results[i];
    if (!r) return;
    card.append(el("div", { class: "stats", style: "clear:both" }, `where it looks for ${r.label}:`),
      el("img", { class: "overlay", "data-testid": "overlay", alt: `Grad-CAM of ${files[i].name}`,
                  src: `data:${r.overlay.media_type};base64,${r.overlay.data}` }));
  });
}

// -- labeling (issue 16): the unlabeled images the selected model is least sure of -----------------
const labeling = { modelId: null, datasetId: null, chosen: new Map() };  // image id -> label

async function loadSuggestions() {
  const modelId = state.selectedModel;
  if (!modelId) return;
  const m = await api(`/v1/models/${modelId}`);
  const q = new URLSearchParams({ k: "24", strategy: $("#label-strategy").value });
  const answer = await api(`/v1/models/${modelId}/suggestions?${q}`);
  Object.assign(labeling, { modelId, datasetId: answer.dataset_id, chosen: new Map() });
  $("#label-status").textContent = `${answer.unlabeled_images} unlabeled image(s) in dataset ${answer.dataset_id.slice(0, 8)} `
    + `(version ${answer.dataset_version}); ${answer.suggestions.length} suggested`;
  const cards = await Promise.all(answer.suggestions.map(async (s) => {
    const pick = el("select", { "data-testid": "label-choice", title: "choose another class" },
      el("option", { value: "" }, "other class…"), m.classes.map((c) => el("option", { value: c }, c)));
    const card = el("div", { class: "card thumb", "data-testid": "suggestion", "data-id": s.image_id });
    const choose = (label) => {
      labeling.chosen.set(s.image_id, label);
      card.classList.add("selected");
      card.querySelector(".stats").textContent = `→ ${label}`;
      $("#label-save").disabled = false;
    };
    pick.addEventListener("change", () => pick.value && choose(pick.value));
    card.append(await authedImage(s.thumbnail, { alt: s.original_name, title: s.original_name }),
      el("button", { type: "button", "data-testid": "accept", title: "accept the model's guess",
                     onclick: () => choose(s.predicted_label) }, `✓ ${s.predicted_label} ${fmt(s.score, 2)}`),
      pick, el("div", { class: "stats" }, `margin ${fmt(s.margin, 2)}`));
    return card;
  }));
  $("#label-grid").replaceChildren(...cards);
  $("#label-save").disabled = true;
  $("#label-train").disabled = true;
}

async function saveLabels() {
  if (!labeling.chosen.size) return;
  const images = [...labeling.chosen].map(([id, label]) => ({ id, label }));
  const d = await api(`/v1/datasets/${labeling.datasetId}/images`, {
    method: "PATCH", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ images }) });
  labeling.datasetId = d.id;
  labeling.chosen = new Map();
  $("#label-status").textContent = `saved ${images.length} label(s): dataset ${d.id.slice(0, 8)} version ${d.version}, `
    + `${d.report.unlabeled_count ?? 0} still unlabeled`;
  $("#label-save").disabled = true;
  $("#label-train").disabled = false;
  await refreshDatasets();
}

async function trainAgain() {
  const job = await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                                      body: JSON.stringify({ dataset_id: labeling.datasetId }) });
  $("#label-status").textContent = `queued job ${job.id.slice(0, 8)} on the labeled dataset`;
  $("#label-train").disabled = true;
  await refreshJobs();
}

// -- start ------------------------------------------------------------------------------------
async function refreshAll() {
  try {
    await Promise.all([refreshHealth(), refreshDatasets(), refreshJobs(), refreshModels()]);
  } catch (e) { showError(e); }
}

document.addEventListener("DOMContentLoaded", () => {
  const key = $("#api-key");
  key.value = localStorage.getItem("graft.apiKey") || "";
  key.addEventListener("change", () => { localStorage.setItem("graft.apiKey", key.value.trim()); refreshAll(); });
  $("#upload-file").addEventListener("change", (e) => e.target.files[0] && chooseUpload(e.target.files[0]));
  dropzone($("#upload-form"), (files) => chooseUpload(files[0]));
  $("#upload-form").addEventListener("submit", uploadDataset);
  $("#train-form").addEventListener("submit", startJob);
  $("#promote-form").addEventListener("submit", promoteModel);
  $("#label-load").addEventListener("click", () => loadSuggestions().catch(showError));
  $("#label-save").addEventListener("click", () => saveLabels().catch(showError));
  $("#label-train").addEventListener("click", () => trainAgain().catch(showError));
  $("#predict-file").addEventListener("change", (e) => predictFiles([...e.target.files]));
  dropzone($("#predict-drop"), predictFiles);
  loadTrainForm().catch(showError);
  refreshAll();
  setInterval(refreshAll, 3000);
});
