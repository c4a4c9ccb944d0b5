"""Microsoft 365: an app-only token from Entra ID (msal), then Microsoft Graph.

The token comes from the OAuth 2.0 client-credentials flow for the tenant;
msal keeps it in its in-memory cache and only asks for a new one when it is
about to expire. Graph is asked for the user by userPrincipalName
(``/users/{address}``), then by mail or any proxyAddresses value
(``$filter``, an advanced query: ConsistencyLevel eventual). A user whose
accountEnabled is false is not a valid recipient.

Graph throttles with 429 (or 503) and Retry-After: the wait is honoured as
long as it fits in the source's timeout; beyond that the answer is
"unavailable" and the gateway answers 4xx, so the sending server retries.

The authority and Graph base URL are settings so a private test stub can
play both; ``ca_file`` then names its CA. (requests, under msal, lets the
REQUESTS_CA_BUNDLE environment variable override ``verify``; the session
built here ignores the environment when a CA file is given.)

AUTH: Microsoft 365 only verifies recipients unless ``password_auth`` is on,
in which case the resource-owner password flow checks the user's password
with Entra ID (tenants with MFA or federation refuse that flow).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import quote

import httpx

from bulwark.policy.verification import M365Source

from .base import Finding, SourceUnavailable, invalid, valid

GRAPH_SCOPE = ["https://graph.microsoft.com/.default"]
DEFAULT_AUTHORITY = "https://login.microsoftonline.com"


class M365Client:
    def __init__(self, source: M365Source):
        self.source = source
        self._app = None
        self._app_lock = asyncio.Lock()
        context = ssl.create_default_context(cafile=str(source.ca_file) if source.ca_file else None)
        self._http = httpx.AsyncClient(
            verify=context, trust_env=source.ca_file is None, timeout=source.timeout_seconds,
        )

    # -- token ----------------------------------------------------------------

    def _build_app(self):
        import msal
        import requests

        session = requests.Session()
        if self.source.ca_file:
            session.trust_env = False
            session.verify = str(self.source.ca_file)
        return msal.ConfidentialClientApplication(
            self.source.client_id,
            client_credential=self.source.client_secret(),
            authority=f"{self.source.authority_host}/{self.source.tenant_id}",
            http_client=session,
            # Instance discovery asks login.microsoftonline.com about the
            # authority: only meaningful (and reachable) for Microsoft's own.
            instance_discovery=self.source.authority_host == DEFAULT_AUTHORITY,
            timeout=self.source.timeout_seconds,
        )

    async def _application(self):
        async with self._app_lock:
            if self._app is None:
                try:
                    self._app = await asyncio.to_thread(self._build_app)
                except LookupError as exc:
                    raise SourceUnavailable(str(exc)) from None
                except Exception as exc:
                    raise SourceUnavailable(
                        f"{self.source.name}: cannot reach the authority ({type(exc).__name__})"
                    ) from None
            return self._app

    async def _token(self) -> str:
        app = await self._application()
        try:
            # msal answers from its cache until the token is about to expire.
            result = await asyncio.to_thread(app.acquire_token_for_client, scopes=GRAPH_SCOPE)
        except Exception as exc:
            raise SourceUnavailable(f"{self.source.name}: token request failed ({type(exc).__name__})") from None
        if "access_token" not in result:
            # error and error_description are the authority's words, not ours.
            raise SourceUnavailable(f"{self.source.name}: no token: {result.get('error', 'unknown error')}")
        return result["access_token"]

    # -- Graph ----------------------------------------------------------------

    async def _get(self, url: str, params: dict | None, headers: dict, deadline: float) -> httpx.Response:
        while True:
            try:
                response = await self._http.get(url, params=params, headers=headers)
            except httpx.HTTPError as exc:
                raise SourceUnavailable(f"{self.source.name}: Graph unreachable ({type(exc).__name__})") from None
            if response.status_code not in (429, 503):
                return response
            try:
                wait = float(response.headers.get("Retry-After", "1"))
            except ValueError:
                wait = 1.0
            if time.monotonic() + wait > deadline:
                raise SourceUnavailable(f"{self.source.name}: Graph throttled us (retry after {wait:g}s)")
            await asyncio.sleep(wait)

    async def verify(self, address: str) -> Finding:
        deadline = time.monotonic() + self.source.timeout_seconds
        headers = {"Authorization": f"Bearer {await self._token()}"}
        select = "id,userPrincipalName,mail,accountEnabled"
        graph = self.source.graph_url
        response = await self._get(f"{graph}/users/{quote(address, safe='@')}", {"$select": select},
                                   headers, deadline)
        if response.status_code == 200:
            return self._judge(response.json(), address)
        if response.status_code != 404:
            raise SourceUnavailable(f"{self.source.name}: Graph answered {response.status_code}")
        literal = address.replace("'", "''")  # an OData string literal
        response = await self._get(
            f"{graph}/users",
            {"$filter": f"mail eq '{literal}' or proxyAddresses/any(p:p eq 'smtp:{literal}')",
             "$select": select, "$count": "true"},
            {**headers, "ConsistencyLevel": "eventual"},
            deadline,
        )
        if response.status_code != 200:
            raise SourceUnavailable(f"{self.source.name}: Graph answered {response.status_code}")
        users = response.json().get("value") or []
        if not users:
            return invalid(f"{self.source.name}: no such user in the tenant")
        return self._judge(users[0], address)

    def _judge(self, user: dict, address: str) -> Finding:
        who = user.get("userPrincipalName") or address
        if user.get("accountEnabled") is False:
            return invalid(f"{self.source.name}: {who} is disabled")
        return valid(f"{self.source.name}: {who}")

    async def authenticate(self, address: str, password: str) -> bool | None:
        if not self.source.password_auth or not password:
            return False
        try:
            app = await self._application()
            result = await asyncio.to_thread(
                app.acquire_token_by_username_password, address, password, scopes=GRAPH_SCOPE
            )
        except SourceUnavailable:
            return None
        except Exception:
            return None
        if "access_token" in result:
            return True
        return False if result.get("error") == "invalid_grant" else None

    async def close(self) -> None:
        await self._http.aclose()
