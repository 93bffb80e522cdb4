"""Settings, database schema and migrations, shared types."""
