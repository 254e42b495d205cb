// Draws the overview's chart with the vendored uPlot from the JSON the page carries.
(function () {
  "use strict";
  var COLORS = {injected: "#2563eb", delivered: "#16a34a", deferred: "#d97706",
                bounced: "#dc2626", dropped: "#6b7280", opens: "#9333ea", clicks: "#0891b2"};
  function draw() {
    var el = document.getElementById("chart");
    var src = document.getElementById("chart-data");
    if (!el || !src || typeof uPlot === "undefined") { return; }
    var d = JSON.parse(src.textContent);
    var data = [d.times];
    var series = [{}];
    Object.keys(d.series).forEach(function (name) {
      data.push(d.series[name]);
      series.push({label: name, stroke: COLORS[name] || "#111827", width: 2,
                   points: {show: true, size: 6, fill: COLORS[name] || "#111827"}});
    });
    var opts = {width: Math.max(320, el.clientWidth || 900), height: 300, series: series,
                scales: {x: {time: true}, y: {range: function (u, lo, hi) { return [0, Math.max(1, hi)]; }}},
                axes: [{}, {}], tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); }};
    el.innerHTML = "";
    var plot = new uPlot(opts, data, el);
    el.setAttribute("data-rendered", String(d.times.length));
    window.relaylabChart = plot;
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else { draw(); }
})();
