"""Suite-wide settings.

The tests run tiny models, where torch's intra-op threads cost more than they give, and on a busy
2-core CI machine two threads per process oversubscribe it. One thread keeps the suite fast there.
"""

from __future__ import annotations

try:
    import torch
except ImportError:  # a runtime-only install: the torch tests skip themselves
    torch = None

if torch is not None:
    torch.set_num_threads(1)


def pytest_configure(config) -> None:
    """Certificates are sealed with a per-station key (edgead.certify.certificate): the suite uses
    its own, in a temporary folder, never the user's ~/.config/edgead/station.key."""
    import os
    import tempfile

    if "EDGEAD_STATION_KEY" not in os.environ:
        os.environ["EDGEAD_STATION_KEY"] = os.path.join(tempfile.mkdtemp(prefix="edgead-station-"), "station.key")
