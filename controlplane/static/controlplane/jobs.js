// Jobs pages: live progress bars. Every element marked data-live polls its job's API
// (session-authenticated GET) every second until the job has finished; the detail page then
// reloads so files, result and log are current. Without this file the pages still show the
// state at load time.
(function () {
  "use strict";
  if (!window.fetch) return;
  var INTERVAL_MS = 1000;
  var FINISHED = ["succeeded", "failed", "cancelled"];
  var badgesNode = document.getElementById("jobs-badges");
  var badges = badgesNode ? JSON.parse(badgesNode.textContent) : {};

  function field(root, name) { return root.querySelector('[data-field="' + name + '"]'); }
  function label(s) { return s.charAt(0).toUpperCase() + s.slice(1); }

  function render(root, job) {
    var p = job.progress || {};
    var state = field(root, "state");
    if (state) { state.className = "badge " + (badges[job.state] || "badge-archived"); state.textContent = label(job.state); }
    var bar = field(root, "bar");
    if (bar) { if (p.percent === null || p.percent === undefined) bar.removeAttribute("value"); else bar.value = p.percent; }
    var count = field(root, "count");
    if (count) count.textContent = p.done + (p.total === null ? "" : "/" + p.total);
    var rate = field(root, "rate");
    if (rate) rate.textContent = p.rate ? Math.round(p.rate) + "/s" : "—";
    var eta = field(root, "eta");
    if (eta) eta.textContent = p.eta_seconds === null || p.eta_seconds === undefined ? "—" : Math.round(p.eta_seconds) + " s";
    var error = field(root, "error");
    if (error) { error.textContent = job.error || ""; error.hidden = !job.error; }
    // Past its commit point a running job can no longer be cancelled (the API answers 409).
    if (job.committed_at && FINISHED.indexOf(job.state) === -1) {
      var cancel = document.querySelector('[data-field="cancel"]');
      if (cancel && !cancel.disabled) {
        cancel.disabled = true;
        cancel.textContent = "Finishing (cannot cancel)";
        cancel.title = "The job is registering its output and will finish";
      }
      var committed = field(root, "committed");
      if (committed) committed.hidden = false;
    }
  }

  function poll(root) {
    fetch(root.getAttribute("data-job-url"), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (job) {
        if (!job) return;
        render(root, job);
        if (FINISHED.indexOf(job.state) !== -1) {
          root.removeAttribute("data-live");
          if (root.id === "job-live") window.location.reload();
          return;
        }
        setTimeout(function () { poll(root); }, INTERVAL_MS);
      })
      .catch(function () { setTimeout(function () { poll(root); }, INTERVAL_MS * 3); });
  }

  document.querySelectorAll("[data-live][data-job-url]").forEach(function (root) {
    setTimeout(function () { poll(root); }, INTERVAL_MS);
  });
})();
