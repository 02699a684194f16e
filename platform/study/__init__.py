"""The study: its plan, the driver on Ray Tune, the result tables and their statistics, summary.json."""
