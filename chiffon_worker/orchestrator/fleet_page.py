"""The fleet page (``/`` of the orchestrator's metrics port): one HTML file with its CSS
and JavaScript inline, package data at ``chiffon_worker/data/fleet.html``.

The page fetches nothing but ``fleet.json`` beside it (every few seconds, redrawing in
place): no asset comes from the internet, so it works in an offline lab. It writes what
agents send only as text (``textContent``, attribute values), never as HTML. Its
Content-Security-Policy allows exactly its own inline script and style (by their SHA-256)
and requests to its own origin, so even a hostname that slipped into markup could not run.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

#: Where the page lies in the package.
PAGE_RESOURCE = "data/fleet.html"
_NONE = "'none'"
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


@dataclass(frozen=True)
class FleetPage:
    """The page's bytes (UTF-8 HTML) and the Content-Security-Policy to serve it with."""

    body: bytes
    content_security_policy: str


def _source_hash(text: str) -> str:
    """A CSP source expression for an inline element whose content is ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def content_security_policy(html: str) -> str:
    """The policy for ``html``: its inline scripts and styles by hash, fetches to its own
    origin, nothing else (no other script, style, image, font, frame or form target)."""
    sources: dict[str, list[str]] = {"script": [], "style": []}
    for match in _INLINE.finditer(html):
        sources[match.group(1)].append(_source_hash(match.group(2)))
    return ("default-src 'none'; "
            f"script-src {' '.join(sources['script']) or _NONE}; "
            f"style-src {' '.join(sources['style']) or _NONE}; "
            "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


@functools.cache
def fleet_page() -> FleetPage:
    """The page, read from the package once (on first use)."""
    html = resources.files("chiffon_worker").joinpath(PAGE_RESOURCE).read_text("utf-8")
    return FleetPage(html.encode(), content_security_policy(html))
