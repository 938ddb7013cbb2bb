// lorafit ui: the Data, Train and Chat views.
"use strict";

async function fillFiles(listId, filter) {
  const data = await api("/api/files");
  document.getElementById(listId).innerHTML = data.files.filter(filter)
    .map(f => `<option value="${esc(f)}">`).join("");
}

// ---- Data: the `lorafit data check` report and the examples as training sees them
let dataTarget = null, dataStart = 0;
function openData() { fillFiles("data-files", () => true); }

$("#data-form").onsubmit = async ev => {
  ev.preventDefault();
  $("#data-error").textContent = ""; $("#data-result").innerHTML = "Checking…"; $("#data-examples").innerHTML = "";
  try {
    const r = await api("/api/data/check", {target: $("#data-target").value, model: $("#data-model").value,
      max_length: $("#data-max-length").value || null});
    dataTarget = r.target; dataStart = 0;
    $("#data-result").innerHTML = checkHtml(r);
    await showExamples();
  } catch (e) { $("#data-result").innerHTML = ""; $("#data-error").textContent = e.message; }
};

function checkHtml(r) {
  const peak = Math.max(1, ...r.histogram.map(b => b.count));
  const rows = (r.sources.concat(r.validation_sources)).map(s => `<tr><td>${esc(s.path)}</td><td>${esc(s.format)}</td>` +
    `<td>${s.rows}</td><td>${s.invalid}</td><td>${s.weight ?? "validation"}</td></tr>`).join("");
  const cards = [[r.train_samples, "training samples"], [r.validation_samples, "validation samples"],
    [r.invalid, "invalid rows"], [r.dropped_too_long, "dropped: too long"],
    [r.dropped_no_trained_token, "dropped: nothing trained"], [r.duplicates, "exact duplicates"],
    [(100 * r.trained_fraction).toFixed(1) + "%", "tokens trained"], [r.length.p95, "p95 tokens"]];
  return `<p class="sub"><b id="data-verdict">${r.ok ? "ok: the data can train" : "cannot train as configured"}</b>` +
    ` · tokenizer of ${esc(r.model)}, template ${esc(r.template)}, <span id="data-max">max_length ${r.max_length}</span></p>` +
    `<div class="cards">${cards.map(([v, k]) => `<div class="card" data-card="${k}"><b>${v}</b><span>${k}</span></div>`).join("")}</div>` +
    `<h2>Sources</h2><div class="scroll"><table id="data-sources"><tr><th>path</th><th>format</th><th>rows</th>` +
    `<th>invalid</th><th>weight</th></tr>${rows}</table></div>` +
    (r.invalid_examples.length ? `<h2>Invalid rows</h2><ul id="data-invalid">${r.invalid_examples.map(p => `<li>${esc(p)}</li>`).join("")}</ul>` : "") +
    `<h2>Token lengths</h2><table id="data-hist">${r.histogram.map(b => `<tr><td>${b.from}–${b.to}</td>` +
      `<td><span class="bar" style="width:${Math.round(200 * b.count / peak)}px"></span> ${b.count}</td></tr>`).join("")}</table>` +
    r.warnings.map(w => `<p class="warn">warning: ${esc(w)}</p>`).join("") +
    r.problems.map(p => `<p class="error">cannot train: ${esc(p)}</p>`).join("");
}

const DROPPED = {too_long: " · dropped: longer than max_length", no_trained: " · dropped: no trained token",
  truncated: " · truncated to max_length"};
async function showExamples() {
  const r = await api(`/api/data/examples?target=${encodeURIComponent(dataTarget)}&start=${dataStart}&count=5`);
  const nav = `<div class="row"><button type="button" id="ex-prev" ${r.start ? "" : "disabled"}>Previous</button>` +
    `<span id="ex-range">examples ${r.total ? r.start + 1 : 0}–${r.start + r.examples.length} of ${r.total}</span>` +
    `<button type="button" id="ex-next" ${r.start + r.examples.length < r.total ? "" : "disabled"}>Next</button>` +
    `<span class="sub"><span class="trained">trained</span> tokens carry the loss; grey ones are masked</span></div>`;
  $("#data-examples").innerHTML = "<h2>Examples as training sees them</h2>" + nav + r.examples.map(e =>
    `<div class="ex ${e.status}"><span class="sub">${esc(e.loc)} · ${e.tokens} tokens${DROPPED[e.status] || ""}</span><pre>` +
    e.spans.map(s => `<span class="${s.trained ? "trained" : "masked"}">${esc(s.text)}</span>`).join("") +
    "</pre></div>").join("");
  $("#ex-prev").onclick = () => { dataStart = Math.max(0, dataStart - 5); showExamples(); };
  $("#ex-next").onclick = () => { dataStart += 5; showExamples(); };
}

// ---- Train: the config as a form, errors next to their field, the plan, then start
let trainConfig = null, original = {};
function openTrain() { fillFiles("config-files", f => /\.ya?ml$/.test(f)); }

$("#train-load").onsubmit = async ev => {
  ev.preventDefault();
  $("#train-error").textContent = ""; $("#train-plan").innerHTML = ""; $("#start-btn").disabled = true;
  try {
    const r = await api("/api/train/form?config=" + encodeURIComponent($("#train-config").value));
    trainConfig = r.config; original = {};
    $("#train-form").innerHTML = r.fields.map(f => {
      original[f.name] = f.value;
      const id = "f-" + f.name.replace(/\W/g, "_");
      const input = f.kind === "bool" ? `<input type="checkbox" id="${id}" name="${f.name}"${f.value === "true" ? " checked" : ""}>` :
        f.kind === "choice" ? `<select id="${id}" name="${f.name}">${f.choices.map(c => `<option${c === f.value ? " selected" : ""}>${esc(c)}</option>`).join("")}</select>` :
        `<input id="${id}" name="${f.name}" value="${esc(f.value)}">`;
      return `<div class="field" data-field="${f.name}"><label for="${id}">${f.name}</label>${input}` +
        `<span class="problem"></span><span class="help">${esc(f.help)}</span></div>`;
    }).join("");
    $("#train-form").oninput = () => { $("#start-btn").disabled = true; };
  } catch (e) { $("#train-error").textContent = e.message; }
};

function changes() {
  const out = {};
  $("#train-form").querySelectorAll("[name]").forEach(el => {
    const v = el.type === "checkbox" ? String(el.checked) : el.value;
    if (v !== original[el.name]) out[el.name] = v;
  });
  return out;
}

function showProblems(r) {
  document.querySelectorAll(".field").forEach(f => {
    const p = r.fields[f.dataset.field];
    f.classList.toggle("bad", !!p);
    f.querySelector(".problem").textContent = p || "";
  });
  const unplaced = Object.keys(r.fields).filter(k => !document.querySelector(`.field[data-field="${k}"]`));
  $("#train-error").textContent = (r.error || "") + unplaced.map(k => `${k || "config"}: ${r.fields[k]}`).join("\n");
}

$("#validate-btn").onclick = async () => {
  $("#train-plan").innerHTML = "Checking the config and the data…";
  const r = await api("/api/train/validate", {config: trainConfig, changes: changes()});
  showProblems(r);
  $("#train-plan").innerHTML = r.plan ? planHtml(r.plan) : "";
  $("#start-btn").disabled = !r.ok;
};

function planHtml(p) {
  const est = p.estimate_seconds === null ? "no earlier run of this model to time it from" :
    `about ${secs(p.estimate_seconds)} at the speed of run ${esc(p.estimate_from)}`;
  return `<p id="plan-line"><b>${p.steps} optimizer steps</b> · ${p.train_samples} training samples ` +
    `(${p.samples_per_step} per step, ${p.epochs.toFixed(1)} epochs) · ${p.validation_samples} validation · ~${p.tokens.toLocaleString("en")} tokens · ${est}</p>` +
    p.warnings.map(w => `<p class="warn">warning: ${esc(w)}</p>`).join("");
}

$("#start-btn").onclick = async () => {
  $("#start-btn").disabled = true;
  try {
    const r = await api("/api/train/start", {config: trainConfig, changes: changes()});
    if (!r.started) { showProblems(r); return; }
    $("#start-msg").textContent = `started ${r.name} (pid ${r.pid}, log ${r.log})`;
    location.hash = "#run/" + encodeURIComponent(r.name);
  } catch (e) { $("#start-msg").textContent = e.message; }
};

// ---- Chat: base and tuned answer the same conversation, one after the other, streamed; tools as `chat --tools`
let chatHistory = {base: [], tuned: []}, awaiting = {base: false, tuned: false}, chatTools = "";
async function openChat(name) {
  const data = await api("/api/runs");
  const done = data.runs.filter(r => r.state === "finished");
  $("#chat-run").innerHTML = done.map(r => `<option${r.name === name ? " selected" : ""}>${esc(r.name)}</option>`).join("");
  $("#chat-run").onchange = resetChat;
  resetChat();
}

function clearChat() {
  chatHistory = {base: [], tuned: []}; awaiting = {base: false, tuned: false};
  $("#chat-base").innerHTML = ""; $("#chat-tuned").innerHTML = "";
}

let prefilled = "";  // the tools a tool-trained run's data offered, put in the box (the user may change them)
async function resetChat() {
  clearChat();
  if (!$("#chat-run").value) return;
  const info = await api("/api/chat/" + encodeURIComponent($("#chat-run").value));
  $("#chat-system").value = info.system;
  const box = $("#chat-tools").value.trim();
  if (box === "" || box === prefilled) {
    $("#chat-tools").value = prefilled = info.tools;
    await useTools();
    if (info.tools) $("#chat-tools-msg").textContent += ` (from the training data` +
      (info.tool_sets > 1 ? `: the first of its ${info.tool_sets} tool sets)` : ")");
  }
}
$("#chat-reset").onclick = resetChat;

// The tools box: checked by the server as `lorafit chat --tools FILE` checks its file; new tools, new conversation.
async function useTools() {
  const text = $("#chat-tools").value.trim();
  $("#chat-tools-msg").textContent = ""; $("#chat-tools-error").textContent = "";
  try {
    const r = await api("/api/tools/check", {tools: text});
    if (text !== chatTools) clearChat();
    chatTools = text;
    $("#chat-tools-msg").textContent = r.tools.length ? "tools: " + r.tools.join(", ") : "no tools";
    return true;
  } catch (e) { chatTools = ""; $("#chat-tools-error").textContent = e.message; return false; }
}
$("#chat-tools-btn").onclick = useTools;

$("#chat-form").onsubmit = async ev => {
  ev.preventDefault();
  if ($("#chat-tools").value.trim() !== chatTools && !(await useTools())) return;
  const text = $("#chat-input").value;
  $("#chat-input").value = ""; $("#chat-send").disabled = true;
  for (const side of ["base", "tuned"]) {
    const role = awaiting[side] ? "tool" : "user";  // after a call, the next line is the tool's result
    awaiting[side] = false;
    chatHistory[side].push({role, content: text});
    const log = $("#chat-" + side);
    log.insertAdjacentHTML("beforeend", role === "user" ? `<div class="user">${esc(text)}</div>` :
      `<div class="user result">tool result: ${esc(text)}</div>`);
    const out = document.createElement("div"); out.className = "answer"; log.appendChild(out);
    showEnd(side, out, await streamAnswer(side, out));
  }
  $("#chat-send").disabled = false;
};

// The end of an answer: a tool call is shown parsed ({name, arguments}) and, with tools, kept as a call turn
function showEnd(side, out, end) {
  if (end.error) { out.textContent = end.error; return; }
  if (end.tool_call) {
    out.insertAdjacentHTML("afterend", `<div class="call">tool call: <b>${esc(end.tool_call.name)}</b> ` +
      `<code>${esc(JSON.stringify(end.tool_call.arguments))}</code></div>`);
    if (chatTools) {
      chatHistory[side].push({role: "assistant", content: "", tool_calls: [{type: "function", function: end.tool_call}]});
      awaiting[side] = true;
      return;
    }
  } else if (end.tool_problem && chatTools) {
    out.insertAdjacentHTML("afterend", `<div class="warn">looks like a tool call but cannot be read: ${esc(end.tool_problem)}</div>`);
  }
  chatHistory[side].push({role: "assistant", content: end.answer});
}

async function streamAnswer(side, out) {
  const res = await fetch(`/api/chat/${encodeURIComponent($("#chat-run").value)}/answer`, {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({side, history: chatHistory[side], system: $("#chat-system").value,
      max_new_tokens: +$("#chat-max").value, tools: chatTools})});
  if (!res.ok) return {error: (await res.json()).error};
  const reader = res.body.getReader(), dec = new TextDecoder();
  let buf = "", end = null;
  while (!end) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let k;
    while ((k = buf.indexOf("\n")) >= 0) {
      const msg = JSON.parse(buf.slice(0, k)); buf = buf.slice(k + 1);
      if (msg.done) end = msg; else out.textContent += msg.text;
    }
  }
  return end || {error: "the answer stream ended early"};
}
