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
