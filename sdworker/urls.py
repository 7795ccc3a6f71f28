"""The one guard for every URL a request names: input images, masks, webhooks and LoRAs.

A URL passes when it is http(s) and its host resolves to a public unicast address. The connection then goes to
that very address (requests-hardened pins it), so a DNS answer that changes between the check and the connection
cannot swap in another, and every redirect is checked the same way. Loopback, private, link-local, unique-local,
shared (100.64/10), multicast, reserved and unspecified ranges are refused, IPv4 and IPv6, however the address
is spelled (`2130706433`, `0x7f000001`, `0177.0.0.1`, `[::ffff:127.0.0.1]` all resolve to 127.0.0.1 first). An IPv6
address that carries an IPv4 one (compatible, mapped, translated, 6to4, NAT64, Teredo) passes only when the IPv4
address it carries is public.

One error for every way a fetch can fail, refused or unreachable alike, naming the field and never the URL: a
caller learns nothing of what answers inside the network. `ALLOW_PRIVATE_URLS` lifts the rule (self-hosted use,
tests); `ALLOWED_URL_HOSTS` lets named hosts through whatever they resolve to. The guarded session connects
directly: HTTP(S)_PROXY from the environment would bypass the check, so it is not used.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests_hardened.ip_filter import InvalidIPAddress, filter_host
from requests_hardened.ip_filter_adapter import IPFilterAdapter

from .config import Settings
from .errors import WorkerError

MAX_REDIRECTS = 5


# IPv6 prefixes whose last 32 bits are an IPv4 address, which the host may route to: IPv4-compatible (::/96,
# deprecated), IPv4-mapped, IPv4-translated (RFC 2765) and NAT64's well-known prefix (RFC 6052). 6to4 and Teredo
# carry theirs elsewhere (ipaddress reads both). NAT64's local-use prefix (RFC 8215) is never public.
_EMBEDDING = tuple(map(ipaddress.IPv6Network, ("::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96")))
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (6to4's, Teredo's server and client, the last 32 bits of the
    compatible, mapped, translated and NAT64 forms), empty for a plain IPv6 address."""
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    if any(address in prefix for prefix in _EMBEDDING):
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def _refuse_unless_global(host: str) -> None:
    """requests-hardened refuses private and loopback ranges; also refuse whatever else is not globally routable,
    and an IPv6 address that embeds an IPv4 one unless each embedded address is public."""
    address = ipaddress.ip_address(host.strip("[]"))
    checked: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL:
            raise InvalidIPAddress(address)
        checked = [*embedded_ipv4(address)] or checked
    if any(not one.is_global or one.is_multicast for one in checked):
        raise InvalidIPAddress(address)


class GuardedAdapter(IPFilterAdapter):
    """Connects only to public addresses, except to the hosts named in ALLOWED_URL_HOSTS."""

    def __init__(self, https: bool, allowed_hosts: frozenset[str]) -> None:
        super().__init__(is_https_proto=https, allow_loopback=False)
        self.allowed_hosts = allowed_hosts

    def build_connection_pool_key_attributes(self, request: requests.PreparedRequest, verify: Any, cert: Any = None):
        """Where the connection goes: the resolved, checked address (or the named host, when allowed)."""
        if (urlsplit(request.url).hostname or "").lower() in self.allowed_hosts:
            return HTTPAdapter.build_connection_pool_key_attributes(self, request, verify, cert)
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        _refuse_unless_global(host_params["host"])
        return host_params, pool_kwargs


def _socket_of(response: requests.Response | None) -> socket.socket | None:
    """The socket a streamed response reads from: urllib3's connection holds it until http.client hands it to
    the response's file object (`SocketIO._sock`, stable since Python 3.2)."""
    raw = getattr(response, "raw", None)
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is None:
        sock = getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """ALLOWED_URL_HOSTS as a set of lower-case host names."""
    return frozenset(host.strip().lower() for host in (settings.allowed_url_hosts or "").split(",") if host.strip())


def session(settings: Settings) -> requests.Session:
    """A requests session whose every connection, redirects included, goes through the guard."""
    guarded = requests.Session()
    guarded.max_redirects = MAX_REDIRECTS
    if not settings.allow_private_urls:
        guarded.trust_env = False  # a proxy from the environment would connect for us, unchecked
        hosts = allowed_hosts(settings)
        guarded.mount("http://", GuardedAdapter(False, hosts))
        guarded.mount("https://", GuardedAdapter(True, hosts))
    return guarded


def check_url(url: str, field: str, settings: Settings) -> None:
    """Refuse `url` now unless it is http(s) and names a public host (or one allowed): for URLs used later, such
    as webhooks. The same guard applies again when the URL is used, since DNS may answer otherwise by then."""
    refused = WorkerError("INVALID_URL", f"{field} must be an http(s) URL of a public host", field)
    try:
        parts = urlsplit(url)
    except ValueError:  # "http://[" and the like
        raise refused from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise refused
    if settings.allow_private_urls or parts.hostname.lower() in allowed_hosts(settings):
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        _refuse_unless_global(filter_host(parts.hostname, port, allow_loopback=False))
    except (requests.RequestException, OSError, ValueError):
        raise refused from None


def fetch(
    url: str,
    field: str,
    settings: Settings,
    limit: int,
    code: str,
    check: Callable[[], None] | None = None,
    timeout: float | None = None,
) -> bytes:
    """GET `url` through the guard, all of it within `timeout` (default IMAGE_FETCH_TIMEOUT) seconds and `limit`
    bytes.

    `check` is called while the fetch runs (every 0.25 s) and may raise to end it, as a job's cancellation or
    execution timeout does. Every failure is the same WorkerError `code`, naming `field`.
    """
    timeout = timeout or settings.image_fetch_timeout
    failed = WorkerError(
        code, f"{field}: could not fetch the URL (a public http(s) URL answering 200 within {timeout:g} s)", field
    )
    try:
        if urlsplit(url).scheme not in ("http", "https"):
            raise failed
    except ValueError:  # not a URL at all ("http://[")
        raise failed from None
    deadline = time.monotonic() + timeout
    reason: list[BaseException] = []
    done = threading.Event()
    response: requests.Response | None = None

    def watch() -> None:
        """End the fetch at its deadline or when `check` raises, by shutting its socket, which ends a blocked
        read. Before the answer's headers there is no socket to shut: the read timeout bounds that part."""
        while not done.wait(min(0.25, max(0.01, deadline - time.monotonic()))):
            if not reason:
                try:
                    if check is not None:
                        check()
                    if time.monotonic() >= deadline:
                        raise failed
                except BaseException as err:
                    reason.append(err)
            sock = _socket_of(response)
            if reason and sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                return

    watcher = threading.Thread(target=watch, name="fetch-deadline", daemon=True)
    watcher.start()
    try:
        with session(settings) as guarded:
            response = guarded.get(url, stream=True, timeout=(min(timeout, 10.0), timeout))
            with response:
                if response.status_code != 200:
                    raise failed
                data = bytearray()
                for chunk in response.iter_content(64 * 1024):
                    data += chunk
                    if len(data) > limit:
                        too_big = "INVALID_IMAGE" if code == "IMAGE_FETCH_FAILED" else code
                        raise WorkerError(too_big, f"{field} is larger than the {limit} byte limit", field)
                    if reason:
                        break
        if reason:
            raise reason[0]
        return bytes(data)
    except WorkerError as err:
        raise (reason[0] if reason else err) from None
    except (requests.RequestException, OSError, ValueError):  # refused, unreachable, cut off: all alike
        raise (reason[0] if reason else failed) from None
    finally:
        done.set()
