"""flumeq's web dashboard: ``create_app`` builds the ASGI app, ``serve`` runs it.

Needs the ``web`` extra (starlette, jinja2, uvicorn): ``pip install
'flumeq[web]'``. See ``flumeq.web.app`` for what is served and how the token
and CSRF protection work.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..extras import require

try:
    require("web", "the flumeq dashboard (flumeq.web)")
except ConfigError as error:
    raise ImportError(str(error)) from None

from .app import create_app, serve

__all__ = ["create_app", "serve"]
