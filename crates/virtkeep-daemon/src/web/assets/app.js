// virtkeep web console: live job progress over server-sent events. The pages work
// without it; this only fills in the elements marked data-job.
"use strict";
(function () {
  function bytes(n) {
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + u[i];
  }
  function set(root, sel, text) {
    var el = root.querySelector(sel);
    if (el) { el.textContent = text; }
  }
  function follow(root) {
    var id = root.getAttribute("data-job");
    if (!/^[0-9]+$/.test(id) || !window.EventSource) { return; }
    var src = new EventSource("/ui/jobs/" + id + "/events");
    src.addEventListener("progress", function (e) {
      var t = JSON.parse(e.data);
      var bar = root.querySelector("progress");
      if (bar && t.bytes_total > 0) {
        bar.max = t.bytes_total;
        bar.value = Math.min(t.bytes_done, t.bytes_total);
      }
      set(root, ".phase", t.phase || t.status);
      set(root, ".done", bytes(t.bytes_done));
      set(root, ".total", t.bytes_total ? bytes(t.bytes_total) : "?");
      set(root, ".rate", bytes(t.rate) + "/s");
      if (t.done) {
        src.close();
        set(root, ".phase", t.status);
        if (root.getAttribute("data-reload")) { window.location.reload(); }
      }
    });
    src.onerror = function () { src.close(); };
  }
  document.addEventListener("DOMContentLoaded", function () {
    var live = document.querySelectorAll("[data-job]");
    for (var i = 0; i < live.length; i++) { follow(live[i]); }
  });
})();
