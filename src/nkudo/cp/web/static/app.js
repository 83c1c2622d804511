// nkudo dashboard: small progressive enhancements. No framework, no inline handlers (the CSP forbids them).
// Everything here is optional: every page works without it.
(function () {
  "use strict";

  // <form data-confirm="..."> asks before submitting (destructive actions). Without JS a confirm page does it.
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      ev.preventDefault();
    }
  }, true);

  // <button data-copy="id"> copies the text of #id (one-time tokens, command lines).
  document.addEventListener("click", function (ev) {
    var btn = ev.target instanceof Element ? ev.target.closest("button[data-copy]") : null;
    if (!btn) { return; }
    var src = document.getElementById(btn.getAttribute("data-copy"));
    if (!src || !navigator.clipboard) { return; }
    navigator.clipboard.writeText(src.textContent.trim()).then(function () {
      btn.textContent = "Copied";
      setTimeout(function () { btn.textContent = "Copy"; }, 2000);
    });
  });

  // <time datetime=... data-relative> shows "3 min ago"; keep that text fresh while the page stays open.
  function ago(iso) {
    var t = Date.parse(iso);
    if (isNaN(t)) { return null; }
    var s = Math.round((Date.now() - t) / 1000), future = s < 0, text;
    s = Math.abs(s);
    if (s >= 86400) { text = Math.floor(s / 86400) + " d"; }
    else if (s >= 3600) { text = Math.floor(s / 3600) + " h"; }
    else if (s >= 60) { text = Math.floor(s / 60) + " min"; }
    else { text = s + " s"; }
    return future ? "in " + text : text + " ago";
  }
  function refresh() {
    var els = document.querySelectorAll("time[data-relative]");
    for (var i = 0; i < els.length; i++) {
      var text = ago(els[i].getAttribute("datetime"));
      if (text) { els[i].textContent = text; }
    }
  }
  setInterval(refresh, 15000);
  document.addEventListener("htmx:afterSwap", refresh);
})();
