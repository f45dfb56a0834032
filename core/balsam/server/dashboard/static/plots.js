// Throughput and utilization charts (uPlot, vendored) and the summary table above them. Data: the
// page's data-url (JSON from the server's analytics), the page's one refresh loop while "live
// updates" is on (the page has no data-live region for dashboard.js to refresh as well). As in
// dashboard.js, the next refresh waits at least MIN_PERIOD_MS and SLOWDOWN times as long as the
// last data request took: an open tab keeps the server busy at most about a tenth of the time.
(function () {
  "use strict";
  var MIN_PERIOD_MS = 5000;
  var SLOWDOWN = 10;
  var charts = {};

  // A chart is as wide as its box's content, so its whole time axis is in view down to a phone's
  // 320 px window; below MIN_WIDTH (narrower than any phone) it would be unreadable: it keeps
  // MIN_WIDTH and scrolls in its box, a Tab stop then (dashboard.js's rule for the tables' boxes).
  var MIN_WIDTH = 200;

  function size(el) {
    var style = window.getComputedStyle(el);
    var inner = el.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    return { width: Math.max(MIN_WIDTH, Math.floor(inner)), height: 260 };
  }

  // Run once uPlot has sized a chart (its setSize hook): uPlot sizes the canvas in a deferred step,
  // so a check right after new uPlot() or setSize() would measure the old layout.
  function tabStops() {
    var live = window.balsamLive;
    if (live && live.tabStops) live.tabStops(document.getElementById("plots"));
  }

  // A chart follows its box's width, not the window's: the box also narrows without a resize event
  // when the page gets a (classic, non-overlay) vertical scrollbar, as drawing the charts makes it
  // tall enough to need one. The observer also tells when the window's width changed. It watches an
  // empty block at the top of the box (as wide as the box's content, never any height), not the box:
  // setSize re-wraps the chart's legend, which changed the box's height inside the observer's own
  // callback, and the browser reported "ResizeObserver loop completed with undelivered
  // notifications" as an error of the page (a window narrowed from 1280 to 180 px: 6 times).
  var boxWatch = typeof ResizeObserver === "undefined" ? null : new ResizeObserver(function (entries) {
    entries.forEach(function (entry) {
      var el = entry.target.parentNode, chart = el && charts[el.id.replace("chart-", "")];
      if (!chart) return;
      var want = size(el);
      if (want.width !== chart.width) chart.setSize(want); else tabStops();
    });
  });

  // Both charts show one time window: from the first point of either series to now (the data's
  // last point if later), at least MIN_SPAN_S wide so that a campaign whose jobs all finished in the
  // same second still has a readable axis.
  var MIN_SPAN_S = 60;
  var windowRange = [null, null];

  function sharedRange(payload) {
    var xs = payload.throughput.t.concat(payload.utilization.t, [payload.generated]);
    var lo = Math.min.apply(null, xs), hi = Math.max.apply(null, xs);
    return [Math.min(lo, hi - MIN_SPAN_S), hi];
  }

  function makeChart(id, series, data) {
    var el = document.getElementById(id);
    var opts = Object.assign(size(el), {
      scales: { x: { time: true, range: function () { return windowRange; } } },
      axes: [{}, { label: series.axis }],
      series: [{}].concat(series.lines),
      legend: { live: true },
      hooks: { setSize: [tabStops] },
    });
    el.innerHTML = "";
    // Named (a region a screen reader lists, a Tab stop where it scrolls) once it holds a chart:
    // without JavaScript the box stays empty, and an empty named region would be noise.
    el.setAttribute("role", "region");
    el.setAttribute("aria-label", series.name + " chart");
    var chart = new uPlot(opts, data, el);
    if (boxWatch) {
      var probe = document.createElement("div");
      probe.className = "chart-width";
      el.insertBefore(probe, el.firstChild);
      boxWatch.observe(probe);
    }
    return chart;
  }

  function num(n) {
    return Number(n || 0).toLocaleString("en-US");
  }

  // A time as the server's pages write one, shown by dashboard.js's rule: local, zone named, UTC on hover.
  function timeElement(epoch) {
    var d = new Date(epoch * 1000), el = document.createElement("time");
    el.setAttribute("datetime", d.toISOString());
    el.title = d.toISOString().replace(/\.\d{3}Z$/, "Z");
    el.textContent = d.toLocaleString(undefined, { timeZoneName: "short" });
    return el;
  }

  function fillSummary(summary) {
    document.getElementById("summary-finished").textContent = num(summary.finished);
    var firstLast = document.getElementById("summary-first-last");
    firstLast.textContent = "";
    if (summary.first_finished === null || summary.first_finished === undefined) {
      firstLast.textContent = "—";
    } else {
      firstLast.append(timeElement(summary.first_finished), " / ", timeElement(summary.last_finished));
    }
    document.getElementById("summary-busy").textContent = num(summary.busy_now) + " (" + num(summary.peak_busy) + ")";
    document.getElementById("summary-available").textContent = num(summary.available_now);
  }

  function draw(payload) {
    fillSummary(payload.summary);
    windowRange = sharedRange(payload);
    // The cumulative count starts from 0 at the window's start (the step line needs a first point).
    var thrT = payload.throughput.t.slice(), thrY = payload.throughput.finished.slice();
    if (!thrT.length || thrT[0] > windowRange[0]) {
      thrT.unshift(windowRange[0]);
      thrY.unshift(0);
    }
    var thr = [thrT, thrY];
    var util = [payload.utilization.t, payload.utilization.busy, payload.utilization.available];
    if (!charts.throughput) {
      charts.throughput = makeChart("chart-throughput", {
        name: "Throughput",
        axis: "jobs finished",
        lines: [{ label: "finished", stroke: "#0b5fad", width: 2, paths: uPlot.paths.stepped({ align: 1 }) }],
      }, thr);
      charts.utilization = makeChart("chart-utilization", {
        name: "Utilization",
        axis: "nodes",
        lines: [
          { label: "busy", stroke: "#1a7f37", width: 2, fill: "rgba(26,127,55,0.12)", paths: uPlot.paths.stepped({ align: 1 }) },
          { label: "available", stroke: "#9a6700", width: 2, dash: [6, 4], paths: uPlot.paths.stepped({ align: 1 }) },
        ],
      }, util);
    } else {
      charts.throughput.setData(thr);
      charts.utilization.setData(util);
    }
    // "No data yet" above a chart with nothing to draw (no finished job, no node ever busy or held).
    document.getElementById("empty-throughput").hidden = payload.throughput.t.length > 0;
    document.getElementById("empty-utilization").hidden = payload.utilization.t.length > 0;
    var status = document.getElementById("plot-status");
    var when = new Date(payload.generated * 1000).toLocaleTimeString(undefined, { timeZoneName: "short" });
    status.textContent = payload.summary.finished + " jobs finished; " + payload.summary.busy_now +
      " nodes busy of " + payload.summary.available_now + " held (updated " + when + ")";
  }

  // dashboard.js's stale-page note (that script runs after this one: looked up when needed).
  function live() {
    return window.balsamLive || { updated: function () {}, failed: function () {},
      period: function (took) { return Math.max(MIN_PERIOD_MS, SLOWDOWN * (took || 0)); } };
  }

  // Resolves to how long the data request took (answer or failure), for the back-off.
  function load(section) {
    var started = Date.now();
    return fetch(section.getAttribute("data-url"), { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (resp) {
        if (resp.status === 401) { window.location.reload(); return null; }
        if (!resp.ok) throw { status: resp.status, message: "the server answered " + resp.status };
        return resp.json();
      })
      .then(function (payload) {
        var took = Date.now() - started;
        if (payload) { live().updated(); draw(payload); }
        return took;
      })
      .catch(function (err) {
        var took = Date.now() - started;
        if (!err || !err.status || err.status >= 500) live().failed(err);
        document.getElementById("plot-status").textContent = "Could not load the plot data: " +
          (err && err.message ? err.message : "the server is not answering");
        return took;
      });
  }

  function liveEnabled() {
    var box = document.getElementById("live");
    return box && box.checked && !document.hidden;
  }

  document.addEventListener("DOMContentLoaded", function () {
    var section = document.getElementById("plots");
    if (!section || typeof uPlot === "undefined") return;
    function loop(took) {
      var period = live().period(took);  // dashboard.js's, which backs off while requests fail
      window.setTimeout(function () {
        if (liveEnabled()) load(section).then(loop); else loop(0);
      }, period);
    }
    load(section).then(loop);
    if (!boxWatch) {  // a browser older than ResizeObserver: the window's width only
      window.addEventListener("resize", function () {
        Object.keys(charts).forEach(function (k) { charts[k].setSize(size(document.getElementById("chart-" + k))); });
      });
    }
  });
})();
