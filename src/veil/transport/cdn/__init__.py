"""The CDN carrier: a byte stream between veil's client and server through a CDN or any HTTP
reverse proxy that terminates TLS with its own certificate (docs/cdn.md).

- :mod:`.wire`: sans-IO: the secret path, the request shapes, the packet-up reordering.
- :mod:`.stream`: the asyncio transport both sides hand their protocol (opaque bytes).
- :mod:`.server`: :class:`~.server.CarrierServer`, which the cover site asks about each request.
- :mod:`.client`: :func:`~.client.open_carrier`, through veil's browser-shaped TLS client.
"""
