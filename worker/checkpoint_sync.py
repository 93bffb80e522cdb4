"""The agent's side of checkpoint stores: record pointers, and for hf:// stores upload in the background.

The job's child always writes checkpoints to the local store first. For a `local` store the agent records
that pointer at once. For an `hf://` store the file joins the store's Uploader, which commits every
`upload_interval` seconds from its own thread (training never waits on the Hub); the Hub pointer, with its
commit sha, is recorded once the commit exists. When a job is preempted or fails, its pending files are
uploaded before the job is released, so the next attempt (on any machine) resumes from the newest state.
Each uploader keeps a journal of what is pending under `<local root>/.uploads/`: an agent killed with
kill -9 uploads the rest at its next start on the same machine (`resume_pending`). A pending checkpoint
keeps the worker id and secret of the registration that wrote it (so the journal is readable by its owner
only): a later agent registers anew, and only the writer's registration may record the pointer.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from common import job_files
from common.checkpoints import LocalStore, StoreOptions
from common.store_uri import job_folder, normalize_hf_uri

log = logging.getLogger("gridfleet.worker")


class CheckpointSync:
    def __init__(self, client, options: StoreOptions, local_root: Path, name: str = "worker"):
        self.client = client
        # Journals per agent name: agents sharing a directory (`gridfleet run --workers N`) keep theirs apart.
        self.journals = local_root / ".uploads" / re.sub(r"[^A-Za-z0-9._-]", "_", name)
        self.options = options
        self.local = LocalStore(local_root)
        self.worker_id: str | None = None  # set by the agent once registered
        self.worker_secret: str | None = None  # its secret (None in embedded mode)
        self._uploaders: dict[str, Any] = {}  # hf:// store URI -> running Uploader

    def _uploader(self, job: dict[str, Any]):
        """The Uploader of the job's hf:// store, or None for a local store."""
        uri = self.options.store_for(job)
        return self._uploader_for(uri) if uri.startswith("hf://") else None

    def _uploader_for(self, uri: str):
        key = normalize_hf_uri(uri)  # one uploader per store, whether its branch is written or not
        if key not in self._uploaders:
            from common.hub_store import HubStore, Uploader  # huggingface_hub only where the Hub is used

            store = HubStore(uri, self.local.root, write_token=self.options.hub_write_token,
                             read_token=self.options.hub_read_token, endpoint=self.options.hub_endpoint)
            journal = self.journals / (key[len("hf://"):].replace("/", "--") + ".json")
            self._uploaders[key] = Uploader(store, interval=self.options.upload_interval,
                                            on_uploaded=self._record, journal=journal).start()
        return self._uploaders[key]

    def resume_pending(self) -> int:
        """Take over the uploads an earlier agent on this machine left pending (it was killed)."""
        resumed = 0
        for path in sorted(self.journals.glob("*.json")):
            from common.hub_store import read_journal  # a journal exists only where the Hub was used

            journal = read_journal(path)
            if journal is not None:
                resumed += self._uploader_for(journal["store"]).resume(journal["files"])
        if resumed:
            log.info("%d file(s) an earlier run left pending will be uploaded with the next batch", resumed)
        return resumed

    def _record(self, pointer: dict[str, Any], meta: dict[str, Any]) -> None:
        """An uploaded checkpoint's pointer goes on its job (fenced by the attempt and worker that wrote it)."""
        reply = self.client.set_checkpoint(meta.get("worker_id", self.worker_id), meta["job_id"], meta["attempt_id"],
                                           pointer, worker_secret=meta.get("worker_secret"))
        if not reply["ok"]:  # the attempt ended and was not the one that succeeded: nothing to record
            log.info("job %s: uploaded step %s, not recorded: %s", meta["job_id"], pointer["step"], reply.get("reason"))

    def job_started(self, job: dict[str, Any]) -> None:
        path = job_files.write_config(self._job_dir(job), job)
        if (uploader := self._uploader(job)) is not None:
            uploader.add_file(self._in_repo(job, path), path)

    def checkpoint_saved(self, job: dict[str, Any], local_pointer: dict[str, Any]) -> dict[str, Any]:
        """Called when the child wrote a checkpoint. Returns the fenced reply ({"ok": False} when stale)."""
        uploader = self._uploader(job)
        if uploader is None:
            return self.client.set_checkpoint(self.worker_id, job["id"], job["attempt_id"], local_pointer)
        uploader.add_checkpoint(job["grid_id"], job["id"], local_pointer,
                                meta={"job_id": job["id"], "attempt_id": job["attempt_id"],
                                      "worker_id": self.worker_id, "worker_secret": self.worker_secret})
        return {"ok": True}

    def job_finished(self, job: dict[str, Any], outcome: str, result: dict[str, Any] | None,
                     step: int | None) -> None:
        """Before the agent reports the outcome: write the result files; upload now when the job goes back
        to the queue (so its next attempt finds the newest checkpoint)."""
        uploader = self._uploader(job)
        if outcome == "succeeded":
            paths = job_files.write_result(self._job_dir(job), job, result or {}, step)
            if uploader is not None:  # with the next batch: a finished job needs no commit of its own
                for path in paths:
                    uploader.add_file(self._in_repo(job, path), path)
        elif outcome in ("preempted", "error") and uploader is not None and uploader.pending():
            self._flush(uploader)

    def close(self) -> None:
        """Upload what is pending (results of finished jobs) before the agent exits."""
        for uploader in self._uploaders.values():
            uploader.stop(flush=False)
            self._flush(uploader)

    def _flush(self, uploader) -> None:
        from common.hub_store import HubStoreError

        try:
            uploader.flush()
        except HubStoreError as exc:  # the local copies stay; the next flush (or run) tries again
            log.warning("could not upload pending checkpoints now: %s", exc)

    def _job_dir(self, job: dict[str, Any]) -> Path:
        return self.local.job_dir(job["grid_id"], job["id"])

    def _in_repo(self, job: dict[str, Any], path: Path) -> str:
        return f"{job_folder(job['grid_id'], job['id'])}/{path.name}"
