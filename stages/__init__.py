"""One thin module per pipeline stage; each exposes ``run(params) -> summary`` for the CLI, DVC and tests."""
