// Workers: alive or not, GPUs, current job, code revision, and each worker's own events (self-updates,
// rollbacks). Polls while shown.
import { age, fmt, get, h, when } from "./api.js";

const POLL_MS = 3000;

export async function show(root, _arg, live) {
  root.append(h("h1", {}, "Workers"));
  const table = h("table", { id: "workers" });
  const events = h("div", { id: "worker-events" });
  root.append(table, h("h2", {}, "Worker events (self-update, rollback, ...)"), events);
  while (live()) {
    const { workers } = await get("/workers");
    const histories = await Promise.all(workers.map((w) => get(`/workers/${w.id}/events`)));
    if (!live()) return;
    table.replaceChildren(
      h("thead", {}, h("tr", {}, ["worker", "host", "alive", "state", "GPUs", "current job", "code", "last seen"]
        .map((c) => h("th", {}, c)))),
      h("tbody", {}, workers.map((w) => h("tr", { "data-worker": w.name },
        h("td", {}, w.name), h("td", {}, w.host), h("td", { "data-alive": String(w.alive) }, w.alive ? "alive" : "gone"),
        h("td", {}, w.state), h("td", {}, w.gpus.length ? w.gpus.map(fmt).join("; ") : "none"),
        h("td", { "data-job": w.current_job_id ?? "" },
          w.current_job_id ? h("a", { href: `#/job/${w.current_job_id}` }, w.current_job_id) : ""),
        h("td", {}, (w.code_rev || "").slice(0, 12)), h("td", {}, `${age(w.last_seen_at)} ago`)))));
    const rows = workers.flatMap((w, i) => histories[i].events.map((e) => ({ ...e, worker: w.name })))
      .sort((a, b) => b.time - a.time);
    events.replaceChildren(rows.length
      ? h("table", {}, h("tbody", {}, rows.map((e) => h("tr", {}, h("td", {}, when(e.time)), h("td", {}, e.worker),
          h("td", {}, e.kind), h("td", {}, e.message)))))
      : h("p", { class: "muted" }, "none"));
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}
