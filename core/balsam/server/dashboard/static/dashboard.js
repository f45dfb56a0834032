// Balsam dashboard: live refresh of the server-rendered page regions marked data-live, and times
// shown in the browser's time zone. The pages work without it (reload to refresh).
(function () {
  "use strict";
  // A refresh waits at least MIN_PERIOD_MS, and SLOWDOWN times as long as the last one took: a
  // page that is slow to build (?count=all scans every matching job) is not rebuilt back to back.
  var MIN_PERIOD_MS = 5000;
  var SLOWDOWN = 10;
  // While refreshes fail (the server is down, overloaded or answering errors), each failure after
  // the first (a blip is retried at the usual pace) doubles the wait, up to MAX_BACKOFF_MS: every
  // open tab asking every 5 s would add to an overload. The first answer goes back to MIN_PERIOD_MS.
  var MAX_BACKOFF_MS = 60000;
  var failures = 0;

  // The server writes UTC; shown here in the browser's zone, named ("5/1/2024, 5:00:00 AM CDT"),
  // with the UTC time on hover. Relative times ("3 s ago") keep their words.
  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var iso = el.getAttribute("datetime");
      if (!iso || el.dataset.local) return;
      var d = new Date(iso);
      if (isNaN(d.getTime())) return;
      el.title = d.toISOString().replace(/\.\d{3}Z$/, "Z");
      if (!/ago|now|never/.test(el.textContent)) el.textContent = d.toLocaleString(undefined, { timeZoneName: "short" });
      el.dataset.local = "1";
    });
  }

  function liveEnabled() {
    var box = document.getElementById("live");
    return box && box.checked && !document.hidden;
  }

  // While refreshes fail, the page says since when what it shows is stale (the page itself looks
  // as fresh as ever); the next answer clears it. Shared with plots.js (window.balsamLive).
  var lastUpdated = new Date();

  function updated() {
    lastUpdated = new Date();
    failures = 0;
    var note = document.getElementById("live-stale");
    if (note) { note.hidden = true; note.textContent = ""; }
  }

  function notUpdated(why) {
    var note = document.getElementById("live-stale");
    if (!note) return;
    note.textContent = "not updated since " + lastUpdated.toLocaleTimeString(undefined, { hour12: false }) + " (" + why + ")";
    note.hidden = false;
  }

  // The page's job is gone (deleted while its page is open): the page keeps what it showed, says
  // so, and is no longer refreshed. Asking again every 5 s would get the same answer (a deleted job
  // does not come back) and log a console error each time; a reload asks again. Only a job's page
  // is ever answered "not found" by the server (its lists are never), and only the server's own
  // page saying "Job N not found" for this page's job ends the refreshes: any other 404 (a proxy's
  // "404 page not found" while its backend restarts) is a failure like a 502, tried again later.
  var gone = false;

  function jobGone(html) {
    var id = /\/jobs\/(\d+)\/?$/.exec(window.location.pathname);
    if (!id || !document.querySelector('[data-live="job-head"]')) return null;
    var said = new DOMParser().parseFromString(html || "", "text/html").querySelector("main p.error[role=alert]");
    var text = said ? said.textContent.trim() : "";
    return text === "Job " + id[1] + " not found" ? text : null;
  }

  function pageGone(what) {
    gone = true;
    var note = document.getElementById("live-stale");
    if (!note) return;
    note.textContent = what + ": shown as of " + lastUpdated.toLocaleTimeString(undefined, { hour12: false }) +
      ", no longer refreshed (reload the page to ask again)";
    note.hidden = false;
  }

  // A refresh that got no answer (the server is down or unreachable) or a server error.
  function failed(err) {
    failures += 1;
    notUpdated(err && err.status ? "the server answered " + err.status : "server not answering");
  }

  // How long to wait before the next refresh, after one that took ``took`` ms.
  function period(took) {
    return Math.max(Math.min(MIN_PERIOD_MS * Math.pow(2, Math.max(0, failures - 1)), MAX_BACKOFF_MS), SLOWDOWN * (took || 0));
  }

  // tabStops (below): plots.js marks its charts' boxes by the same rule once drawn.
  window.balsamLive = { updated: updated, failed: failed, period: period, tabStops: tabStops };

  // Each live region's HTML as the server last sent it (the page's own at first).
  var served = {};

  // A wide table scrolls sideways in its box (.table-scroll): a replaced region keeps each box's
  // position, as a user reading a column left it. A box is found again by its name (aria-label,
  // one per box), else its table's id, else its place in the region: on the Sites page a table
  // that appears in an earlier card moves every later box's place.
  function boxKey(box, i) {
    var table = box.querySelector("table");
    return box.getAttribute("aria-label") || (table && table.id ? "#" + table.id : "@" + i);
  }

  function boxesByKey(region) {
    var found = Object.create(null);  // a site may be named "__proto__"
    Array.prototype.forEach.call(region.querySelectorAll(".table-scroll"), function (box, i) {
      found[boxKey(box, i)] = box;
    });
    return found;
  }

  function scrollsOf(region) {
    var boxes = boxesByKey(region);
    return Object.keys(boxes).map(function (key) { return { key: key, left: boxes[key].scrollLeft }; });
  }

  function restoreScrolls(region, scrolled) {
    var boxes = boxesByKey(region);
    scrolled.forEach(function (s) {
      if (s.left && boxes[s.key]) boxes[s.key].scrollLeft = s.left;
    });
  }

  // The keyboard's focus in a replaced region (a table's box, or a link) would fall back to the
  // page itself: it goes to the same box (by its key) or the link with the same address.
  function focusOf(region) {
    var el = document.activeElement;
    if (!el || el === region || !region.contains(el)) return null;
    if (el.classList.contains("table-scroll")) {
      var keys = boxesByKey(region);
      for (var key in keys) if (keys[key] === el) return { box: key };
    }
    var href = el.getAttribute("href");
    return href ? { href: href } : null;
  }

  function restoreFocus(region, focused) {
    if (!focused) return;
    var el = focused.box ? boxesByKey(region)[focused.box] : Array.prototype.find.call(
      region.querySelectorAll("a[href]"), function (a) { return a.getAttribute("href") === focused.href; });
    if (!el) return;
    if (focused.box) tabStop(el, true);  // its new table may no longer scroll: focusable all the same
    el.focus({ preventScroll: true });
  }

  // A box whose content is wider than it is a Tab stop (the arrow keys scroll it); one that does not
  // scroll would be a stop that does nothing. Its width follows the window's, and its content the
  // data: a table's box (.table-scroll), a chart's (.chart, plots.js). A box that stops scrolling
  // while it has the keyboard's focus (a refresh made its table narrower, the window got wider)
  // keeps the focus, focusable but no longer a stop (tabindex -1), until the focus leaves it
  // (focusout, below): without a tabindex it could not be focused, and the focus would fall back
  // to the page itself, the keyboard user's place lost.
  var BOXES = ".table-scroll, .chart";

  function tabStop(box, focused) {
    if (box.scrollWidth > box.clientWidth) box.tabIndex = 0;
    else if (focused) box.tabIndex = -1;
    else box.removeAttribute("tabindex");
  }

  function tabStops(root) {
    root.querySelectorAll(BOXES).forEach(function (box) { tabStop(box, box === document.activeElement); });
  }

  function refresh() {
    var regions = document.querySelectorAll("[data-live]");
    if (!regions.length || !liveEnabled()) return Promise.resolve();
    return fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (resp) {
        if (resp.redirected || resp.status === 401) { window.location.reload(); return null; }
        // A server error (or a proxy's "bad gateway") leaves the page stale; the server's "Job N not
        // found" for this job page ends the refreshes (jobGone), any other "not found" leaves the page
        // stale; another refusal (a page whose filters are refused) changes nothing live.
        if (resp.status >= 500) throw { status: resp.status };
        if (resp.status === 404) {
          return resp.text().then(function (html) {
            var what = jobGone(html);
            if (!what) throw { status: resp.status };
            pageGone(what);
            return null;
          });
        }
        return resp.ok ? resp.text() : null;
      })
      .then(function (html) {
        if (!html) return;
        updated();
        var doc = new DOMParser().parseFromString(html, "text/html");
        regions.forEach(function (region) {
          var name = region.getAttribute("data-live");
          var fresh = doc.querySelector('[data-live="' + name + '"]');
          // Compared with what the server sent last time, not with the region as shown (its times
          // are localized, so it never equals the server's): an unchanged region is left as it is,
          // its tables' sideways scroll and the focus with it.
          if (fresh && fresh.innerHTML !== served[name]) {
            served[name] = fresh.innerHTML;
            var scrolled = scrollsOf(region);
            var focused = focusOf(region);
            region.innerHTML = fresh.innerHTML;
            localTimes(region);
            tabStops(region);
            restoreScrolls(region, scrolled);
            restoreFocus(region, focused);
          }
        });
        document.dispatchEvent(new CustomEvent("balsam:refreshed"));
      })
      .catch(failed);  // tried again next period
  }

  function loop() {
    var started = Date.now();
    refresh().then(function () {
      if (!gone) window.setTimeout(loop, period(Date.now() - started));
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(function (region) {
      served[region.getAttribute("data-live")] = region.innerHTML;
    });
    localTimes(document);
    tabStops(document);
    window.addEventListener("resize", function () { tabStops(document); });
    // The focus left a box kept focusable while focused: a stop again only if it scrolls. (The
    // window losing the focus leaves the box the page's active element: it keeps its tabindex.)
    document.addEventListener("focusout", function (event) {
      var box = event.target;
      if (box.matches && box.matches(BOXES) && box !== document.activeElement) tabStop(box, false);
    });
    window.setTimeout(loop, MIN_PERIOD_MS);
  });
})();
