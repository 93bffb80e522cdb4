// One grid: live progress (polls /dashboard/grids/{name}), the results table (sort by clicking a header,
// filter with the boxes under it: `>0.5`, `<=3`, `=true` or any text), loss curves of the selected jobs
// (the best five, or the running ones, until you tick others) with legends naming what differs between them, seed 001's three
// plots, a parallel-coordinates view and a hyper-parameter importance ranking.
import { fmt, get, h } from "./api.js";
import { lineChart, parallelCoordinates, scatterChart } from "./charts.js";

const POLL_MS = 1500;
const TOP = 5;

function metricOf(row, key) {
  return key in row.result ? row.result[key] : row.latest[key];
}

// A pruned job says where it was stopped: `pruned@9 rung 1` (the reason is its tooltip).
function stateText(r) {
  if (r.state !== "pruned" || !r.pruned) return r.state;
  return `pruned@${r.pruned.step}` + (r.pruned.rung !== null && r.pruned.rung !== undefined ? ` rung ${r.pruned.rung}` : "");
}

function columns(view) {
  return [
    { id: "job_id", title: "job", get: (r) => r.job_id },
    { id: "state", title: "state", get: (r) => stateText(r) },
    ...view.swept.map((k) => ({ id: "config." + k, title: k, get: (r) => r.config[k] })),
    ...(view.rows.some((r) => r.seed !== view.rows[0].seed) ? [{ id: "seed", title: "seed", get: (r) => r.seed }] : []),
    // A metric named like a swept key (sleep's `steps`) says it is the result's.
    ...view.metrics.map((k) => ({ id: "metric." + k, title: view.swept.includes(k) ? `${k} (result)` : k,
                                  get: (r) => metricOf(r, k), metric: true })),
    { id: "step", title: "step", get: (r) => r.step },
  ];
}

// `>0.5`, `<=3`, `=true`, or a piece of text the value must contain.
export function matches(value, filter) {
  const f = filter.trim();
  if (!f) return true;
  const m = f.match(/^(<=|>=|<|>|=)\s*(.*)$/);
  if (!m) return fmt(value).toLowerCase().includes(f.toLowerCase());
  const [, op, rhs] = m;
  if (op === "=") return fmt(value) === rhs;
  const a = Number(value), b = Number(rhs);
  if (value === null || value === undefined || Number.isNaN(a) || Number.isNaN(b)) return false;
  return op === "<" ? a < b : op === ">" ? a > b : op === "<=" ? a <= b : a >= b;
}

// What differs between these rows: `state_size=64, use_forget_gate=false`.
export function differs(rows, keys) {
  const varying = keys.filter((k) => new Set(rows.map((r) => fmt(r.config[k]))).size > 1);
  const shown = varying.length ? varying : keys;
  return (r) => shown.map((k) => `${k}=${fmt(r.config[k])}`).join(", ") || `job ${r.job_id}`;
}

function compare(a, b) {
  if (a === b) return 0;
  if (a === undefined || a === null) return 1;
  if (b === undefined || b === null) return -1;
  return typeof a === "number" && typeof b === "number" ? a - b : fmt(a).localeCompare(fmt(b));
}

export async function show(root, name, live) {
  const s = { view: null, sort: null, filters: {}, selected: null, metric: null, threshold: "", sig: "" };
  const head = h("div", { id: "grid-head" });
  const table = h("table", { id: "results" });
  const charts = h("div", { id: "grid-charts" });
  root.append(head, h("h2", {}, "Results"), table, charts);

  const ranked = () => {
    const m = s.view.objective_metric, sign = s.view.direction === "max" ? -1 : 1;
    return s.view.rows.filter((r) => typeof r.result[m] === "number").sort((a, b) => sign * (a.result[m] - b.result[m]));
  };
  // Until the user ticks jobs: the best finished ones, or the running ones while none has finished.
  const selectedIds = () => {
    if (s.selected) return s.selected;
    const best = ranked().slice(0, TOP);
    return (best.length ? best : s.view.rows.filter((r) => r.state === "running").slice(0, TOP)).map((r) => r.job_id);
  };

  function drawHead() {
    const g = s.view.grid, pct = Math.round(100 * g.progress);
    const done = g.counts.succeeded + g.counts.failed + g.counts.cancelled;
    head.replaceChildren(
      h("h1", {}, `Grid ${g.name}`),
      h("p", {}, `trainer ${g.trainer} · objective ${g.objective || "none"} · ${g.state}`),
      h("p", { id: "progress", "data-done": done, "data-total": g.total, "data-progress": pct },
        h("span", { class: "bar" }, h("span", { style: `width:${pct}%` })),
        ` ${pct}% · `, ...Object.entries(g.counts).map(([k, v]) => h("span", { "data-count": k }, `${k} ${v} `))),
      g.best ? h("p", { id: "best" }, "best: ", h("a", { href: `#/job/${g.best.job_id}` }, `job ${g.best.job_id}`),
                 ` ${g.best.metric} = ${fmt(g.best.value)}`) : null,
      g.search ? searchLine(g.search) : null);
  }

  // A grid with `search:` (docs/searches.md): trials done of n_trials, in flight, and the best trial's params.
  function searchLine(q) {
    const best = q.best ? [" · best ", h("a", { href: `#/job/${q.best.job_id}` }, `trial ${q.best.trial}`),
      ` ${q.metric} = ${fmt(q.best.value)} (`,
      Object.entries(q.best.params).map(([k, v]) => `${k}=${fmt(v)}`).join(", "), ")"] : [];
    return h("p", { id: "search", "data-done": q.done, "data-n-trials": q.n_trials, "data-state": q.state },
      `search: ${q.sampler} · ${q.done}/${q.n_trials} trials done · ${q.in_flight} in flight · ${q.direction} ${q.metric}`,
      q.state === "done" ? " · finished" : "", ...best);
  }

  function drawTable() {
    const cols = columns(s.view);
    let rows = s.view.rows.filter((r) => cols.every((c) => matches(c.get(r), s.filters[c.id] || "")));
    if (s.sort) {
      const col = cols.find((c) => c.id === s.sort.id);
      if (col) rows = [...rows].sort((a, b) => s.sort.dir * compare(col.get(a), col.get(b)));
    }
    const chosen = new Set(selectedIds());
    const header = h("tr", {}, h("th", {}, "plot"), ...cols.map((c) => h("th", {
      class: "sortable", "data-col": c.id,
      onclick: () => { s.sort = { id: c.id, dir: s.sort?.id === c.id ? -s.sort.dir : 1 }; drawTable(); },
    }, c.title, s.sort?.id === c.id ? (s.sort.dir > 0 ? " ▲" : " ▼") : "")));
    const filters = h("tr", { class: "filters" }, h("th"), ...cols.map((c) => h("th", {}, h("input", {
      "data-filter": c.id, value: s.filters[c.id] || "", placeholder: "filter",
      // Typing is kept at once (a poll's redraw keeps it); Enter or leaving the box applies it.
      oninput: (e) => { s.filters[c.id] = e.target.value; }, onchange: () => drawTable(),
    }))));
    const body = rows.map((r) => h("tr", { "data-job": r.job_id },
      h("td", {}, h("input", { type: "checkbox", checked: chosen.has(r.job_id), onchange: (e) => {
        const ids = new Set(selectedIds());
        if (e.target.checked) ids.add(r.job_id); else ids.delete(r.job_id);
        s.selected = [...ids];
        drawCharts();
      } })),
      ...cols.map((c) => h("td", { class: typeof c.get(r) === "number" ? "num" : "", "data-col": c.id },
        c.id === "job_id" ? h("a", { href: `#/job/${r.job_id}` }, r.job_id)
          : c.id === "state" ? h("span", { class: `state-${r.state}`, title: r.pruned ? r.pruned.by || "" : "" },
            stateText(r)) : fmt(c.get(r))))));
    table.replaceChildren(h("thead", {}, header, filters), h("tbody", {}, body));
  }

  async function drawCharts() {
    const v = s.view, m = v.objective_metric;
    if (!m) { charts.replaceChildren(h("p", { class: "muted" }, "no metrics reported yet")); return; }
    const metric = s.metric || m;
    const picked = v.rows.filter((r) => selectedIds().includes(r.job_id));
    const name = differs(picked, v.swept);
    const curveData = picked.length
      ? (await get(`/dashboard/curves?jobs=${picked.map((r) => r.job_id).join(",")}&metric=${encodeURIComponent(metric)}`)).curves
      : [];
    if (!live()) return;
    const byId = Object.fromEntries(picked.map((r) => [r.job_id, r]));
    const picker = h("select", { id: "curve-metric", onchange: (e) => { s.metric = e.target.value; drawCharts(); } },
      ...v.metrics.map((k) => h("option", { value: k, selected: k === metric }, k)));
    const threshold = h("input", { id: "threshold", value: s.threshold, placeholder: "e.g. 0.5", size: 8,
      oninput: (e) => { s.threshold = e.target.value; }, onchange: () => drawCharts() });

    const finished = ranked();
    const all = finished.map((r, i) => ({ x: i + 1, y: r.result[m], job_id: r.job_id }));
    const perKey = (rows, tag) => v.swept.map((k) => scatterChart(`${tag}:${k}`, k,
      rows.map((r) => ({ x: r.config[k], y: r.result[m], job_id: r.job_id })), { xlabel: k, ylabel: m }));
    const limit = Number(s.threshold);
    const below = s.threshold.trim() && !Number.isNaN(limit) ? finished.filter((r) => r.result[m] < limit) : null;
    const importance = h("table", { id: "importance" },
      h("thead", {}, h("tr", {}, h("th", {}, "key"), h("th", {}, "importance"))),
      h("tbody", {}, v.importance.map((i) => h("tr", { "data-key": i.key },
        h("td", {}, i.key), h("td", { class: "num" }, i.score === null ? "–" : i.score.toFixed(3))))));

    charts.replaceChildren(
      h("h2", {}, "Curves of the selected jobs ", picker),
      lineChart("curves", `${metric} by step`, curveData.map((c) => ({ ...c, label: name(byId[c.job_id]) })),
                { ylabel: metric }),
      h("h2", {}, `All runs (${m}, best first)`),
      h("div", { class: "charts" }, scatterChart("all-runs", `${m} of every finished run`, all,
                                                   { width: 560, xlabel: "rank", ylabel: m })),
      h("h2", {}, `${m} against each swept key`),
      h("div", { class: "charts" }, perKey(finished, "by-key")),
      h("h2", {}, `Runs with ${m} below `, threshold),
      below ? h("div", { class: "charts", id: "below" }, perKey(below, "below"))
            : h("p", { class: "muted" }, "enter a threshold to see only the runs below it"),
      h("h2", {}, "Parallel coordinates"),
      parallelCoordinates("parallel", `swept keys against ${m}`, v.swept,
                          finished.map((r) => ({ job_id: r.job_id, config: r.config, value: r.result[m] })), m),
      h("h2", {}, "Hyper-parameter importance"),
      importance, h("p", { class: "muted" }, v.importance_method));
  }

  while (live()) {
    const view = await get(`/dashboard/grids/${encodeURIComponent(name)}`);
    if (!live()) return;
    const sig = JSON.stringify(view.rows) + JSON.stringify(view.grid.counts);
    if (sig !== s.sig) {
      s.sig = sig;
      s.view = view;
      drawHead();
      drawTable();
      await drawCharts();
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}
