"""One module per pipeline stage, each with `run(cfg, tracker) -> dict`, read top to bottom."""
