"""The status page the monitor serves at ``/``: one self-contained HTML document.

It fetches ``/status.json`` every second and redraws the same table as the ``status``
command (and the exit table), with a small chart of each process's qps over the last
two minutes. No external resources: it works on a machine without internet access.
"""

STATUS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>longshore status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2733; background: #fafbfc; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  #master { color: #52606d; margin-bottom: 1em; }
  #error { color: #b42318; font-weight: bold; }
  table { border-collapse: collapse; margin-bottom: 1.5em; background: #fff; }
  th, td { padding: .3em .7em; border-bottom: 1px solid #e4e7eb; white-space: nowrap; }
  th { text-align: left; background: #f0f2f5; font-weight: 600; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
  tfoot td { font-weight: 600; border-top: 2px solid #cbd2d9; }
  .idle { color: #1a7f37; } .busy { color: #b42318; font-weight: bold; } .other { color: #9a6700; }
  svg.chart { display: block; }
  svg.chart polyline { fill: none; stroke: #2f6fde; stroke-width: 1.5; }
  svg.chart rect { fill: #eef3fd; }
</style>
</head>
<body>
<h1>longshore status</h1>
<div id="master">loading&hellip;</div>
<div id="error"></div>
<table id="processes">
  <thead><tr>
    <th class="num">pid</th><th>worker</th><th>listen</th><th class="num">memory</th>
    <th class="num">conns</th><th class="num">send_fail</th><th class="num">timers</th>
    <th class="num">total_request</th><th class="num">qps</th><th class="num">exceptions</th>
    <th>status</th><th>qps, last 2 min</th>
  </tr></thead>
  <tbody></tbody>
  <tfoot><tr></tr></tfoot>
</table>
<h2 style="font-size:1.1em">worker exits</h2>
<table id="exits">
  <thead><tr><th>worker</th><th>exit status</th><th class="num">count</th></tr></thead>
  <tbody></tbody>
</table>
<script>
"use strict";
function humanBytes(size) {
  const units = ["B", "K", "M", "G"];
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) { size /= 1024; unit++; }
  return unit === 0 ? size.toFixed(0) + "B" : size.toFixed(1) + units[unit];
}
function humanDuration(seconds) {
  seconds = Math.floor(seconds);
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600), m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  const parts = [];
  if (d) parts.push(d + "d");
  if (d || h) parts.push(h + "h");
  if (d || h || m) parts.push(m + "m");
  parts.push(s + "s");
  return parts.join(" ");
}
function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}
function chart(samples) {
  const width = 120, height = 22, ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const background = document.createElementNS(ns, "rect");
  background.setAttribute("width", width);
  background.setAttribute("height", height);
  svg.appendChild(background);
  if (samples.length > 1) {
    const top = Math.max(1, ...samples);
    const step = width / (samples.length - 1);
    const points = samples.map((q, i) => (i * step).toFixed(1) + "," + (height - 1 - q / top * (height - 2)).toFixed(1));
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.appendChild(line);
  }
  const title = document.createElementNS(ns, "title");
  title.textContent = samples.length ? "max " + Math.max(...samples).toFixed(0) + " qps" : "no samples yet";
  svg.appendChild(title);
  return svg;
}
function render(doc) {
  const m = doc.master;
  document.getElementById("master").textContent =
    "version " + (m.version || "") + " \\u00b7 master pid " + m.pid + " \\u00b7 " + (m.loop || "") + " \\u00b7 Python " + (m.python || "") +
    " \\u00b7 up " + humanDuration(m.uptime || 0) + " \\u00b7 state " + m.state + (m.reloading ? " (reloading)" : "") +
    " \\u00b7 master memory " + humanBytes(m.memory || 0);
  const body = document.querySelector("#processes tbody");
  body.replaceChildren();
  for (const p of doc.processes) {
    const row = document.createElement("tr");
    row.dataset.pid = p.pid;
    cell(row, p.pid, "num");
    cell(row, p.name + "[" + p.worker_id + "]");
    cell(row, p.listen);
    cell(row, humanBytes(p.memory), "num");
    cell(row, p.connections, "num");
    cell(row, p.send_fail, "num");
    cell(row, p.timers, "num");
    cell(row, p.total_request, "num");
    cell(row, p.qps.toFixed(0), "num");
    cell(row, p.throw_exception, "num");
    if (p.status === "busy") cell(row, "busy " + p.busy_for.toFixed(1) + "s", "busy");
    else if (p.state !== "running") cell(row, p.state, "other");
    else cell(row, "idle", "idle");
    cell(row, "").appendChild(chart((doc.qps_history || {})[p.pid] || []));
    body.appendChild(row);
  }
  const s = doc.summary;
  const foot = document.querySelector("#processes tfoot tr");
  foot.replaceChildren();
  cell(foot, s.processes + " proc", "num"); cell(foot, ""); cell(foot, "");
  cell(foot, humanBytes(s.memory), "num"); cell(foot, s.connections, "num"); cell(foot, s.send_fail, "num");
  cell(foot, s.timers, "num"); cell(foot, s.total_request, "num"); cell(foot, s.qps.toFixed(0), "num");
  cell(foot, s.throw_exception, "num"); cell(foot, s.busy ? s.busy + " busy" : "idle"); cell(foot, "");
  const exits = document.querySelector("#exits tbody");
  exits.replaceChildren();
  for (const e of doc.exits) {
    const row = document.createElement("tr");
    cell(row, e.name); cell(row, e.status); cell(row, e.count, "num");
    exits.appendChild(row);
  }
  if (!doc.exits.length) {
    const row = document.createElement("tr");
    cell(row, "none yet").colSpan = 3;
    exits.appendChild(row);
  }
  document.body.dataset.updated = doc.time;
}
async function refresh() {
  try {
    const response = await fetch("/status.json", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    document.getElementById("error").textContent = "";
  } catch (error) {
    document.getElementById("error").textContent = "cannot reach the monitor: " + error.message;
  }
  setTimeout(refresh, 1000);
}
refresh();
</script>
</body>
</html>
"""
