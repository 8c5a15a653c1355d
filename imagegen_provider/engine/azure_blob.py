"""Uploads to Azure Blob Storage as one Put Blob request each, over one aiohttp session per run.

Why not through adlfs and the Azure SDK, as every other call to the store is: measured on Azurite (issue 14,
``bench/results/storage/``), the SDK's ``upload_blob`` costs 0.8–1.0 ms of client CPU per upload (a ``BlobClient``
and its generated client built per call, a dozen pipeline policies, request serialisation); the same upload as a
plain PUT costs 0.25–0.35 ms. At zero gateway latency that difference is what held images/s to the emulator near
0.55× a local folder. Nothing of the protocol's security is written here: the request is the documented Put Blob
REST call, signed by the SDK's own shared-key policy (the credential adlfs built from the account key or the
connection string), or authorised by the SAS the user gave. Credentials with neither (Entra ID tokens, anonymous
access) keep the SDK path (:func:`blob_uploads_for` returns ``None``).

No secret appears in an error or a log line: errors name the blob, the HTTP status and the store's error code,
and every text taken from an answer or an exception is redacted of the SAS, its signature and the account key.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import mimetypes
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

import aiohttp
import yarl
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from imagegen_provider.wire.errors import excerpt

#: Bounds of one attempt: connecting; silence while waiting for the answer; the whole attempt, which grows with
#: the body at a floor of 1 MiB/s (64 MiB, the largest image a run accepts, gets 64 s more).
CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 60.0
ATTEMPT_BASE_S = 60.0
ATTEMPT_BYTES_PER_S = 1 << 20
#: Attempts per upload, and the cap of the randomised exponential wait between them: an upload gives up after
#: 4 attempts, at most 4 × its attempt bound + 3 × 8 s.
ATTEMPTS = 4
RETRY_WAIT_MAX_S = 8.0
#: What Azure answers for a request worth sending again (timeout, throttling, server trouble).
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: Bytes of an error answer read for its message.
ERROR_BODY_BYTES = 8192
_MESSAGE = re.compile(rb"<Message>(.*?)</Message>", re.S)


class BlobUploadError(OSError):
    """An upload the store refused, or could not be reached for. Its text names the blob, never the SAS.

    :param retryable: sending the same request again may succeed.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


#: Authorises a request in place: adds headers (``Authorization``) or returns the URL with a SAS query.
Authorize = Callable[[str, dict[str, str]], str]


def _shared_key(credential: Any) -> Authorize:
    """Requests signed by the SDK's shared-key policy (``credential`` is the ``SharedKeyCredentialPolicy`` that
    the SDK's client holds): the signature covers the method, the standard and ``x-ms-*`` headers and the path,
    computed by the SDK exactly as for its own requests."""
    from azure.core.pipeline import PipelineContext, PipelineRequest
    from azure.core.rest import HttpRequest

    def authorize(url: str, headers: dict[str, str]) -> str:
        headers["x-ms-date"] = email.utils.formatdate(usegmt=True)
        request = HttpRequest("PUT", url, headers=headers)
        credential.on_request(PipelineRequest(request, PipelineContext(None)))
        headers["Authorization"] = request.headers["Authorization"]
        return url

    return authorize


def _sas(query: str) -> Authorize:
    return lambda url, headers: f"{url}?{query}"


class BlobUploads:
    """Put Blob for one storage account.

    :param endpoint: the account's blob endpoint (``https://<account>.blob.core.windows.net/``, or an emulator's
        ``http://127.0.0.1:10000/devstoreaccount1/``), without a query.
    :param api_version: the ``x-ms-version`` the SDK speaks.
    :param authorize: signs each attempt (a shared-key signature is dated, so a retry is signed anew).
    :param secrets: what must never appear in an error text (the SAS, its signature, the account key).
    :param trust_env: take proxies and netrc from the environment, as the SDK's session would.
    """

    def __init__(
        self, *, endpoint: str, api_version: str, authorize: Authorize, secrets: tuple[str, ...], trust_env: bool,
    ) -> None:
        self.endpoint = endpoint if endpoint.endswith("/") else endpoint + "/"
        self.api_version = api_version
        self._authorize = authorize
        self._secrets = secrets
        self._trust_env = trust_env
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    async def put(self, path: str, data: bytes) -> None:
        """Upload ``data`` as the whole blob at ``path`` (``container/name``), replacing any blob there.

        The body's MD5 goes with it, so the store refuses a body changed on the way instead of keeping it.

        :raises BlobUploadError: refused, or still failing after :data:`ATTEMPTS` attempts.
        """
        container, _, blob = path.partition("/")
        if not container or not blob:
            raise BlobUploadError(f"Put Blob {path!r}: not a container/blob path", retryable=False)
        headers = {
            "x-ms-blob-type": "BlockBlob",
            "x-ms-version": self.api_version,
            # What adlfs marks every blob it writes with: listings treat the blob as a file either way.
            "x-ms-meta-is_directory": "false",
            "Content-Type": mimetypes.guess_type(blob)[0] or "application/octet-stream",
            "Content-MD5": base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii"),
            "Content-Length": str(len(data)),
        }
        url = f"{self.endpoint}{urllib.parse.quote(container)}/{urllib.parse.quote(blob)}"
        retrying = AsyncRetrying(
            stop=stop_after_attempt(ATTEMPTS), wait=wait_random_exponential(multiplier=0.25, max=RETRY_WAIT_MAX_S),
            retry=retry_if_exception(lambda exc: isinstance(exc, BlobUploadError) and exc.retryable), reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._put_once(path, url, data, dict(headers))

    async def _put_once(self, path: str, url: str, data: bytes, headers: dict[str, str]) -> None:
        timeout = aiohttp.ClientTimeout(
            total=ATTEMPT_BASE_S + len(data) / ATTEMPT_BYTES_PER_S, sock_connect=CONNECT_TIMEOUT_S,
            sock_read=READ_TIMEOUT_S,
        )
        try:
            # Sent exactly as signed: yarl would otherwise re-quote the path, and no redirect is followed (Azure
            # never redirects a Put Blob; following one would send the body and its authorisation elsewhere).
            target = yarl.URL(self._authorize(url, headers), encoded=True)
            async with self._session_now().put(
                target, data=data, headers=headers, timeout=timeout, allow_redirects=False
            ) as answer:
                if answer.status == 201:
                    return
                body = await answer.content.read(ERROR_BODY_BYTES)
                raise self._refused(path, answer.status, answer.headers.get("x-ms-error-code", ""), body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Not chained (``from None``): aiohttp's errors carry the request URL, SAS included.
            detail = excerpt(str(exc), self._secrets)
            raise BlobUploadError(
                f"Put Blob {path}: {type(exc).__name__}{': ' + detail if detail else ''}", retryable=True
            ) from None

    def _refused(self, path: str, status: int, code: str, body: bytes) -> BlobUploadError:
        found = _MESSAGE.search(body)
        message = found.group(1).decode("utf-8", "replace").splitlines()[0] if found else ""
        text = excerpt(f"{code} {message}".strip(), self._secrets)
        return BlobUploadError(
            f"Put Blob {path}: HTTP {status}{' ' + text if text else ''}", retryable=status in TRANSIENT_STATUSES
        )

    def _session_now(self) -> aiohttp.ClientSession:
        # One session per event loop: a session is bound to the loop it was opened on.
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or session.closed or self._session_loop is not loop:
            session = self._session = aiohttp.ClientSession(
                trust_env=self._trust_env, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
            )
            self._session_loop = loop
        return session

    async def aclose(self) -> None:
        """Close the session (a later upload opens a new one)."""
        session, self._session = self._session, None
        if session is not None and not session.closed and self._session_loop is asyncio.get_running_loop():
            await session.close()


def _secrets_of(sas: str) -> tuple[str, ...]:
    """A SAS and its signature, as given and decoded (an error text may quote either)."""
    signature = urllib.parse.parse_qs(sas).get("sig", [""])[0]
    return (sas, signature, urllib.parse.quote(signature, safe=""))


def blob_uploads_for(fs: Any, *, trust_env: bool) -> BlobUploads | None:
    """Put Blob uploads for an adlfs filesystem whose credential is an account key or a SAS; ``None`` for any
    other credential (its uploads stay with the SDK)."""
    service_client = getattr(fs, "service_client", None)
    if service_client is None:
        return None
    parts = urllib.parse.urlsplit(str(service_client.url))
    endpoint = urllib.parse.urlunsplit(parts._replace(query="", fragment=""))
    credential = getattr(service_client, "credential", None)
    key = getattr(credential, "account_key", None)
    if "sig=" in parts.query:
        authorize, secrets = _sas(parts.query), _secrets_of(parts.query)
    elif isinstance(key, str) and key and callable(getattr(credential, "on_request", None)):
        authorize, secrets = _shared_key(credential), (key,)
    else:
        return None
    return BlobUploads(
        endpoint=endpoint, api_version=str(service_client.api_version), authorize=authorize, secrets=secrets,
        trust_env=trust_env,
    )
