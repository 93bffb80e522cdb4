"""Every setting gridfleet reads, from the environment or `.env`, in one place.

Code deeper down receives a `Settings` (or plain values) as arguments; nothing else reads os.environ.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.checkpoints import StoreOptions
from common.store_uri import check_store

DEFAULT_HOME = Path(".gridfleet")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GRIDFLEET_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Default: a SQLite file in `home` (so GRIDFLEET_HOME moves the database with the rest).
    database_url: str = Field(default="", validation_alias=AliasChoices("DATABASE_URL", "GRIDFLEET_DATABASE_URL"))
    # Queue timing. A heartbeat every `heartbeat_seconds` keeps a lease of `lease_seconds` alive.
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    # Retry policy: budgets per failure kind (the error budget comes from each grid's max_attempts).
    max_lost: int = 5
    max_preemptions: int = 1000
    backoff_base_seconds: float = 5.0
    backoff_max_seconds: float = 600.0
    # For this long after the API starts, claims do not requeue leases that expired before it started, so
    # workers that could not reach it keep their jobs if they heartbeat again (docs/reliability.md).
    # None: one lease.
    expiry_grace_after_start: float | None = Field(default=None, ge=0.0)
    # The most jobs one gang claim may take (POST /workers/{id}/claim's max_jobs; docs/gang_claims.md).
    max_gang_jobs: int = Field(default=64, ge=1, le=1024)
    # How often the API (and `gridfleet run`) looks at every unfinished search besides after each finish
    # (docs/searches.md); 0: only after finishes and submits.
    search_interval: float = Field(default=2.0, ge=0.0)

    # API
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: SecretStr | None = None  # the first admin token; else `serve` makes one and prints it
    metrics_public: bool = False  # GET /metrics without a token (a scraper on a trusted network); docs/see_results.md

    # Clients (CLI, workers)
    server_url: str = "http://127.0.0.1:8000"
    token: SecretStr | None = None
    # How long a worker keeps retrying a finished job's outcome while the API is unreachable; None: until
    # it answers (the worker holds the result: giving up would lose the work).
    finish_retry_for: float | None = Field(default=None, ge=0.0)

    home: Path = DEFAULT_HOME  # local state: SQLite file, checkpoints, run outputs
    # Workers fork each job's child from a process that has torch and the trainers imported (worker/warm.py).
    # False: every child is spawned and imports them anew (seconds per job).
    warm_starts: bool = True
    # A worker whose trainers train gangs (fused models) claims up to this many jobs of one grid and fuse key
    # at once and trains them in one child (docs/gang_claims.md); 1: one job at a time. Capped by the server's
    # max_gang_jobs and, on a GPU, by the members its free memory holds.
    gang_size: int = Field(default=8, ge=1, le=1024)

    # Checkpoint stores. A grid's `store:` wins; this is the deployment's default ("local" or hf://owner/repo).
    checkpoint_store: str = "local"
    # Hugging Face Hub: read and write tokens apart (seed 002's .env keys accepted); one HF_TOKEN serves both.
    hf_token: SecretStr | None = Field(default=None, validation_alias=AliasChoices("HF_TOKEN", "GRIDFLEET_HF_TOKEN"))
    hf_read_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("GRIDFLEET_HF_READ_TOKEN", "HF_READ_TOKEN", "huggingface_read"))
    hf_write_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("GRIDFLEET_HF_WRITE_TOKEN", "HF_WRITE_TOKEN", "huggingface_write"))
    hub_endpoint: str | None = Field(default=None, validation_alias=AliasChoices("GRIDFLEET_HUB_ENDPOINT", "HF_ENDPOINT"))
    # The Hub takes about 128 commits per hour per repo, shared by every worker writing to it: each worker
    # commits at most once per interval (plus once when a job is preempted), so keep
    # workers x 3600 / interval under ~100. The default suits 8 workers per repo.
    hub_upload_interval: float = Field(default=300.0, ge=1.0)

    # ---- Self-update and pinned code (worker/self_update.py, worker/code_cache.py; docs/self_update.md) ----
    # The git remote workers fetch from: a URL, a path, a remote name, or seed 002's `code_base_link`
    # ("owner/repo" on GitHub). Unset: the checkout's `origin`.
    git_remote: str | None = Field(default=None, validation_alias=AliasChoices(
        "GRIDFLEET_GIT_REMOTE", "code_base_link", "GRIDFLEET_CODE_BASE_LINK"))
    git_ref: str = "HEAD"  # the ref `--self-update` follows; HEAD: the remote's default branch
    self_update: bool = False  # `gridfleet worker --self-update`
    self_update_interval: float = Field(default=60.0, ge=0.0)  # seconds between fetches (only between jobs)

    # ---- Lightning AI studios (`gridfleet studios`, worker/studios.py; docs/studios.md) ----
    # Used for the studios.json entries that leave out apiKey / userID (the SDK's own variable names).
    lightning_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("LIGHTNING_API_KEY", "GRIDFLEET_LIGHTNING_API_KEY"))
    lightning_user_id: str | None = Field(
        default=None, validation_alias=AliasChoices("LIGHTNING_USER_ID", "GRIDFLEET_LIGHTNING_USER_ID"))


    @model_validator(mode="after")
    def _default_database_in_home(self):
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home}/gridfleet.db"
        return self

    @field_validator("checkpoint_store")
    @classmethod
    def _store_known(cls, value: str) -> str:
        return check_store(value)

    def store_options(self) -> StoreOptions:
        return StoreOptions(
            default_store=self.checkpoint_store,
            hub_endpoint=self.hub_endpoint,
            hub_read_token=self.hf_read_token or self.hf_token or self.hf_write_token,
            hub_write_token=self.hf_write_token or self.hf_token,
            upload_interval=self.hub_upload_interval,
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()
