"""An ASGI hello app whose every worker also prints BENCH_PRINT_RATE lines a second
(80 bytes each, in batches every 10 ms) from a thread, for the primary's CPU figure."""

import os
import threading
import time

from bench.apps.hello_asgi import app  # noqa: F401  (the app served)


def _print_forever(rate: int) -> None:
    batch = max(1, rate // 100)
    line = "x" * 60
    count = 0
    next_at = time.monotonic()
    while True:
        for _ in range(batch):
            print(f"line {count:010d} {line}")
            count += 1
        next_at += batch / rate
        time.sleep(max(0.0, next_at - time.monotonic()))


if os.environ.get("BENCH_PRINT_RATE"):
    threading.Thread(target=_print_forever, args=(int(os.environ["BENCH_PRINT_RATE"]),),
                     daemon=True).start()
