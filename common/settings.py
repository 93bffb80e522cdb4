"""Every setting gridfleet reads, from the environment or `.env`, in one place.

Code deeper down receives a `Settings` (or plain values) as arguments; nothing else reads os.environ.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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

    # API
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: SecretStr | None = None  # the first admin token; else `serve` makes one and prints it

    # Clients (CLI, workers)
    server_url: str = "http://127.0.0.1:8000"
    token: SecretStr | None = None

    home: Path = DEFAULT_HOME  # local state: SQLite file, checkpoints, run outputs


    @model_validator(mode="after")
    def _default_database_in_home(self):
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home}/gridfleet.db"
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
