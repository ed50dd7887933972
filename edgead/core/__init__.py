"""The torch-free core: the I/O contract, verdicts, calibration, post-processing, the engine
protocol, the component wiring and the bundle. Everything above it may import it; it imports
nothing of edgead's but itself (checked by import-linter, see pyproject.toml)."""
