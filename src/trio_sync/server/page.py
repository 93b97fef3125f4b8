"""The status page at `/`: plain HTML, one script, one style sheet, all served by the server
itself (no build step, no CDN, works offline). The page holds no data: it logs in once with a
token (`POST /login` sets an HttpOnly, SameSite=Strict session cookie; the token is never kept
by the page or put in a URL), then reads `GET /status.json` and follows `GET /sync` with the
browser's EventSource. Names from the server are only ever set as text, never as HTML."""

from __future__ import annotations

#: No inline script or style, nothing from elsewhere, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>trio-sync</title>
<link rel="stylesheet" href="/page.css">
<script src="/page.js" defer></script>
</head>
<body>
<h1>trio-sync</h1>
<section id="login" hidden>
  <form id="login-form">
    <label for="token">Token</label>
    <input id="token" type="password" autocomplete="current-password" required>
    <button type="submit">Log in</button>
  </form>
  <p id="error" role="alert"></p>
  <p class="hint">Any client token works; <code>trio-sync token add NAME</code> makes one.</p>
</section>
<section id="status" hidden>
  <p>Server <span id="version"></span>, newest revision <span id="rev"></span>.
     <button id="logout" type="button">Log out</button></p>
  <h2>Connected clients</h2>
  <table>
    <thead><tr><th>Name</th><th>Address</th><th>Since</th><th>Behind</th></tr></thead>
    <tbody id="clients"></tbody>
  </table>
  <h2>Storage</h2>
  <dl id="storage"></dl>
  <h2>Changes, as they arrive</h2>
  <ol id="changes"></ol>
</section>
</body>
</html>
"""

JS = """"use strict";
const $ = (id) => document.getElementById(id);
let source = null;

function show(which) {
  $("login").hidden = which !== "login";
  $("status").hidden = which !== "status";
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const text of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.append(td);
  }
  return tr;
}

function size(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i += 1; }
  return `${bytes.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function load() {
  const answer = await fetch("/status.json", {credentials: "same-origin"});
  if (!answer.ok) { show("login"); return; }
  const s = await answer.json();
  $("version").textContent = s.version;
  $("rev").textContent = s.rev;
  $("clients").replaceChildren(...s.clients.map((c) => row([
    c.name, c.address, new Date(c.since * 1000).toLocaleString(), `${c.behind} changes`,
  ])));
  const facts = [
    ["Files", s.storage.files], ["Size of the files", size(s.storage.bytes)],
    ["Chunks stored", s.storage.chunks], ["Size of the chunks", size(s.storage.chunk_bytes)],
    ["Saved by deduplication", size(s.storage.saved_by_dedupe)],
    ["History kept", `${s.storage.history_days} days`],
  ];
  $("storage").replaceChildren(...facts.flatMap(([name, value]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = String(value);
    return [dt, dd];
  }));
  show("status");
  if (source === null) follow();
}

function follow() {
  source = new EventSource("/sync");
  source.addEventListener("change", (event) => {
    const c = JSON.parse(event.data);
    const what = c.deleted ? "deleted" : (c.kind === "dir" ? "folder" : "changed");
    const li = document.createElement("li");
    li.textContent = `${new Date().toLocaleTimeString()} rev ${c.rev}: ${c.path} ${what}` +
      ` by ${c.origin}`;
    $("changes").prepend(li);
    while ($("changes").children.length > 200) $("changes").lastChild.remove();
  });
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const answer = await fetch("/login", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({token: $("token").value}),
  });
  $("token").value = "";
  if (answer.ok) {
    $("error").textContent = "";
    await load();
  } else {
    $("error").textContent = answer.status === 429
      ? "Too many wrong tokens from here; wait a minute."
      : "That token was not accepted.";
  }
});

$("logout").addEventListener("click", async () => {
  await fetch("/logout", {method: "POST"});
  if (source !== null) { source.close(); source = null; }
  show("login");
});

load();
setInterval(() => { if (!$("status").hidden) load(); }, 5000);
"""

CSS = """body { font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 60em;
  padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; }
h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 0.2em 1em 0.2em 0; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1.5em; }
dd { margin: 0; }
#error { color: #a00; }
.hint { color: #666; }
ol { font-family: ui-monospace, monospace; font-size: 0.9em; }
"""
