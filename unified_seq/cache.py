"""Where unified_seq keeps what it generates: $UNIFIED_SEQ_CACHE, else ~/.cache/unified_seq.

The embedded synthetic data set and caption tokenizers trained at run time
live here, never in a user's data folder (which may be read-only).
"""

from __future__ import annotations

import os


def cache_dir(*parts: str) -> str:
    """A path under the cache root (not created)."""
    root = os.environ.get("UNIFIED_SEQ_CACHE") or os.path.join("~", ".cache", "unified_seq")
    return os.path.join(os.path.expanduser(root), *parts)
