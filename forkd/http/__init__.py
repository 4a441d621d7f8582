"""The worker's HTTP/1.1 server: httptools parsing on a uvloop loop, calling an ASGI
or WSGI application. `protocol` owns connections (limits, timeouts, the RFC 9112
checks, --health-path and --limit-concurrency answers), `asgi` and `wsgi` own one
request/response cycle each, `framing` (pure) frames every response for both,
`proxy` (pure) reads what a trusted proxy says about the client (Forwarded,
X-Forwarded-*, PROXY protocol), `health` holds the shared health flag, `lifespan`
runs the ASGI lifespan protocol, `loader` imports the application."""
