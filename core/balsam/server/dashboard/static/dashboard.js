// Balsam dashboard: live refresh of the server-rendered page regions marked data-live, and times
// shown in the browser's time zone. The pages work without it (reload to refresh).
(function () {
  "use strict";
  var PERIOD_MS = 5000;

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var iso = el.getAttribute("datetime");
      if (!iso || el.dataset.local) return;
      var d = new Date(iso);
      if (isNaN(d.getTime())) return;
      el.title = el.textContent + " (UTC)";
      if (!/ago|now|never/.test(el.textContent)) el.textContent = d.toLocaleString();
      el.dataset.local = "1";
    });
  }

  function liveEnabled() {
    var box = document.getElementById("live");
    return box && box.checked && !document.hidden;
  }

  function refresh() {
    var regions = document.querySelectorAll("[data-live]");
    if (!regions.length || !liveEnabled()) return Promise.resolve();
    return fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (resp) {
        if (resp.redirected || resp.status === 401) { window.location.reload(); return null; }
        return resp.ok ? resp.text() : null;
      })
      .then(function (html) {
        if (!html) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        regions.forEach(function (region) {
          var fresh = doc.querySelector('[data-live="' + region.getAttribute("data-live") + '"]');
          if (fresh && fresh.innerHTML !== region.innerHTML) {
            region.innerHTML = fresh.innerHTML;
            localTimes(region);
          }
        });
        document.dispatchEvent(new CustomEvent("balsam:refreshed"));
      })
      .catch(function () { /* server briefly away: try again next period */ });
  }

  function loop() {
    refresh().then(function () { window.setTimeout(loop, PERIOD_MS); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    window.setTimeout(loop, PERIOD_MS);
  });
})();
