"""Logs of a whole pool through one place.

The pieces, each with one job:

* record.py   pure: one log line (`Entry`), its text and JSON renderings
* lines.py    pure: bytes read from a pipe -> whole lines, with a cap on length
* ring.py     pure: the bounded memory of recent lines that `forkd logs` reads
* writer.py   shell: the primary's output (stderr or --log-file): a bounded buffer,
              reopen on SIGUSR1, size-based rotation
* pipes.py    shell: each worker's stdout, stderr and forkd-record pipes, both ends
* hub.py      shell: the primary's side: read the pipes, tag, render, write, remember

A worker never writes to the primary's stderr or log file itself: its stdout and stderr
are pipes the primary reads, and its own forkd lines (the access log among them) go as
ready JSON records through a third pipe. The primary is the only writer, so no two lines
can ever be interleaved, and a rotation or reopen happens between two whole lines.
"""
