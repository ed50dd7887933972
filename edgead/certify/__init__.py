"""Certification on the station: every engine against the reference outputs (parity), and its
speed (latency). Torch-free: the reference comes in as arrays, so a station certifies from the
bundle's golden outputs; live PyTorch is an option that the top-level CLI adds."""
