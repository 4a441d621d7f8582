"""A Flask app for tests/http/test_frameworks.py.

/pid            {"pid": ...}
/form (POST)    the form fields back as JSON
/stream?n=N     N lines streamed by a generator (no length)
/teapot         418 with a custom header
anything else   Flask's own 404"""

from __future__ import annotations

import os

from flask import Flask, Response, jsonify, request

app = Flask(__name__)


@app.get("/pid")
def pid() -> Response:
    return jsonify(pid=os.getpid())


@app.post("/form")
def form() -> Response:
    return jsonify(dict(request.form))


@app.get("/stream")
def stream() -> Response:
    count = int(request.args.get("n", "3"))

    def lines():  # type: ignore[no-untyped-def]
        for i in range(count):
            yield f"line {i}\n"

    return Response(lines(), mimetype="text/plain")


@app.get("/teapot")
def teapot() -> tuple[str, int, dict[str, str]]:
    return "short and stout", 418, {"X-Kind": "teapot"}
