// Concept graph viewer: plain SVG + DOM, no dependencies, works offline.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("graph-data").textContent);
  var SVGNS = "http://www.w3.org/2000/svg";
  var svg = document.getElementById("graph");
  var panel = document.getElementById("panel");
  var tooltip = document.getElementById("tooltip");
  var slider = document.getElementById("min-weight");
  var W = data.width, H = data.height, S = data.node_size;
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  var byId = {};
  data.nodes.forEach(function (n) { byId[n.id] = n; });

  function el(tag, attrs, parent) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) { e.setAttribute(k, attrs[k]); }
    if (parent) { parent.appendChild(e); }
    return e;
  }
  function fmt(v) { return (Math.abs(v) >= 0.01 || v === 0) ? v.toFixed(3) : v.toExponential(2); }
  function colour(e) {
    var w = e.weight;
    if (e.gig < 0) { return "rgb(" + Math.round(250 - 40 * w) + "," + Math.round(190 - 150 * w) + "," + Math.round(190 - 150 * w) + ")"; }
    return "rgb(" + Math.round(200 - 190 * w) + "," + Math.round(215 - 140 * w) + "," + Math.round(240 - 60 * w) + ")";
  }

  data.layer_rows.forEach(function (r) {
    var t = el("text", { x: 6, y: r.y + 4, "class": "layer-label" }, svg);
    t.textContent = r.label;
  });
  var gEdges = el("g", { id: "edges" }, svg);
  var gNodes = el("g", { id: "nodes" }, svg);
  var edgeEls = [];
  data.edges.forEach(function (e, i) {
    var a = byId[e.source], b = byId[e.target];
    var line = el("line", {
      x1: a.x, y1: a.y - S / 2, x2: b.x, y2: b.y + S / 2,
      stroke: colour(e), "stroke-width": (0.4 + 5 * e.weight).toFixed(2), "class": "edge",
      "data-source": e.source, "data-target": e.target, "data-weight": e.weight, "data-index": i
    }, gEdges);
    var title = el("title", {}, line);
    title.textContent = a.name + " \u2192 " + b.name + "\nGIG " + fmt(e.gig) + ", weight " + e.weight.toFixed(3);
    edgeEls.push(line);
  });
  // strongest edges on top
  edgeEls.slice().sort(function (p, q) { return p.getAttribute("data-weight") - q.getAttribute("data-weight"); })
    .forEach(function (l) { gEdges.appendChild(l); });

  data.nodes.forEach(function (n) {
    var cls = "node " + n.kind + (n.shared ? " shared" : "");
    var g = el("g", { "class": cls, "data-id": n.id, transform: "translate(" + (n.x - S / 2) + "," + (n.y - S / 2) + ")" }, gNodes);
    var wide = n.kind === "class" ? Math.max(S, 7 * n.name.length + 12) : S;  // class names fit their box
    el("rect", { "class": "frame", x: -2 - (wide - S) / 2, y: -2, width: wide + 4, height: S + 4, rx: 3 }, g);
    if (n.thumbnail) {
      el("image", { href: n.thumbnail, x: 0, y: 0, width: S, height: S, preserveAspectRatio: "xMidYMid slice" }, g);
    } else {
      var t0 = el("text", { x: S / 2, y: S / 2 + 4, "text-anchor": "middle" }, g);
      t0.textContent = n.kind === "class" ? n.name : "#" + n.concept;
    }
    if (n.thumbnail) {
      var lab = el("text", { x: S / 2, y: S + 13, "text-anchor": "middle" }, g);
      lab.textContent = "#" + n.concept;
    }
    g.addEventListener("mousemove", function (ev) { showTip(n, ev); });
    g.addEventListener("mouseleave", function () { tooltip.style.display = "none"; });
    g.addEventListener("click", function () { select(n.id); });
  });

  function scoresText(n) {
    var parts = [];
    for (var c in n.scores) { parts.push((data.class_label[c] || ("class " + c)) + ": " + fmt(n.scores[c])); }
    return parts.join("<br>");
  }
  function showTip(n, ev) {
    tooltip.innerHTML = "<b>" + n.name + "</b>" + (n.shared ? " (shared)" : "") + "<br>" + (n.kind === "class" ? "" : "relevance<br>" + scoresText(n));
    tooltip.style.left = (ev.clientX + 14) + "px"; tooltip.style.top = (ev.clientY + 10) + "px";
    tooltip.style.display = "block";
  }

  function applyFilter() {
    var m = parseFloat(slider.value);
    document.getElementById("min-weight-value").textContent = m.toFixed(2);
    var shown = 0;
    edgeEls.forEach(function (l) {
      var on = parseFloat(l.getAttribute("data-weight")) >= m;
      l.style.display = on ? "" : "none";
      if (on) { shown++; }
    });
    document.getElementById("edge-count").textContent = shown + " / " + edgeEls.length + " edges";
  }
  slider.addEventListener("input", applyFilter);
  applyFilter();

  function edgeRows(list, other) {
    if (!list.length) { return "<p class='hint'>none</p>"; }
    return "<table>" + list.map(function (e) {
      return "<tr><td>" + byId[e[other]].name + "</td><td>GIG " + fmt(e.gig) + "</td><td>w " + e.weight.toFixed(2) + "</td></tr>";
    }).join("") + "</table>";
  }
  function select(id) {
    var n = byId[id];
    Array.prototype.forEach.call(gNodes.children, function (g) {
      g.classList.toggle("selected", g.getAttribute("data-id") === id);
    });
    edgeEls.forEach(function (l) {
      var touch = l.getAttribute("data-source") === id || l.getAttribute("data-target") === id;
      l.classList.toggle("hot", touch); l.classList.toggle("dim", !touch);
    });
    var incoming = data.edges.filter(function (e) { return e.target === id; }).sort(function (a, b) { return b.weight - a.weight; }).slice(0, data.n_edges_listed);
    var outgoing = data.edges.filter(function (e) { return e.source === id; }).sort(function (a, b) { return b.weight - a.weight; }).slice(0, data.n_edges_listed);
    var html = "<h2>" + n.name + (n.shared ? " <small>(shared)</small>" : "") + "</h2>";
    if (n.kind !== "class") { html += "<div>relevance: " + scoresText(n) + "</div>"; }
    var atlas = data.atlas[id];
    html += "<h3>Atlas</h3>";
    if (atlas && atlas.length) {
      html += "<div class='atlas'>" + atlas.map(function (a) {
        return "<figure><img class='atlas-crop' src='" + a.src + "' alt='crop'><figcaption>" + (a.caption || "") + "<br>cos " + a.cosine.toFixed(2) + "</figcaption></figure>";
      }).join("") + "</div>";
    } else {
      html += "<p class='hint'>" + (n.kind === "class" ? "a class node" : "no atlas for this layer") + "</p>";
    }
    html += "<h3>Strongest incoming edges</h3>" + edgeRows(incoming, "source");
    html += "<h3>Strongest outgoing edges</h3>" + edgeRows(outgoing, "target");
    panel.innerHTML = html;
  }
  window.conceptGraph = { select: select, data: data };
})();
