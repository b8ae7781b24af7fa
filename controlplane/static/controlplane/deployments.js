// Deployment page: live progress while a deployment rolls out, stops or starts.
// Polls the API (session-authenticated GET) every 1.5 s until the status is one
// of config.settled; then reloads the page so revisions and events are current.
// Without this file the page still shows the state and a Refresh link.
(function () {
  "use strict";

  var configNode = document.getElementById("dep-live-config");
  if (!configNode || !window.fetch) return;
  var config = JSON.parse(configNode.textContent);
  var INTERVAL_MS = 1500;

  function el(id) { return document.getElementById(id); }
  function isSettled(status) { return config.settled.indexOf(status) !== -1; }
  function isRollingOut(status) { return config.rolling_out.indexOf(status) !== -1; }
  function label(status) { return status.charAt(0).toUpperCase() + status.slice(1).replace("_", " "); }

  function setBadge(node, status) {
    if (!node) return;
    node.className = "badge " + (config.badges[status] || "badge-archived");
    node.textContent = label(status);
  }

  function clock(iso) {
    if (!iso) return "—";
    return new Date(iso).toISOString().slice(11, 19);  // UTC, like the server-rendered times
  }

  function cell(row, text, className) {
    var td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function renderInstances(instances) {
    var body = document.querySelector("#dep-instances tbody");
    if (!body) return;
    instances = instances.slice().sort(function (a, b) { return b.revision - a.revision || a.ordinal - b.ordinal; });
    body.textContent = "";
    if (!instances.length) {
      var empty = document.createElement("tr");
      cell(empty, "No instances yet.", "muted").colSpan = 7;
      body.appendChild(empty);
      return;
    }
    instances.forEach(function (i) {
      var row = document.createElement("tr");
      cell(row, "r" + i.revision + " #" + i.ordinal, "nowrap");
      cell(row, i.address, "mono");
      var badge = document.createElement("span");
      setBadge(badge, i.state);
      cell(row, "").appendChild(badge);
      cell(row, String(i.restarts), "num");
      cell(row, clock(i.last_probe_at), "nowrap");
      cell(row, (i.runtime_id || "—").slice(0, 24), "mono small");
      cell(row, (i.last_error || "").slice(0, 120), "muted small");
      body.appendChild(row);
    });
  }

  function renderSteps(phase, show) {
    var list = el("dep-steps");
    if (!list) return;
    list.hidden = !show;
    var current = config.steps.indexOf(phase);
    Array.prototype.forEach.call(list.querySelectorAll("[data-step]"), function (step, index) {
      var state = current === -1 ? "todo" : index < current ? "done" : index === current ? "current" : "todo";
      step.className = "step-" + state;
      step.querySelector(".step-mark").textContent = state === "done" ? "✓" : state === "current" ? "▶" : "○";
      step.lastElementChild.className = state === "current" ? "strong" : state === "todo" ? "muted" : "";
    });
  }

  function renderElapsed(phase, since) {
    var node = el("dep-phase-elapsed");
    if (!node) return;
    node.hidden = !phase || !since;
    if (!node.hidden) {
      var seconds = Math.max(0, Math.round((Date.now() - new Date(since).getTime()) / 1000));
      node.textContent = "(" + seconds + " s)";
    }
  }

  function render(d) {
    setBadge(el("dep-status"), d.status);
    setBadge(el("dep-status-title"), d.status);
    el("dep-phase").textContent = d.phase || "";
    renderElapsed(d.phase, d.phase_started_at);
    el("dep-message").textContent = d.status_message || "";
    var current = d.instances.filter(function (i) { return i.revision === d.revision; });
    var ready = current.filter(function (i) { return i.state === "ready"; }).length;
    el("dep-ready").textContent = ready + "/" + current.length;
    renderSteps(d.phase, isRollingOut(d.status) && d.phase !== "stopping");
    el("dep-queued").hidden = isSettled(d.status) || Boolean(d.phase);
    renderInstances(d.instances);
  }

  function poll() {
    fetch(config.url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (resp) {
        if (!resp.ok) throw new Error("status " + resp.status);
        return resp.json();
      })
      .then(function (d) {
        render(d);
        if (isSettled(d.status)) {
          window.location.reload();  // done: show the new revision and events
        } else {
          setTimeout(poll, INTERVAL_MS);
        }
      })
      .catch(function () {
        var note = el("dep-live-note");
        if (note) note.textContent = "live updates paused";
      });
  }

  var live = el("dep-live");
  if (live && live.hasAttribute("data-polling")) setTimeout(poll, INTERVAL_MS);
})();
