// Charts: line and scatter plots drawn by the vendored uPlot (canvas), a parallel-coordinates view drawn
// as SVG here. Each chart element keeps its uPlot instance as `el.uplot` (its data and series labels),
// so what a chart shows can be read back from the page.
import { h, fmt } from "./api.js";

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
                "#7f7f7f", "#bcbd22"];
export const color = (i) => COLORS[i % COLORS.length];

function box(name, title) {
  const el = h("div", { class: "chart", "data-chart": name }, h("h3", {}, title));
  return el;
}

// curves: [{label, steps: [...], values: [...]}]; one line each, joined on step.
export function lineChart(name, title, curves, { width = 560, height = 260, ylabel = "" } = {}) {
  const el = box(name, title);
  if (!curves.length) { el.append(h("p", { class: "muted" }, "no data yet")); return el; }
  const data = uPlot.join(curves.map((c) => [c.steps, c.values]));
  const series = [{ label: "step" }, ...curves.map((c, i) => ({ label: c.label, stroke: color(i), width: 2,
                                                                spanGaps: true }))];
  const target = h("div");
  el.append(target);
  el.uplot = new uPlot({ width, height, series, scales: { x: { time: false } },
                         axes: [{ label: "step" }, { label: ylabel, size: 60 }] }, data, target);
  return el;
}

// points: [{x, y, job_id}]; x may be numbers or categories (strings/booleans: drawn at 0, 1, 2 ...).
export function scatterChart(name, title, points, { width = 320, height = 220, xlabel = "", ylabel = "" } = {}) {
  const el = box(name, title);
  if (!points.length) { el.append(h("p", { class: "muted" }, "no finished runs")); return el; }
  const numeric = points.every((p) => typeof p.x === "number");
  const categories = numeric ? null : [...new Set(points.map((p) => fmt(p.x)))].sort();
  const xOf = (p) => (numeric ? p.x : categories.indexOf(fmt(p.x)));
  const sorted = [...points].sort((a, b) => xOf(a) - xOf(b));
  const data = [sorted.map(xOf), sorted.map((p) => p.y)];
  el.jobIds = sorted.map((p) => p.job_id);
  const xAxis = { label: xlabel };
  if (!numeric) { xAxis.values = (_u, ticks) => ticks.map((t) => (Number.isInteger(t) ? categories[t] ?? "" : "")); }
  const target = h("div");
  el.append(target);
  el.uplot = new uPlot({
    width, height, scales: { x: { time: false, range: (_u, lo, hi) => [lo - 0.5, hi + 0.5] } },
    series: [{ label: xlabel }, { label: ylabel, stroke: color(0), fill: color(0), paths: () => null,
                                  points: { show: true, size: 7 } }],
    axes: [xAxis, { label: ylabel, size: 60 }], legend: { show: false },
  }, data, target);
  return el;
}

// rows: [{job_id, config, value}]; one axis per key, the objective last; a line per job.
export function parallelCoordinates(name, title, keys, rows, metric) {
  const el = box(name, title);
  if (!rows.length || !keys.length) { el.append(h("p", { class: "muted" }, "no finished runs")); return el; }
  const axes = [...keys, metric];
  const width = Math.max(360, 140 * axes.length), height = 260, top = 24, bottom = 30, left = 50;
  const step = (width - 2 * left) / Math.max(1, axes.length - 1);
  const valueOf = (row, key) => (key === metric ? row.value : row.config[key]);
  const scale = axes.map((key) => {
    const values = rows.map((r) => valueOf(r, key));
    if (values.every((v) => typeof v === "number")) {
      const lo = Math.min(...values), hi = Math.max(...values);
      return { pos: (v) => (hi === lo ? 0.5 : (v - lo) / (hi - lo)), ticks: [[lo, 0], [hi, 1]] };
    }
    const cats = [...new Set(values.map(fmt))].sort();
    const pos = (v) => (cats.length === 1 ? 0.5 : cats.indexOf(fmt(v)) / (cats.length - 1));
    return { pos, ticks: cats.map((c) => [c, cats.length === 1 ? 0.5 : cats.indexOf(c) / (cats.length - 1)]) };
  });
  const y = (frac) => top + (1 - frac) * (height - top - bottom);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const add = (parent, tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    parent.append(node);
    return node;
  };
  svg.setAttribute("class", "parallel");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const best = Math.min(...rows.map((r) => r.value)), worst = Math.max(...rows.map((r) => r.value));
  rows.forEach((row) => {
    const pts = axes.map((key, i) => `${left + i * step},${y(scale[i].pos(valueOf(row, key)))}`);
    const shade = worst === best ? 0 : (row.value - best) / (worst - best);
    add(svg, "polyline", { points: pts.join(" "), stroke: `hsl(${Math.round(120 * (1 - shade))},60%,40%)`,
                           "data-job": row.job_id, "data-value": row.value });
  });
  axes.forEach((key, i) => {
    const x = left + i * step;
    add(svg, "line", { x1: x, x2: x, y1: y(0), y2: y(1), stroke: "#444" });
    add(svg, "text", { x, y: 14, "text-anchor": "middle", "font-weight": "bold" }, key);
    scale[i].ticks.forEach(([tick, frac]) => add(svg, "text", { x: x + 4, y: y(frac) + 4 }, fmt(tick)));
  });
  el.append(svg);
  return el;
}
