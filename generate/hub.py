"""Whether the Hugging Face hub can be used now, decided in seconds.

Without ``HF_HUB_OFFLINE`` the hub client retries a machine without network for about a minute before it
says so (and then blames a missing file); a short connection probe tells the same at once, so a hub id is
then read from the local cache only.
"""

from __future__ import annotations

import os
import socket
import threading

HUB_PROBE_S = 3.0  # how long to wait for a connection to the hub before treating it as offline


def hub_offline() -> str | None:
    """Why the Hugging Face hub cannot be used now (HF_HUB_OFFLINE, or no connection to it within
    ``HUB_PROBE_S``), or None (a proxy is trusted to reach it)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE=1 forbids downloading it"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # reached through a proxy: a direct connection says nothing
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    failure: list[str] = [f"no answer in {HUB_PROBE_S:g} s"]  # unless the probe ends in time

    def probe() -> None:  # in a thread: a name lookup is not bounded by the socket's timeout
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_S).close()
            failure.clear()
        except OSError as err:
            failure[:] = [err.strerror or f"no answer in {HUB_PROBE_S:g} s"]

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_S + 0.5)
    outcome = list(failure)  # one read: a probe ending just now may still change the list
    return f"the hub ({host}) cannot be reached from here ({outcome[0]})" if outcome else None
