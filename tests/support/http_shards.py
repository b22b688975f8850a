"""A shard set served over HTTP on 127.0.0.1 from a thread of the test process, counting the bytes of every file
it sends: what a remote-shard test needs to see that each rank streamed only its own shards."""
from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections import Counter
from pathlib import Path
from typing import Iterator


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    sent: Counter  # set per server by `serve`

    def copyfile(self, source, outputfile) -> None:
        name = self.path.rsplit("/", 1)[-1]
        while block := source.read(64 * 1024):
            outputfile.write(block)
            self.sent[name] += len(block)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[tuple[str, Counter]]:
    """(URL of `folder`, bytes sent per file name) while the server runs."""
    sent: Counter = Counter()
    handler = type("Handler", (_CountingHandler,), {"sent": sent})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(handler, directory=str(folder.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{folder.name}", sent
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
