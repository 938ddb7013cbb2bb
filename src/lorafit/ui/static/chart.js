// A small SVG line chart (no library, nothing fetched): lineChart(element, [{name, points: [[x, y], ...]}], labels)
"use strict";
const COLORS = ["#2b59c3", "#e07b00", "#1e8a4c", "#b3261e", "#7a3fb0", "#00838f", "#8d6e63", "#c2185b"];

function lineChart(el, series, opts = {}) {
  const W = 760, H = opts.height || 260, L = 56, R = 12, T = 12, B = 34;
  const pts = series.flatMap(s => s.points);
  if (!pts.length) { el.innerHTML = '<p class="sub" style="padding:8px">No points yet.</p>'; return; }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => T + (y1 - y) / (y1 - y0) * (H - T - B);
  const intX = pts.every(p => Number.isInteger(p[0])) && x1 - x0 >= 4;  // steps: whole numbers on the axis
  const parts = [`<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="${opts.label || "chart"}">`];
  for (let k = 0; k <= 4; k++) {
    const y = y0 + (y1 - y0) * k / 4, x = x0 + (x1 - x0) * k / 4;
    parts.push(`<line x1="${L}" x2="${W - R}" y1="${sy(y)}" y2="${sy(y)}" stroke="#eceef2"/>`,
      `<text x="${L - 6}" y="${sy(y) + 4}" font-size="11" text-anchor="end" fill="#5b6472">${fmt(y)}</text>`,
      `<text x="${sx(x)}" y="${H - 16}" font-size="11" text-anchor="middle" fill="#5b6472">${fmt(intX ? Math.round(x) : x)}</text>`);
  }
  parts.push(`<text x="${(L + W) / 2}" y="${H - 2}" font-size="11" text-anchor="middle" fill="#5b6472">${opts.xlabel || "step"}</text>`);
  series.forEach((s, i) => {
    const c = COLORS[i % COLORS.length];
    const d = s.points.map((p, k) => `${k ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    parts.push(`<path class="series" data-name="${esc(s.name)}" d="${d}" fill="none" stroke="${c}" stroke-width="1.8"/>`);
    if (s.points.length < 60 || s.dots) s.points.forEach(p => parts.push(
      `<circle cx="${sx(p[0])}" cy="${sy(p[1])}" r="2.5" fill="${c}"><title>${esc(s.name)} step ${p[0]}: ${fmt(p[1])}</title></circle>`));
    const lx = W - R - 150 * (series.length - i);  // legend top right, on a white box over the grid
    parts.push(`<rect x="${lx - 4}" y="${T}" width="148" height="16" fill="#fff" opacity="0.85"/>`,
      `<rect x="${lx}" y="${T + 3}" width="10" height="10" fill="${c}"/>`,
      `<text x="${lx + 14}" y="${T + 12}" font-size="11">${esc(s.name)}</text>`);
  });
  el.innerHTML = parts.join("") + "</svg>";
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  if (a >= 1e4 || (Number.isInteger(v) && a >= 1)) return Math.round(v).toLocaleString("en");
  return a >= 100 ? v.toFixed(0) : a >= 1 ? v.toFixed(3) : v.toPrecision(3);
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
