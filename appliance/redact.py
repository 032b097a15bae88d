"""Masking credentials inside free text: URL user-info and secret query parameters.

Keys named like secrets are masked where they are structured (``appliance.logs``,
the diagnostics bundle's config); this catches what hides *inside* a value:
``http://user:password@host/`` and ``...?apikey=…&token=…``, in log fields,
command output and config text alike. Pure and total: any text in, the same
text with those parts replaced by ``***`` out.
"""

from __future__ import annotations

import re

MASK = "***"
SECRET_PARAMS = (
    "apikey|api_key|api-key|key|token|access_token|auth|authorization|password|passwd|pass|pwd|secret"
    "|signature|sig|credential|credentials|routing_key|session|sessionid"
)
# scheme://user:password@  -> scheme://user:***@   (a bare user@ is kept: it names, it does not prove)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_PARAM = re.compile(rf"(?P<lead>[?&;](?:{SECRET_PARAMS})=)(?P<value>[^&#\s\"']+)", re.IGNORECASE)


def mask_text(text: str) -> str:
    """``text`` with URL passwords and secret query parameter values masked."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _PARAM.sub(lambda m: f"{m['lead']}{MASK}", text)
