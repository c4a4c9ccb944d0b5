"""A local stand-in for Entra ID's token endpoint and Microsoft Graph's /users, over HTTPS.

msal refuses http:// authorities, so this speaks TLS with the test CA's
certificate. It serves what msal and Bulwark ask for:

- ``GET /{tenant}/v2.0/.well-known/openid-configuration`` (tenant discovery)
- ``POST /{tenant}/oauth2/v2.0/token``: client credentials (checks the
  client secret) and the resource-owner password grant
- ``GET /v1.0/users/{userPrincipalName}`` and
  ``GET /v1.0/users?$filter=mail eq '...' or proxyAddresses/any(...)``,
  which demand the bearer token it issued

Addresses in ``throttle_once`` get one 429 with Retry-After before the real
answer, as Graph does under load. It counts token requests and Graph calls.
"""

from __future__ import annotations

import json
import re
import secrets
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

USERS = [
    {"id": "1", "userPrincipalName": "grace@m365.example.test", "mail": "grace@m365.example.test",
     "accountEnabled": True, "proxyAddresses": ["SMTP:grace@m365.example.test"]},
    {"id": "2", "userPrincipalName": "henry@m365.example.test", "mail": "henry@m365.example.test",
     "accountEnabled": True, "proxyAddresses": ["SMTP:henry@m365.example.test", "smtp:henry.alias@m365.example.test"]},
    {"id": "3", "userPrincipalName": "ivan@m365.example.test", "mail": "ivan@m365.example.test",
     "accountEnabled": False, "proxyAddresses": ["SMTP:ivan@m365.example.test"]},
    {"id": "4", "userPrincipalName": "judy@m365.example.test", "mail": "judy@m365.example.test",
     "accountEnabled": True, "proxyAddresses": ["SMTP:judy@m365.example.test"]},
]


class M365Stub:
    def __init__(self, cert: Path, key: Path, tenant: str, client_id: str, client_secret: str):
        self.tenant, self.client_id, self.client_secret = tenant, client_id, client_secret
        self.tokens: set[str] = set()
        self.token_requests = 0
        self.graph_requests: list[str] = []
        self.throttle_once: set[str] = {"judy@m365.example.test"}
        self.throttled: list[str] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urlsplit(self.path)
                if url.path.endswith("/.well-known/openid-configuration"):
                    base = f"https://127.0.0.1:{stub.port}/{stub.tenant}"
                    return self._json(200, {
                        "token_endpoint": f"{base}/oauth2/v2.0/token",
                        "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                        "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                        "issuer": f"{base}/v2.0",
                    })
                if url.path.startswith("/v1.0/users"):
                    return stub._graph(self, url)
                self._json(404, {"error": "not found"})

            def do_POST(self):
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length", "0"))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                if url.path != f"/{stub.tenant}/oauth2/v2.0/token":
                    return self._json(404, {"error": "not found"})
                with stub.lock:
                    stub.token_requests += 1
                if form.get("client_id") != stub.client_id or form.get("client_secret") != stub.client_secret:
                    return self._json(401, {"error": "invalid_client"})
                grant = form.get("grant_type")
                if grant == "password":
                    # No user passwords here: the password grant is refused,
                    # as tenants with MFA do.
                    return self._json(400, {"error": "invalid_grant"})
                if grant != "client_credentials":
                    return self._json(400, {"error": "unsupported_grant_type"})
                token = secrets.token_urlsafe(24)
                with stub.lock:
                    stub.tokens.add(token)
                self._json(200, {"token_type": "Bearer", "expires_in": 3600, "ext_expires_in": 3600,
                                 "access_token": token})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _graph(self, request: BaseHTTPRequestHandler, url) -> None:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        with self.lock:
            known = token in self.tokens
            self.graph_requests.append(unquote(url.path) + ("?" + unquote(url.query) if url.query else ""))
        if not known:
            return request._json(401, {"error": {"code": "InvalidAuthenticationToken"}})
        path = unquote(url.path)
        if path.startswith("/v1.0/users/"):
            address = path.removeprefix("/v1.0/users/").lower()
            with self.lock:
                if address in self.throttle_once:
                    self.throttle_once.discard(address)
                    self.throttled.append(address)
                    return request._json(429, {"error": {"code": "TooManyRequests"}}, {"Retry-After": "1"})
            user = next((u for u in USERS if u["userPrincipalName"] == address), None)
            if user is None:
                return request._json(404, {"error": {"code": "Request_ResourceNotFound"}})
            return request._json(200, user)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        match = re.search(r"mail eq '((?:[^']|'')*)'", query.get("$filter", ""))
        if match is None or request.headers.get("ConsistencyLevel") != "eventual":
            return request._json(400, {"error": {"code": "Request_UnsupportedQuery"}})
        address = match.group(1).replace("''", "'").lower()
        found = [u for u in USERS if u["mail"] == address
                 or any(p.lower() == f"smtp:{address}" for p in u["proxyAddresses"])]
        request._json(200, {"value": found})

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
