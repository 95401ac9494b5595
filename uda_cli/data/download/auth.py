"""Logins (Cityscapes): a form POST, credentials from the environment. The password goes
only into the POST body: never into a URL, a message, a log line or an exception."""

from __future__ import annotations

import http.client
import http.cookiejar
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING

from uda_cli.data.download import transfer
from uda_cli.data.download.common import _describe, _say
from uda_cli.data.download.transfer import USER_AGENT
from uda_cli.data.download.types import Credentials, LoginForm
from uda_cli.errors import DownloadError

if TYPE_CHECKING:
    from rich.console import Console


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Leaves a redirect unfollowed, so that the login POST's 302 (success) can be seen."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        return None


def credentials_from_env(form: LoginForm, environ: dict[str, str] | None = None) -> Credentials | None:
    env = os.environ if environ is None else environ
    user, password = env.get(form.user_env, ""), env.get(form.password_env, "")
    return Credentials(user, password) if user and password else None


def login(form: LoginForm, credentials: Credentials, console: Console | None = None):
    """Log in with a form POST; return a urllib opener that carries the session's cookies.

    Raises a one-line :class:`DownloadError` on failure. The password goes only into the POST
    body: no message here or below can contain it.
    """
    jar = http.cookiejar.CookieJar()
    probe = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect())
    headers = {"User-Agent": USER_AGENT}
    try:  # the form page first: it sets the session cookie the POST must carry
        with transfer._open(urllib.request.Request(form.url, headers=headers), opener=probe) as r:
            r.read()
    except urllib.error.HTTPError as e:
        if e.code not in (301, 302, 303, 307, 308):
            raise DownloadError(f"could not open the {form.site} login page {form.url} (HTTP {e.code})") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise DownloadError(f"could not reach the {form.site} login page {form.url}: {_describe(reason)}") from None

    body = urllib.parse.urlencode(
        {form.user_field: credentials.username, form.password_field: credentials.password, **dict(form.fields)}
    ).encode()
    post = urllib.request.Request(
        form.url, data=body, headers={**headers, "Content-Type": "application/x-www-form-urlencoded"}
    )
    failed = DownloadError(
        f"{form.site} login failed for user {credentials.username}; "
        f"check {form.user_env}/{form.password_env}"
    )
    try:
        with transfer._open(post, opener=probe) as r:
            page = r.read(1 << 20)
        # A 200 is the login page again (failure) unless it has no password field any more.
        if re.search(rb"""type\s*=\s*["']?password""", page, re.IGNORECASE):
            raise failed
    except urllib.error.HTTPError as e:
        if e.code not in (301, 302, 303, 307, 308):  # a redirect is the site's "welcome in"
            raise (failed if e.code in (401, 403) else DownloadError(
                f"{form.site} login at {form.url} answered HTTP {e.code}; try again later")) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise DownloadError(f"could not reach the {form.site} login page {form.url}: {_describe(reason)}") from None
    if console is not None:
        _say(console, f"{form.site}: logged in as {credentials.username}")
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
