// Grids: one row each with state counts, a progress bar, the best result by the objective, age and the
// workers on it. Polls while the page is shown.
import { age, fmt, get, h } from "./api.js";

const POLL_MS = 2000;
const STATES = ["queued", "running", "succeeded", "failed", "cancelled", "pruned"];

function row(g) {
  const pct = Math.round(100 * g.progress);
  const best = g.best ? h("a", { href: `#/job/${g.best.job_id}` }, `${g.best.metric} ${fmt(g.best.value)}`) : "";
  return h("tr", { "data-grid": g.name },
    h("td", {}, h("a", { href: `#/grid/${encodeURIComponent(g.name)}` }, g.name)),
    h("td", {}, g.trainer), h("td", {}, g.state),
    ...STATES.map((s) => h("td", { class: "num", "data-count": s }, g.counts[s])),
    h("td", { "data-progress": pct }, h("span", { class: "bar" }, h("span", { style: `width:${pct}%` })), ` ${pct}%`,
      g.search ? h("span", { class: "muted", "data-trials": g.search.done }, ` · ${g.search.done}/${g.search.n_trials} trials`) : ""),
    h("td", { "data-best": g.best ? g.best.value : "" }, best),
    h("td", {}, age(g.created_at)),
    h("td", { "data-workers": g.workers.length }, g.workers.map((w) => w.name).join(", ")));
}

export async function show(root, _arg, live) {
  root.append(h("h1", {}, "Grids"));
  const table = h("table", { id: "grids" },
    h("thead", {}, h("tr", {}, ["grid", "trainer", "state", ...STATES, "progress", "best", "age", "workers"]
      .map((c) => h("th", {}, c)))),
    h("tbody"));
  root.append(table);
  while (live()) {
    const { grids } = await get("/dashboard/grids");
    if (!live()) return;
    table.tBodies[0].replaceChildren(...grids.map(row));
    if (!grids.length) table.tBodies[0].append(h("tr", {}, h("td", { colspan: 12, class: "muted" }, "no grids yet")));
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}
