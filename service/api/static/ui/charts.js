// Small SVG charts drawn with createElementNS (no library, no markup strings): bar charts of counts and
// lines of figures per hour (the monitoring). Each chart carries a <title>, an aria-label, and its numbers
// as a table under a <details>, for screen readers and for reading exact values.

import { el } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 480;
const HEIGHT = 220;
const PAD = { left: 60, right: 16, top: 12, bottom: 36 };
export const COLORS = ["#00798c", "#d1495b", "#6a4c93", "#2e7d32"];

function svg(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

function format(value) {
  if (typeof value === "string") return value;
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 100 ? value.toFixed(0) : value.toPrecision(3);
}

function frame(title, yMax) {
  const root = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": title, class: "chart" });
  root.append(svg("title", {}, title));
  const plotHeight = HEIGHT - PAD.top - PAD.bottom;
  for (const fraction of [0, 0.5, 1]) {
    const y = PAD.top + plotHeight * (1 - fraction);
    root.append(svg("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y, y2: y, class: "grid" }));
    root.append(svg("text", { x: PAD.left - 6, y: y + 4, "text-anchor": "end", class: "tick" }, format(yMax * fraction)));
  }
  return root;
}

function table(caption, head, rows) {
  const details = el("details", { class: "chart-data" }, el("summary", {}, `${caption}: the numbers`));
  const body = el("tbody");
  for (const row of rows) body.append(el("tr", {}, ...row.map((cell) => el("td", {}, format(cell)))));
  details.append(
    el("div", { class: "scroll" }, el("table", {}, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col" }, h)))), body)),
  );
  return details;
}

/** Bars of ``counts`` over the intervals of ``edges`` (a histogram). */
export function histogram({ title, counts, edges, xLabel, yLabel }) {
  const top = Math.max(1, ...counts);
  const root = frame(title, top);
  const plotWidth = WIDTH - PAD.left - PAD.right;
  const plotHeight = HEIGHT - PAD.top - PAD.bottom;
  const lo = edges[0];
  const span = edges[edges.length - 1] - lo || 1;
  counts.forEach((count, i) => {
    const x = PAD.left + ((edges[i] - lo) / span) * plotWidth;
    const width = Math.max(0.5, ((edges[i + 1] - edges[i]) / span) * plotWidth - 0.5);
    const height = (count / top) * plotHeight;
    const bar = svg("rect", { x, y: PAD.top + plotHeight - height, width, height, fill: COLORS[0] });
    bar.append(svg("title", {}, `${format(edges[i])}–${format(edges[i + 1])}: ${count}`));
    root.append(bar);
  });
  for (const value of [edges[0], (edges[0] + edges[edges.length - 1]) / 2, edges[edges.length - 1]]) {
    const x = PAD.left + ((value - lo) / span) * plotWidth;
    root.append(svg("text", { x, y: HEIGHT - PAD.bottom + 14, "text-anchor": "middle", class: "tick" }, format(value)));
  }
  root.append(svg("text", { x: PAD.left + plotWidth / 2, y: HEIGHT - 4, "text-anchor": "middle", class: "axis" }, xLabel));
  root.append(svg("text", { x: 12, y: PAD.top + plotHeight / 2, "text-anchor": "middle", class: "axis", transform: `rotate(-90 12 ${PAD.top + plotHeight / 2})` }, yLabel));
  const rows = counts.map((count, i) => [edges[i], edges[i + 1], count]);
  return el("figure", { class: "chart-figure" }, root, el("figcaption", {}, title), table(title, ["from", "to", yLabel], rows.filter((row) => row[2] > 0)));
}

/** Lines over equally spaced points (a time series, oldest first); a null value breaks its line. */
export function lines({ id = null, title, points, series, yLabel, yMax = null, ticks }) {
  const values = series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined);
  const top = yMax ?? Math.max(1e-9, ...values) * 1.1;
  const root = frame(title, top);
  const plotWidth = WIDTH - PAD.left - PAD.right;
  const plotHeight = HEIGHT - PAD.top - PAD.bottom;
  const x = (i) => PAD.left + (points.length === 1 ? plotWidth / 2 : (i / (points.length - 1)) * plotWidth);
  const y = (value) => PAD.top + plotHeight * (1 - Math.min(value, top) / top);
  for (const s of series) {
    let run = [];
    const flush = () => {
      if (run.length > 1) root.append(svg("polyline", { points: run.join(" "), fill: "none", stroke: s.color, "stroke-width": 2 }));
      run = [];
    };
    s.values.forEach((value, i) => {
      if (value === null || value === undefined) {
        flush();
        return;
      }
      run.push(`${x(i).toFixed(1)},${y(value).toFixed(1)}`);
      const dot = svg("circle", { cx: x(i), cy: y(value), r: 2.5, fill: s.color });
      dot.append(svg("title", {}, `${points[i]}, ${s.name}: ${format(value)}`));
      root.append(dot);
    });
    flush();
  }
  for (const [i, label] of ticks) {
    const anchor = i === 0 ? "start" : i === points.length - 1 ? "end" : "middle";
    root.append(svg("text", { x: x(i), y: HEIGHT - PAD.bottom + 14, "text-anchor": anchor, class: "tick" }, label));
  }
  root.append(svg("text", { x: 12, y: PAD.top + plotHeight / 2, "text-anchor": "middle", class: "axis", transform: `rotate(-90 12 ${PAD.top + plotHeight / 2})` }, yLabel));
  const legend = el("ul", { class: "legend" }, ...series.map((s) => el("li", {}, el("span", { class: "swatch", "data-color": s.color }), s.name)));
  for (const swatch of legend.querySelectorAll(".swatch")) swatch.style.background = swatch.dataset.color;
  const rows = points.map((point, i) => [point, ...series.map((s) => s.values[i])]).reverse(); // newest first
  return el("figure", { class: "chart-figure", id }, root, el("figcaption", {}, title), legend, table(title, ["hour", ...series.map((s) => s.name)], rows));
}
