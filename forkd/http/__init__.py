"""The worker's HTTP/1.1 server: httptools parsing on a uvloop loop, calling an ASGI
or WSGI application. `protocol` owns connections, `asgi` and `wsgi` own one
request/response cycle each, `lifespan` runs the ASGI lifespan protocol, `loader`
imports the application."""
