"""The administrator's web console: HTTPS, server-rendered, on the gateway's certificate.

``bulwark console`` runs it; docs/console.md says what it offers and what is
not built yet.
"""
