"""The queue: grid expansion, dedup, claim/lease/heartbeat/finish, retry policy."""
