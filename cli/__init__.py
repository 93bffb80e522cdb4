"""The `gridfleet` command, the top floor: it may import every other package, and none imports it."""
