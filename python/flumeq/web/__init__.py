"""flumeq's web dashboard: ``create_app`` builds the ASGI app, ``serve`` runs it.

Needs the ``web`` extras (starlette, jinja2, uvicorn). See ``flumeq.web.app``
for what is served and how the token and CSRF protection work.
"""

from __future__ import annotations

from .app import create_app, serve

__all__ = ["create_app", "serve"]
