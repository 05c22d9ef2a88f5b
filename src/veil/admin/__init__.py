"""The admin panel: a small web application and JSON API inside ``veil serve``, on its own
listener (``--admin HOST:PORT``, off by default).

::

    app.py       the aiohttp application, its listener (loopback, or TLS), the JSON API
    auth.py      the admin password (Argon2id), sessions, CSRF, login rate limit, API token
    backend.py   the user store, owned by one worker thread: the tunnel's loop never waits
    pages.py     server-rendered HTML (no external assets), the QR codes as inline SVG
    chart.py     the traffic chart, drawn server-side as inline SVG
    metrics.py   Prometheus ``/metrics``, read from the running server at scrape time
    openapi.yaml the JSON API, as OpenAPI 3.1 (the tests validate responses against it)
    cli.py       ``veil admin passwd`` and ``veil admin token``

Of ``server/`` it imports only :mod:`veil.server.status`, the status the server publishes
(so it can be built around a stand-in); it imports ``manage`` and ``store``, never
``protocol``, ``net`` or ``transport``: user changes go through
:class:`veil.manage.users.UserManager`, as the CLI's do. docs/admin.md describes the security
model.
"""
