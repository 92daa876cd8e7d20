// mlxfun dashboard: plain JavaScript, no dependencies, talks to the /v1/mlxfun API of the
// server that served it (or of `mlxfun ui --server URL`, which relays to a remote one).
"use strict";

const $ = (s) => document.querySelector(s);
const $$ = (s) => Array.from(document.querySelectorAll(s));
const SVG = "http://www.w3.org/2000/svg";
const CELL = 14;

const state = {
  key: localStorage.getItem("mlxfunKey") || "",
  info: null,
  data: null, // the statistics shown: {layers, experts_per_layer, scores, ...}
  path: null, // its stats file in the workdir (null: live counters)
  selection: null,
  steer: [], // [{layer, expert, mode}]
  jobsTimer: null,
};

function say(text, ok) {
  const m = $("#message");
  m.textContent = text || "";
  m.className = ok ? "ok" : "";
}

async function api(method, path, body, raw) {
  const headers = {};
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  let data;
  if (raw !== undefined) {
    data = raw;
    headers["Content-Type"] = "application/octet-stream";
  } else if (body !== undefined) {
    data = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, { method, headers, body: data });
  const text = await response.text();
  let json;
  try { json = JSON.parse(text); } catch (e) { json = { error: text || response.statusText }; }
  if (!response.ok) throw new Error((json && json.error) || response.status + " " + response.statusText);
  return json;
}

// ---------------------------------------------------------------------------------------------
// heatmap

function colour(t) {
  // a viridis-like ramp, t in [0, 1]
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2);
  const f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function drawHeatmap(svg, data, scorer, opts) {
  opts = opts || {};
  const rows = data.scores[scorer] || [];
  const width = Math.max(0, ...data.experts_per_layer);
  const cell = opts.cell || Math.max(CELL / 2, Math.min(2 * CELL, Math.floor(1100 / Math.max(width, 1))));
  const log = opts.log !== undefined ? opts.log : $("#log-scale").checked;
  const f = (v) => (v === null ? null : log ? Math.sign(v) * Math.log10(1 + Math.abs(v)) : v);
  const values = rows.flatMap((r, i) => r.slice(0, data.experts_per_layer[i]).map(f)).filter((v) => v !== null);
  const lo = Math.min(...values, 0);
  const hi = Math.max(...values, lo + 1e-12);
  const left = 34, top = 14;
  svg.innerHTML = "";
  svg.setAttribute("width", left + width * cell + 4);
  svg.setAttribute("height", top + rows.length * cell + 4);
  for (let e = 0; e < width; e += Math.max(1, Math.ceil(width / 16))) {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", left + e * cell);
    t.setAttribute("y", 10);
    t.textContent = e;
    svg.appendChild(t);
  }
  rows.forEach((row, i) => {
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", 2);
    label.setAttribute("y", top + i * cell + cell - 3);
    label.textContent = data.layers[i];
    svg.appendChild(label);
    for (let e = 0; e < data.experts_per_layer[i]; e++) {
      const v = row[e];
      const r = document.createElementNS(SVG, "rect");
      r.setAttribute("class", "cell");
      r.setAttribute("x", left + e * cell);
      r.setAttribute("y", top + i * cell);
      r.setAttribute("width", cell);
      r.setAttribute("height", cell);
      r.dataset.layer = data.layers[i];
      r.dataset.expert = e;
      r.setAttribute("fill", v === null ? "#ccc" : colour((f(v) - lo) / (hi - lo)));
      const title = document.createElementNS(SVG, "title");
      title.textContent = `layer ${data.layers[i]}, expert ${e}: ${scorer} = ${v === null ? "n/a" : +v.toPrecision(5)}`;
      r.appendChild(title);
      svg.appendChild(r);
    }
  });
  return { lo, hi, log };
}

function showStats() {
  const data = state.data;
  if (!data) return;
  const scorer = $("#scorer").value;
  const scale = drawHeatmap($("#heatmap"), data, scorer);
  $("#legend").textContent =
    `${data.layers.length} MoE layers x ${Math.max(...data.experts_per_layer)} experts; ` +
    `${scorer}${scale.log ? " (log10(1 + |v|))" : ""}, dark = low, yellow = high; ` +
    `${data.tokens} tokens` + (data.forwards !== undefined ? `, ${data.forwards} forwards` : "");
  markSelection();
}

function fillScorers(data) {
  const select = $("#scorer");
  const current = select.value;
  const names = Object.keys(data.scores).sort();
  select.innerHTML = names.map((n) => `<option>${n}</option>`).join("");
  select.value = names.includes(current) ? current : names.includes("reap") ? "reap" : names[0];
}

async function loadSource() {
  const source = $("#source").value;
  try {
    if (source === "live") {
      state.data = await api("GET", "/v1/mlxfun/stats");
      state.path = null;
    } else {
      state.data = await api("POST", "/v1/mlxfun/stats/load", { path: source });
      state.path = source;
    }
    fillScorers(state.data);
    showStats();
  } catch (e) { say(e.message); }
}

async function refreshFiles() {
  try {
    const files = await api("GET", "/v1/mlxfun/files");
    const select = $("#source");
    const current = select.value;
    select.innerHTML = '<option value="live">live counters</option>' +
      files.stats.map((p) => `<option value="${escapeHtml(p)}">${escapeHtml(p)}</option>`).join("");
    if ([...select.options].some((o) => o.value === current)) select.value = current;
    $("#compare-files").innerHTML = files.stats.map((p) =>
      `<label><input type="checkbox" value="${escapeHtml(p)}"> ${escapeHtml(p)}</label>`).join("<br>");
    $("#report-file").innerHTML = '<option value="">(none)</option>' +
      files.reports.map((p) => `<option>${escapeHtml(p)}</option>`).join("");
  } catch (e) { say(e.message); }
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// ---------------------------------------------------------------------------------------------
// selection (the selector runs on the server: what is highlighted is what prune removes)

function selectionBody() {
  const mode = $$('input[name="mode"]').find((r) => r.checked).value;
  return {
    stats: state.path || "live",
    scorer: $("#scorer").value,
    mode,
    n: parseInt($("#select-n").value, 10),
  };
}

async function select() {
  try {
    const body = selectionBody();
    const result = await api("POST", "/v1/mlxfun/select", body);
    if (!state.path) {
      // the live counters were saved to a file: show exactly the numbers that were selected on
      state.path = result.stats;
      await refreshFiles();
      $("#source").value = result.stats;
      state.data = await api("POST", "/v1/mlxfun/stats/load", { path: result.stats });
      showStats();
    }
    state.selection = result;
    markSelection();
    $("#impact tbody").innerHTML = result.layers.map((r) =>
      `<tr><td>${r.layer}</td><td>${r.experts}</td><td>${r.removed}</td>` +
      `<td>${r.removed_ids.join(", ")}</td><td>${(100 * r.removed_score_share).toFixed(2)}%</td></tr>`).join("");
    $("#command").textContent = result.command;
    say(`${result.removed} experts selected (${result.selector}); ${result.experts_before} -> ${result.experts_after}`, true);
  } catch (e) { say(e.message); }
}

function markSelection() {
  const chosen = new Set();
  if (state.selection) {
    for (const row of state.selection.layers) for (const e of row.removed_ids) chosen.add(`${row.layer}:${e}`);
  }
  $$("#heatmap rect.cell").forEach((r) => {
    r.classList.toggle("selected", chosen.has(`${r.dataset.layer}:${r.dataset.expert}`));
  });
}

function clearSelection() {
  state.selection = null;
  $("#impact tbody").innerHTML = "";
  $("#command").textContent = "(select experts first)";
  markSelection();
}

// ---------------------------------------------------------------------------------------------
// jobs

async function runJob(kind) {
  try {
    const body = { ...selectionBody(), output: $("#job-output").value };
    if (kind === "merge") body.dataset = $("#job-dataset").value;
    const job = await api("POST", `/v1/mlxfun/${kind}`, body);
    showTab("jobs");
    say(`${job.id} queued`, true);
  } catch (e) { say(e.message); }
}

async function refreshJobs() {
  try {
    const { jobs } = await api("GET", "/v1/mlxfun/jobs");
    $("#jobs tbody").innerHTML = jobs.reverse().map((j) => {
      const result = j.error ? escapeHtml(j.error) : j.summary
        ? `${j.summary.experts_before} -> ${j.summary.experts_after} experts` : "";
      const cancel = ["queued", "running"].includes(j.state)
        ? `<button data-cancel="${j.id}">Cancel</button>` : "";
      return `<tr data-job="${j.id}"><td>${j.id}</td><td>${j.kind}</td><td class="state">${j.state}</td>` +
        `<td><progress max="1" value="${j.progress}"></progress> ${escapeHtml(j.phase)}</td>` +
        `<td>${escapeHtml(j.request.output || "")}</td><td>${result}</td><td>${cancel}</td></tr>`;
    }).join("");
  } catch (e) { /* shown elsewhere */ }
}

// ---------------------------------------------------------------------------------------------
// compare

async function compare() {
  const paths = $$("#compare-files input:checked").map((i) => i.value);
  const maps = $("#compare-maps");
  maps.innerHTML = "";
  try {
    const shown = [];
    for (const p of paths) shown.push([p, await api("POST", "/v1/mlxfun/stats/load", { path: p })]);
    if (paths.length >= 2) {
      const merged = await api("POST", "/v1/mlxfun/stats/merge", {
        paths, mode: $("#merge-mode").value, output: $("#merge-output").value || undefined,
      });
      shown.push([`${$("#merge-mode").value} merge` + (merged.path ? ` (${merged.path})` : ""), merged]);
      await refreshFiles();
    }
    const scorer = $("#scorer").value || "reap";
    for (const [name, data] of shown) {
      const figure = document.createElement("figure");
      const svg = document.createElementNS(SVG, "svg");
      const use = data.scores[scorer] ? scorer : Object.keys(data.scores)[0];
      drawHeatmap(svg, data, use, { cell: 8 });
      figure.appendChild(svg);
      const caption = document.createElement("figcaption");
      caption.textContent = `${name}: ${use}`;
      figure.appendChild(caption);
      maps.appendChild(figure);
    }
    if (paths.length < 2) say("pick two or more files to merge");
  } catch (e) { say(e.message); }
}

// ---------------------------------------------------------------------------------------------
// chat and steering

async function chatOnce(messages, steer) {
  const body = { messages, max_tokens: parseInt($("#chat-max").value, 10) || 64 };
  if (steer !== undefined) body.mlxfun_steer = steer;
  const before = await api("GET", "/v1/mlxfun/stats?scorer=frequency");
  const answer = await api("POST", "/v1/chat/completions", body);
  const after = await api("GET", "/v1/mlxfun/stats?scorer=frequency");
  // counts of this answer (requests of other clients in between would be included too)
  const diff = after.scores.frequency.map((row, i) => row.map((v, e) => v - before.scores.frequency[i][e]));
  return { text: answer.choices[0].message.content, routing: { ...after, scores: { frequency: diff } } };
}

async function chat() {
  const text = $("#chat-input").value.trim();
  if (!text) return;
  const messages = [{ role: "user", content: text }];
  const box = $("#chat-answers");
  box.innerHTML = '<div class="answer"><h4>answer</h4>...</div>';
  try {
    // steered: the experts listed here (this request only), else the server's active spec
    const own = state.steer.length ? steerSpec() : undefined;
    const runs = [[own ? "steered" : "answer", own]];
    if ($("#chat-compare").checked) {
      runs[0][0] = "steered";
      runs.push(["unsteered", null]);
    }
    box.innerHTML = "";
    for (const [name, steer] of runs) {
      const result = await chatOnce(messages, steer);
      const div = document.createElement("div");
      div.className = "answer";
      div.dataset.kind = name;
      div.innerHTML = `<h4>${name}</h4>`;
      div.appendChild(document.createTextNode(result.text));
      box.appendChild(div);
      if (name !== "unsteered") drawHeatmap($("#chat-heatmap"), result.routing, "frequency", { cell: 10, log: false });
    }
  } catch (e) { say(e.message); box.innerHTML = ""; }
}

function renderSteerList() {
  $("#steer-list").innerHTML = state.steer.map((s, i) =>
    `<li>layer ${s.layer}, expert ${s.expert}: ${s.mode} <button data-unsteer="${i}">x</button></li>`).join("");
}

function steerSpec() {
  // the steering spec format (docs/steering.md): one rule per (layer, mode)
  const rules = {};
  for (const s of state.steer) {
    const layer = s.layer === "all" ? "all" : parseInt(s.layer, 10);
    const key = `${layer}:${s.mode}`;
    (rules[key] = rules[key] || { layer, experts: [], mode: s.mode }).experts.push(s.expert);
  }
  return { rules: Object.values(rules) };
}

async function applySteer() {
  try {
    if (!state.steer.length) return clearSteer();
    await api("POST", "/v1/mlxfun/steer", steerSpec());
    say("steering applied", true);
  } catch (e) { say(e.message); }
}

async function clearSteer() {
  try {
    state.steer = [];
    renderSteerList();
    await api("DELETE", "/v1/mlxfun/steer");
    say("steering cleared", true);
  } catch (e) { say(e.message); }
}

// ---------------------------------------------------------------------------------------------
// reports

async function showReport() {
  const path = $("#report-file").value;
  const out = $("#report");
  out.innerHTML = "";
  state.report = null;
  if (!path) return;
  try {
    const report = await api("GET", "/v1/mlxfun/report?path=" + encodeURIComponent(path));
    state.report = report;
    const head = Object.entries(report).filter(([, v]) => typeof v !== "object")
      .map(([k, v]) => `<b>${escapeHtml(k)}</b>: ${escapeHtml(v)}`).join("<br>");
    let body = "";
    if (report.parts && report.moe_layers) {
      // a scan report (docs/scans.md): per part, statistics per (layer, expert); expert groups
      const parts = Object.keys(report.parts);
      const groups = Object.keys(report.groups || {});
      body = '<div class="controls">' +
        `<label>Part <select id="report-part">${parts.map((p) => `<option>${escapeHtml(p)}</option>`).join("")}</select></label>` +
        '<label>Statistic <select id="report-stat"></select></label>' +
        `<label>Group <select id="report-group"><option value="">(none)</option>${groups.map((g) => `<option>${escapeHtml(g)}</option>`).join("")}</select></label>` +
        '<button id="report-steer">Mask this group (chat tab)</button></div>' +
        '<svg id="report-heatmap"></svg><table id="report-groups"><thead><tr><th>group</th><th>part</th><th>prefers</th><th>experts (layer: ids)</th></tr></thead><tbody>' +
        groups.map((g) => {
          const grp = report.groups[g];
          const ids = Object.entries(grp.experts || {}).filter(([, e]) => e.length).map(([l, e]) => `${l}: ${e.join(",")}`).join("; ");
          return `<tr><td>${escapeHtml(g)}</td><td>${escapeHtml(grp.part || "")}</td><td>${escapeHtml(grp.prefers || "")}</td><td>${escapeHtml(ids)}</td></tr>`;
        }).join("") + "</tbody></table>";
    }
    out.innerHTML = `<p>${head}</p>${body}<details><summary>JSON</summary><pre>${escapeHtml(JSON.stringify(report, null, 1))}</pre></details>`;
    if (report.parts && report.moe_layers) {
      $("#report-part").addEventListener("change", () => { fillReportStats(); drawReport(); });
      $("#report-stat").addEventListener("change", drawReport);
      $("#report-group").addEventListener("change", drawReport);
      $("#report-steer").addEventListener("click", steerReportGroup);
      fillReportStats();
      drawReport();
    }
  } catch (e) { say(e.message); }
}

function fillReportStats() {
  const stats = Object.keys(state.report.parts[$("#report-part").value] || {});
  $("#report-stat").innerHTML = stats.map((s) => `<option>${escapeHtml(s)}</option>`).join("");
}

function reportGroupCells() {
  const name = $("#report-group").value;
  const group = name && state.report.groups[name];
  return group ? Object.entries(group.experts || {}).flatMap(([l, ids]) => ids.map((e) => [l, e])) : [];
}

function drawReport() {
  const r = state.report;
  const stat = $("#report-stat").value;
  const data = { layers: r.moe_layers, experts_per_layer: r.num_experts, scores: { [stat]: r.parts[$("#report-part").value][stat] } };
  drawHeatmap($("#report-heatmap"), data, stat, { log: false });
  const chosen = new Set(reportGroupCells().map(([l, e]) => `${l}:${e}`));
  $$("#report-heatmap rect.cell").forEach((c) => c.classList.toggle("selected", chosen.has(`${c.dataset.layer}:${c.dataset.expert}`)));
}

function steerReportGroup() {
  for (const [layer, expert] of reportGroupCells()) state.steer.push({ layer: String(layer), expert, mode: "mask" });
  renderSteerList();
  showTab("chat");
}

// ---------------------------------------------------------------------------------------------
// wiring

function showTab(name) {
  $$("nav button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  $$(".tab").forEach((t) => t.classList.toggle("active", t.id === "tab-" + name));
  say("");
  if (name === "jobs") refreshJobs();
}

async function connect() {
  try {
    state.info = await api("GET", "/v1/mlxfun/info");
    const i = state.info;
    $("#model-info").textContent = `${i.model} (${i.adapter}, ${i.layers.length} MoE layers, ` +
      `${Math.max(...i.experts_per_layer)} experts, top-${i.top_k[0]})`;
    $("#steer-layer").innerHTML = '<option value="all">all</option>' + i.layers.map((l) => `<option>${l}</option>`).join("");
    $("#steer-status").textContent = i.steering
      ? "Mask or force experts, then apply: every request is steered until cleared."
      : "Steering is not available in this build of mlxfun serve.";
    $$("#steer-controls button, #steer-controls input, #steer-controls select").forEach((el) => { el.disabled = !i.steering; });
    say("");
    await refreshFiles();
    await loadSource();
  } catch (e) {
    $("#model-info").textContent = "not connected";
    say(e.message + (state.key ? "" : " (enter the API key?)"));
  }
}

function wire() {
  $("#api-key").value = state.key;
  $("#api-key").addEventListener("change", (e) => {
    state.key = e.target.value;
    localStorage.setItem("mlxfunKey", state.key);
    connect();
  });
  $$("nav button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  $("#source").addEventListener("change", () => { clearSelection(); loadSource(); });
  $("#refresh").addEventListener("click", () => { refreshFiles(); loadSource(); });
  $("#scorer").addEventListener("change", () => { clearSelection(); showStats(); });
  $("#log-scale").addEventListener("change", showStats);
  $("#select").addEventListener("click", select);
  $("#clear-selection").addEventListener("click", clearSelection);
  $$('input[name="mode"]').forEach((r) => r.addEventListener("change", clearSelection));
  $("#copy-command").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("#command").textContent));
  $("#run-prune").addEventListener("click", () => runJob("prune"));
  $("#run-merge").addEventListener("click", () => runJob("merge"));
  $("#reset-live").addEventListener("click", async () => {
    try { await api("POST", "/v1/mlxfun/stats/reset", {}); say("live counters reset", true); loadSource(); } catch (e) { say(e.message); }
  });
  $("#save-live").addEventListener("click", async () => {
    try {
      const saved = await api("POST", "/v1/mlxfun/stats/save", { path: $("#save-name").value });
      say(`saved ${saved.path} (${saved.tokens_seen} tokens)`, true);
      refreshFiles();
    } catch (e) { say(e.message); }
  });
  $("#upload").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try {
      const name = file.name.replace(/[^A-Za-z0-9._-]/g, "_");
      const loaded = await api("POST", "/v1/mlxfun/stats/upload?name=" + encodeURIComponent(name), undefined, await file.arrayBuffer());
      await refreshFiles();
      $("#source").value = loaded.path;
      clearSelection();
      await loadSource();
      say(`loaded ${file.name}`, true);
    } catch (err) { say(err.message); }
  });
  $("#merge").addEventListener("click", compare);
  $("#chat-send").addEventListener("click", chat);
  $("#steer-add").addEventListener("click", () => {
    const layer = $("#steer-layer").value;
    state.steer.push({ layer, expert: parseInt($("#steer-expert").value, 10), mode: $("#steer-mode").value });
    renderSteerList();
  });
  $("#steer-list").addEventListener("click", (e) => {
    if (e.target.dataset.unsteer !== undefined) { state.steer.splice(+e.target.dataset.unsteer, 1); renderSteerList(); }
  });
  $("#steer-apply").addEventListener("click", applySteer);
  $("#steer-clear").addEventListener("click", clearSteer);
  $("#report-file").addEventListener("change", showReport);
  $("#jobs").addEventListener("click", async (e) => {
    if (e.target.dataset.cancel) {
      try { await api("POST", `/v1/mlxfun/jobs/${e.target.dataset.cancel}/cancel`, {}); refreshJobs(); } catch (err) { say(err.message); }
    }
  });
  state.jobsTimer = setInterval(() => { if ($("#tab-jobs").classList.contains("active")) refreshJobs(); }, 1000);
}

wire();
connect();
