"""The control plane's use cases, one module per aggregate.

Each module depends only on the ports of ``nkudo.cp.ports`` (transaction runner, certificate authority,
metrics, clock), on ``nkudo.cp.domain`` for every decision that needs no database, and on the schema for its
SQL. None imports the HTTP layer (aiohttp): ``nkudo.cp.http`` decodes a request, calls one use case and
encodes its typed answer. ``nkudo.cp.service.ControlPlane`` wires them together.
"""
