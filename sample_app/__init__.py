"""forkd's sample app: a small stateless HTTP service, served as ASGI and as WSGI.

Any worker on any host can answer any request, because nothing lives only in one process:
sessions and items sit in Redis when ``REDIS_URL`` is set, else in one SQLite file shared by
every worker on the host. Each worker keeps a small LRU of items in front of that store and
drops an entry as soon as any worker writes it.

    sample_app.asgi:app   the ASGI 3 app (with lifespan)
    sample_app.wsgi:app   the WSGI app (PEP 3333)

Layout: ``core`` decides (routing, validation, responses; no I/O), ``settings`` reads the
environment, ``lru`` is the per-worker cache, ``store`` is the storage interface with its
SQLite (``sqlite_store``) and Redis (``redis_store``, ``redis_async``) implementations,
``asgi`` and ``wsgi`` are the thin shells that do the waiting.

Nothing is opened at import: forkd may import the app in the primary (``--preload``) and fork
afterwards, and a socket or database handle must never be shared across a fork.
"""
