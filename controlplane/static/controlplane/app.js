// Small progressive enhancements; every page works without this file.
(function () {
  "use strict";

  // Wide tables scroll inside a box of their own at narrow widths, never the whole page.
  document.documentElement.classList.add("js");
  document.querySelectorAll("table.table").forEach(function (table) {
    if (table.parentElement.classList.contains("table-scroll")) return;
    var box = document.createElement("div");
    box.className = "table-scroll";
    table.parentNode.insertBefore(box, table);
    box.appendChild(table);
  });

  // "Copy" buttons: <button data-copy="element-id">.
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) return;
    var field = document.getElementById(button.getAttribute("data-copy"));
    if (!field) return;
    field.select();
    var done = function () {
      var label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(done, function () { document.execCommand("copy"); done(); });
    } else {
      document.execCommand("copy");
      done();
    }
  });

  // Compare form: ask for two versions before leaving the page.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.id !== "compare-form") return;
    if (form.querySelectorAll('input[name="versions"]:checked').length < 2) {
      event.preventDefault();
      window.alert("Tick at least two versions to compare.");
    }
  });
})();
