"""The Hugging Face cache and endpoint, without torch (the registry listing uses it)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HF endpoint accepts a TCP connection (a fast probe instead of a long retry loop)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def cached_hub_file(
    repo: str, filenames: tuple[str, ...], revision: str | None = None, repo_type: str = "model"
) -> Path | None:
    """The first of ``filenames`` present in the local HF cache at ``revision`` (None: refs/main)."""
    from huggingface_hub import try_to_load_from_cache

    for name in dict.fromkeys((repo, repo.lower())):  # hub ids are case-insensitive, cache folders not
        for filename in filenames:
            found = try_to_load_from_cache(name, filename, revision=revision, repo_type=repo_type)
            if isinstance(found, str):
                return Path(found)
    return None


def revision_of(path: Path) -> str:
    """The snapshot (commit hash) a cached file belongs to."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else "unknown"
