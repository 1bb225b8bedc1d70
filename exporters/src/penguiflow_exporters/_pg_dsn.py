"""A Postgres DSN as it may be shown: in log lines and error messages.

:func:`describe_dsn` keeps the scheme, user, hosts, ports and database and drops
the password and the query string (which may carry one); a DSN whose parts cannot
be told apart for sure is not echoed at all.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

__all__ = ["describe_dsn", "several_at_signs"]


def describe_dsn(dsn: str) -> str:
    """The DSN without password or query string (which may carry one).

    A DSN whose parts cannot be told apart for sure says nothing of itself: a
    password with an unencoded ``/``, ``?`` or ``#`` ends the URL's host part early,
    and what follows it (the rest of the password) would be shown as host and path.
    """
    try:
        parts = urlsplit(dsn)
        query_host = parse_qs(parts.query).get("host", [""])[0]
    except ValueError:
        return "<unparseable DSN>"
    if not parts.scheme:
        return "<key=value DSN>"  # libpq keyword form: do not echo it (password=...)
    rest = dsn.partition("://")[2]
    end = min([i for i in map(rest.find, "/?#") if i >= 0], default=len(rest))
    # An @ after the host part, before any query (a / or # in the password), or in
    # the query while the host part has none (a ? in it): the credentials did not end
    # where the URL parser thinks. An @ in a query value is fine otherwise.
    after, _, query = rest[end:].partition("?")
    # In the query, an @ only inside a key=value pair's value (application_name=a@b);
    # one in a pair without = before it is the rest of the netloc (a ? in a password).
    stray = any("@" in pair and "@" in pair.partition("=")[0] for pair in query.split("&"))
    # And an @ in the query while the netloc has none: the netloc was cut at a ? in
    # the password, before its @ ("alice:2024?x=y@db" would show "2024" as a port).
    cut = "@" in query and "@" not in parts.netloc and bool(parts.netloc) and not after
    # Two @ in the netloc: an unencoded @ in the password. The driver splits at the
    # first, the URL parser at the last: the host the message named was not the one
    # the driver tried.
    if "@" in after or stray or cut or parts.netloc.count("@") > 1 \
            or not _ports_ok(parts.netloc.rpartition("@")[2]):
        return "<unparseable DSN>"
    user, _, hosts = parts.netloc.rpartition("@")
    user = user.partition(":")[0]
    hosts = hosts or query_host or "localhost"
    if "," not in hosts and not hosts.startswith("/") and not re.search(r":\d+$", hosts):
        hosts += ":5432"
    return f"{parts.scheme}://{user + '@' if user else ''}{hosts}{parts.path}"


def several_at_signs(dsn: str) -> bool:
    """Whether the host part of the URL ``dsn`` holds more than one ``@`` (an
    unencoded ``@`` in the user name or password): the driver would connect to a host
    made of the rest of the password."""
    try:
        return urlsplit(dsn).netloc.count("@") > 1
    except ValueError:
        return False


def _ports_ok(hosts: str) -> bool:
    """Whether each ``host[:port]`` of ``hosts`` (comma-separated) has a numeric port."""
    for host in hosts.split(","):
        if host.startswith("["):  # [IPv6]:port
            host = host.partition("]")[2]
        if ":" in host and not host.rpartition(":")[2].isdigit():
            return False
    return True
