"""`relaylab api`: the HTTP API compatible with EmailLabs' v1 (aiohttp, workers like the
tracker). Routes live in one module per area (emails.py, blacklists.py, ...), each adding
its handlers with `routes(app)`; server.py assembles them."""
