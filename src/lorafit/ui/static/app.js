// lorafit ui: the router, the Runs view and the live view of one run. Plain JS, served locally.
"use strict";
const $ = sel => document.querySelector(sel);
let timer = null;

async function api(path, body) {
  const opts = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const res = await fetch(path, opts);
  const data = await res.json().catch(() => ({error: `HTTP ${res.status}`}));
  if (!res.ok) throw new Error(data.error + (data.hint ? "\n" + data.hint : ""));
  return data;
}

function show(view) {
  document.querySelectorAll(".view").forEach(v => v.classList.toggle("on", v.id === "view-" + view));
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("on", a.id === "nav-" + view));
}

function route() {
  clearInterval(timer);
  const [view, arg] = (location.hash.slice(1) || "runs").split("/");
  const name = arg ? decodeURIComponent(arg) : null;
  if (view === "run" && name) { show("run"); watchRun(name); }
  else if (view === "data") { show("data"); openData(); }
  else if (view === "train") { show("train"); openTrain(); }
  else if (view === "chat") { show("chat"); openChat(name); }
  else { show("runs"); loadRuns(); timer = setInterval(loadRuns, 3000); }
}
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);

const num = (v, d = 4) => v === null || v === undefined ? "–" : typeof v === "number" ? +v.toFixed(d) + "" : esc(v);
const gib = b => b ? (b / 2 ** 30).toFixed(2) + " GiB" : "–";
const secs = s => s === null || s === undefined ? "–" : s < 90 ? Math.round(s) + " s" : (s / 60).toFixed(1) + " min";
const selected = new Set();

async function loadRuns() {
  const data = await api("/api/runs");
  $("#runs-dir").textContent = `runs folder ${data.dir} (${data.runs.length} runs)`;
  const head = "<tr><th></th><th>run</th><th>state</th><th>model</th><th>steps</th><th>train loss</th>" +
    "<th>eval loss</th><th>tokens/s</th><th>peak memory</th><th>time</th><th></th></tr>";
  $("#runs-table").innerHTML = head + data.runs.map(r => {
    const n = encodeURIComponent(r.name);
    return `<tr data-run="${esc(r.name)}"><td><input type="checkbox" class="pick" value="${esc(r.name)}"` +
      `${selected.has(r.name) ? " checked" : ""}></td>` +
      `<td><a href="#run/${n}">${esc(r.name)}</a></td><td><span class="badge">${r.state}</span></td>` +
      `<td>${esc(r.model || "")}</td><td>${r.steps ?? "–"}${r.max_steps ? " / " + r.max_steps : ""}</td>` +
      `<td>${num(r.train_loss)}</td><td>${num(r.eval_loss)}</td><td>${num(r.tokens_per_second, 0)}</td>` +
      `<td>${gib(r.peak_memory_bytes)}</td><td>${secs(r.seconds)}</td>` +
      `<td>${r.report ? `<a href="/runs/${n}/report.html" target="_blank">report</a> · ` : ""}` +
      `<a href="#chat/${n}">chat</a></td></tr>`;
  }).join("");
  document.querySelectorAll(".pick").forEach(b => b.onchange = () =>
    b.checked ? selected.add(b.value) : selected.delete(b.value));
}

$("#overlay-btn").onclick = async () => {
  const names = [...selected];
  const runs = await Promise.all(names.map(n => api("/api/runs/" + encodeURIComponent(n))));
  lineChart($("#overlay-chart"), runs.map(r => ({name: r.name, points: r.train.map(p => [p[0], p[1]])})),
    {label: "train loss of " + names.join(", ")});
};

async function watchRun(name) {
  $("#run-title").textContent = name;
  $("#stop-msg").textContent = "";
  const tick = async () => {
    let r;
    try { r = await api("/api/runs/" + encodeURIComponent(name)); }
    catch (e) { $("#run-state").textContent = "waiting for the run to start: " + e.message; return; }  // keep polling
    const lv = r.live;
    $("#run-state").textContent = lv.state;
    $("#run-report").style.display = r.report ? "" : "none";
    $("#run-report").href = `/runs/${encodeURIComponent(name)}/report.html`;
    $("#stop-btn").disabled = !(lv.state === "training");
    const cards = [
      [`${lv.step}${lv.max_steps ? " / " + lv.max_steps : ""}`, "step"],
      [num(lv.loss), "train loss"],
      [num(r.validation.length ? r.validation[r.validation.length - 1][1] : null), "eval loss"],
      [num(lv.tokens_per_second, 0), "tokens / second"],
      [lv.state === "training" ? secs(lv.eta_seconds) : "–", "ETA"],
      [gib(lv.memory_bytes), "memory (" + (lv.memory_kind || "–") + ")"],
    ];
    $("#run-cards").innerHTML = cards.map(([v, k]) => `<div class="card"><b>${v}</b><span>${k}</span></div>`).join("");
    lineChart($("#run-chart"), [
      {name: "train", points: r.train.map(p => [p[0], p[1]])},
      {name: "validation", points: r.validation.map(p => [p[0], p[1]]), dots: true},
    ], {label: "loss"});
    lineChart($("#lr-chart"), [{name: "learning rate", points: r.learning_rate}], {height: 160, label: "lr"});
    // "incomplete": no status.json yet (a run still loading its model) or a run that died: keep watching
    if (["finished", "stopped"].includes(lv.state)) clearInterval(timer);
  };
  await tick();
  timer = setInterval(tick, 1500);
}

$("#stop-btn").onclick = async () => {
  const name = $("#run-title").textContent;
  try {
    const r = await api(`/api/runs/${encodeURIComponent(name)}/stop`, {});
    $("#stop-msg").textContent = `SIGTERM sent to ${r.pid}: a checkpoint is saved after this step.`;
  } catch (e) { $("#stop-msg").textContent = e.message; }
};
