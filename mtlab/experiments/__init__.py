"""Studies that notebooks, benchmarks and `make report` share: each returns a DataFrame that records its config."""
