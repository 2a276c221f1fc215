"""Media bytes from a request: `data:` URIs, and http(s) URLs fetched only when the operator allows it.

A fetch never reaches this machine's network neighbourhood (SSRF): the host name is resolved once,
every address it resolves to must be public, and the connection goes to that checked address (so a
DNS answer cannot change between the check and the connection). Redirects are followed by hand, each
target checked the same way. Sizes and the total time are bounded (limits.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from typing import Callable
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

from .errors import APIError
from .limits import FETCH_TIMEOUT_S, MAX_REDIRECTS

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# IPv6 ranges that carry an IPv4 address to a translator or stack of unknown reach: refused outright.
_WRAPPING_RANGES = tuple(ipaddress.ip_network(n) for n in (
    "::/96",  # IPv4-compatible (deprecated): ::127.0.0.1
    "::ffff:0:0:0/96",  # IPv4-translated (SIIT): ::ffff:0:7f00:1
    "64:ff9b::/96",  # NAT64 well-known prefix: 64:ff9b::7f00:1 reaches 127.0.0.1 through the translator
    "64:ff9b:1::/48",  # NAT64 local-use prefix
))


def is_public_address(ip: IPAddress) -> bool:
    """Globally routable unicast only: loopback, private, link-local, shared (CGN), reserved,
    multicast and unspecified addresses are refused, as are IPv6 forms that embed an IPv4 (mapped,
    6to4 and Teredo: the embedded IPv4 must be public; IPv4-compatible, IPv4-translated and NAT64:
    always refused)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _WRAPPING_RANGES):
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not is_public_address(embedded):
            return False
    return ip.is_global and not ip.is_multicast


def decode_data_uri(url: str, kind: str, max_bytes: int) -> bytes:
    """`data:[<type>][;base64],<data>` -> bytes. The declared type must be `kind`/* (or absent, or
    application/octet-stream): the content is sniffed by the decoder anyway."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise APIError(f"malformed {kind} data URI: no ',' separates the header from the data")
    params = header.split(";")
    mime = params[0].strip().lower()
    if mime and not (mime.startswith(f"{kind}/") or mime == "application/octet-stream"):
        raise APIError(f"{kind} data URI has media type {mime!r}; expected {kind}/*")
    is_base64 = "base64" in (p.strip().lower() for p in params[1:])
    estimate = len(payload) * 3 // 4 if is_base64 else len(payload)
    if estimate > max_bytes:
        raise APIError(f"{kind} too large: about {estimate} bytes (limit {max_bytes})")
    try:
        data = base64.b64decode(payload, validate=True) if is_base64 else unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as e:
        raise APIError(f"{kind} data URI is not valid base64: {e}") from None
    if not data:
        raise APIError(f"{kind} data URI is empty")
    if len(data) > max_bytes:
        raise APIError(f"{kind} too large: {len(data)} bytes (limit {max_bytes})")
    return data


async def resolve_checked(host: str, port: int, allowed: Callable[[IPAddress], bool]) -> IPAddress:
    """Every address `host` resolves to must be allowed; returns the first."""
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        addresses = [literal]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise APIError(f"cannot resolve media host {host!r}: {e}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise APIError(f"cannot resolve media host {host!r}")
    for ip in addresses:
        if not allowed(ip):
            raise APIError(f"media URL host {host!r} resolves to a non-public address ({ip}); refused")
    return addresses[0]


async def fetch_url(url: str, kind: str, max_bytes: int, allowed: Callable[[IPAddress], bool] = is_public_address,
                    timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """GET an http(s) URL with the SSRF, redirect, size and time limits of this module."""
    import httpx

    try:
        async with asyncio.timeout(timeout):
            async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
                for _ in range(MAX_REDIRECTS + 1):
                    response_or_next = await _get_once(client, url, kind, max_bytes, allowed)
                    if isinstance(response_or_next, bytes):
                        return response_or_next
                    url = response_or_next
                raise APIError(f"{kind} URL redirected more than {MAX_REDIRECTS} times")
    except TimeoutError:
        raise APIError(f"{kind} URL took longer than {timeout:g} s to download") from None
    except httpx.HTTPError as e:
        raise APIError(f"cannot fetch {kind} URL: {type(e).__name__}: {e}") from None


async def _get_once(client, url: str, kind: str, max_bytes: int, allowed) -> bytes | str:
    """The body, or the next URL of a redirect."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise APIError(f"{kind} URL must be http(s) or a data URI, got {url[:64]!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    ip = await resolve_checked(parts.hostname, port, allowed)
    # Connect to the checked address; Host header and TLS name (SNI, certificate check) stay the host's.
    ip_host = f"[{ip}]" if ip.version == 6 else str(ip)
    pinned = parts._replace(netloc=f"{ip_host}:{port}").geturl()
    host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    request = client.build_request("GET", pinned, headers={"Host": host_header},
                                   extensions={"sni_hostname": parts.hostname})
    response = await client.send(request, stream=True)
    try:
        if response.is_redirect:
            location = response.headers.get("location")
            if not location:
                raise APIError(f"{kind} URL answered a redirect without a Location")
            return urljoin(url, location)
        if response.status_code != 200:
            raise APIError(f"cannot fetch {kind} URL: HTTP {response.status_code}")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise APIError(f"{kind} too large: {declared} bytes (limit {max_bytes})")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise APIError(f"{kind} too large: over {max_bytes} bytes")
        if not body:
            raise APIError(f"{kind} URL returned no data")
        return bytes(body)
    finally:
        await response.aclose()


async def load_media(url: str, kind: str, max_bytes: int, allow_remote: bool) -> bytes:
    """The bytes behind an `image_url` / `video_url` (kind "image" / "video")."""
    if url.startswith("data:"):
        return decode_data_uri(url, kind, max_bytes)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise APIError(f"{kind} URL must be a data URI or http(s), got scheme {scheme or '(none)'!r}")
    if not allow_remote:
        raise APIError(f"remote {kind} URLs are disabled on this server (start it with --allow-remote-media); "
                       f"send the {kind} as a base64 data URI instead")
    return await fetch_url(url, kind, max_bytes)
