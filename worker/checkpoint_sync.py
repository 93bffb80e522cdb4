"""The agent's side of checkpoint stores: record pointers, and for hf:// stores upload in the background.

The job's child always writes checkpoints to the local store first. For a `local` store the agent records
that pointer (worker/pointers.py: from a thread of its own, newest first, retried through API outages).
For an `hf://` store the file joins the store's Uploader, which commits every
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
from common.checkpoints import LocalStore, StoreOptions, pin_checkpoints
from common.store_uri import job_folder, normalize_hf_uri
from worker.pointers import PointerRecorder

log = logging.getLogger("gridfleet.worker")
CLOSE_WAIT_SECONDS = 300.0  # an exiting agent waits this long for the server to take its last pointers


class CheckpointSync:
    def __init__(self, client, options: StoreOptions, local_root: Path, name: str = "worker"):
        self.client = client
        # Journals per agent name: agents sharing a directory (`gridfleet run --workers N`) keep theirs apart.
        self.journals = local_root / ".uploads" / re.sub(r"[^A-Za-z0-9._-]", "_", name)
        self.options = options
        self.local = LocalStore(local_root)
        self.worker_secret: str | None = None  # set by the agent once registered (None in embedded mode)
        self.pointers = PointerRecorder(client)  # the agent sets its on_stale
        self.pointers.on_sending, self.pointers.on_recorded = self._pin_sending, self._pin_recorded
        self._recorded: dict[int, dict[str, Any]] = {}  # job id -> the local pointer last recorded on it
        self._uploaders: dict[str, Any] = {}  # hf:// store URI -> running Uploader

    @property
    def worker_id(self) -> str | None:
        return self.pointers.worker_id

    @worker_id.setter
    def worker_id(self, value: str | None) -> None:  # set by the agent once registered
        self.pointers.worker_id = value

    def _pin_sending(self, job_id: int, pointer: dict[str, Any]) -> bool:
        """The child prunes old checkpoints: keep the recorded one and the one on its way (worker/pointers.py).
        False when the child pruned this one already (it saved newer ones since: those follow)."""
        if not pointer["uri"].startswith("local:"):
            return True
        recorded = self._recorded.get(job_id)
        pin_checkpoints([pointer] + ([recorded] if recorded else []))
        return Path(pointer["uri"][len("local:"):]).exists()

    def _pin_recorded(self, job_id: int, pointer: dict[str, Any]) -> None:
        if pointer["uri"].startswith("local:"):
            self._recorded[job_id] = pointer
            pin_checkpoints([pointer])

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
        """An uploaded checkpoint's pointer goes on its job (fenced by the attempt and worker that wrote it: an
        earlier agent's, for an upload it left pending when it was killed)."""
        self.pointers.record(meta["job_id"], meta["attempt_id"], pointer,
                             worker_id=meta.get("worker_id"), worker_secret=meta.get("worker_secret"))

    def job_started(self, job: dict[str, Any]) -> None:
        path = job_files.write_config(self._job_dir(job), job)
        if (uploader := self._uploader(job)) is not None:
            uploader.add_file(self._in_repo(job, path), path)

    def checkpoint_saved(self, job: dict[str, Any], local_pointer: dict[str, Any]) -> dict[str, Any]:
        """Called when the child wrote a checkpoint; never waits on the server. A refusal (the attempt is
        stale) reaches `pointers.on_stale` later."""
        uploader = self._uploader(job)
        if uploader is None:
            self.pointers.record(job["id"], job["attempt_id"], local_pointer)
            return {"ok": True}
        uploader.add_checkpoint(job["grid_id"], job["id"], local_pointer,
                                meta={"job_id": job["id"], "attempt_id": job["attempt_id"],
                                      "worker_id": self.worker_id, "worker_secret": self.worker_secret})
        return {"ok": True}

    def job_finished(self, job: dict[str, Any], outcome: str, result: dict[str, Any] | None,
                     step: int | None) -> None:
        """Before the agent reports the outcome: write the result files; upload now when the job goes back
        to the queue (so its next attempt finds the newest checkpoint); then wait until the attempt's newest
        pointer is recorded (through an API outage too: the agent holds the outcome until then)."""
        uploader = self._uploader(job)
        if outcome == "succeeded":
            paths = job_files.write_result(self._job_dir(job), job, result or {}, step)
            if uploader is not None:  # with the next batch: a finished job needs no commit of its own
                for path in paths:
                    uploader.add_file(self._in_repo(job, path), path)
        elif outcome in ("preempted", "error") and uploader is not None and uploader.pending():
            self._flush(uploader)
        self.wait_recorded(job)

    def wait_recorded(self, job: dict[str, Any]) -> None:
        self.pointers.wait(job["id"], job["attempt_id"])

    def job_stale(self, job: dict[str, Any]) -> None:
        """Someone else owns the job now: record none of this attempt's pending pointers."""
        self.pointers.drop(job["id"], job["attempt_id"])

    def close(self) -> None:
        """Upload what is pending (results of finished jobs) before the agent exits."""
        for uploader in self._uploaders.values():
            uploader.stop(flush=False)
            self._flush(uploader)
        self.pointers.close(timeout=CLOSE_WAIT_SECONDS)

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
