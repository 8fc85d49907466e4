"""DTask's benchmarks; `python -m bench` runs the side-by-side peer suite (bench/suite)."""
