// One job: its config and result, metric curves (one per metric), events, the output tail, every attempt
// (worker, commit, outcome, duration) and the checkpoint pointer (a Hub link when it is on the Hub).
import { fmt, get, h, when } from "./api.js";
import { lineChart } from "./charts.js";

const POLL_MS = 2000;

// A Hub pointer (hf://owner/repo/path at commit `revision`) -> that file at that commit on the Hub, or the
// repository's page when the commit is not known; null for any other store.
export function hubLink(uri, revision) {
  const m = /^hf:\/\/([^/]+\/[^/]+)(?:\/(.+))?$/.exec(uri || "");
  if (!m) return null;
  const repo = `https://huggingface.co/${m[1]}`;
  return m[2] && revision ? `${repo}/blob/${encodeURIComponent(revision)}/${m[2]}` : repo;
}

function kv(obj) {
  return h("table", { class: "kv" }, h("tbody", {}, Object.entries(obj || {}).map(([k, v]) =>
    h("tr", { "data-key": k }, h("th", {}, k), h("td", {}, fmt(v))))));
}

export async function show(root, jobId, live) {
  let sig = "";
  while (live()) {
    const [job, { metrics }, { events }, { workers }] = await Promise.all([
      get(`/jobs/${jobId}`), get(`/jobs/${jobId}/metrics`), get(`/jobs/${jobId}/events`), get("/workers")]);
    if (!live()) return;
    const now = JSON.stringify([job, metrics.length, events.length]);
    if (now !== sig) {
      sig = now;
      const names = Object.fromEntries(workers.map((w) => [w.id, w.name]));
      const keys = [...new Set(metrics.flatMap((m) => Object.keys(m)))]
        .filter((k) => !["step", "time", "attempt_id"].includes(k) && metrics.some((m) => typeof m[k] === "number"));
      const output = events.filter((e) => e.kind === "output").map((e) => e.message).join("\n");
      const pointer = job.checkpoint;
      const link = pointer && hubLink(pointer.uri, pointer.revision);
      root.replaceChildren(
        h("h1", {}, `Job ${job.id}`),
        h("p", {}, "grid ", h("a", { href: `#/grid/${encodeURIComponent(job.grid)}` }, job.grid),
          ` · ${job.trainer} · seed ${job.seed} · `, h("span", { id: "job-state", class: `state-${job.state}` }, job.state),
          job.step !== null ? ` · step ${job.step}` : "",
          job.pruned ? h("span", { id: "job-pruned" }, ` · pruned at step ${job.pruned.step}: ${job.pruned.by || ""}`) : ""),
        h("h2", {}, "Config"), kv(job.config),
        h("h2", {}, "Result"), job.result ? kv(job.result) : h("p", { class: "muted" }, "not finished"),
        h("h2", {}, "Metrics"),
        h("div", { class: "charts" }, keys.map((k) => lineChart(`metric:${k}`, k, [{
          label: k, steps: metrics.filter((m) => typeof m[k] === "number").map((m) => m.step),
          values: metrics.filter((m) => typeof m[k] === "number").map((m) => m[k]) }], { width: 420, ylabel: k }))),
        h("h2", {}, "Attempts"),
        h("table", { id: "attempts" },
          h("thead", {}, h("tr", {}, ["attempt", "worker", "commit", "outcome", "started", "duration", "error"]
            .map((c) => h("th", {}, c)))),
          h("tbody", {}, job.attempt_history.map((a) => h("tr", { "data-attempt": a.id },
            h("td", {}, a.id.slice(0, 10)), h("td", {}, names[a.worker_id] || a.worker_id || ""),
            h("td", {}, (a.code_rev || "").slice(0, 12)), h("td", {}, a.outcome), h("td", {}, when(a.started_at)),
            h("td", { class: "num", "data-duration": a.ended_at ? a.ended_at - a.started_at : "" },
              a.ended_at ? `${(a.ended_at - a.started_at).toFixed(1)} s` : "running"),
            h("td", { class: "error" }, a.error ? a.error.trim().split("\n").pop() : ""))))),
        h("h2", {}, "Checkpoint"),
        pointer ? h("p", { id: "checkpoint" }, `step ${fmt(pointer.step)} · ${fmt(pointer.uri)} `,
                    link ? h("a", { href: link, rel: "noreferrer", target: "_blank" }, "on the Hub") : "")
                : h("p", { class: "muted" }, "no checkpoint"),
        h("h2", {}, "Events"),
        h("table", { id: "events" }, h("tbody", {}, events.map((e) => h("tr", {},
          h("td", {}, when(e.time)), h("td", {}, e.kind), h("td", {}, (e.message || "").slice(0, 300)))))),
        h("h2", {}, "Output (tail)"), h("pre", { id: "output" }, output || "(none)"));
    }
    if (["succeeded", "failed", "cancelled", "pruned"].includes(job.state)) return;
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}
