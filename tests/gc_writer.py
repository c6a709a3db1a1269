"""A writer process for the gc tests: `python gc_writer.py VOLUME` opens a Client and, for each
line `PREFIX N` on stdin, writes helpers.small_files(PREFIX, N) one file at a time
(Client.write_file: one commit per file), then prints `ok`; it exits at the end of stdin."""
from __future__ import annotations

import sys

from balefs.storage.client import Client
from helpers import small_files

if __name__ == "__main__":
    with Client.open(sys.argv[1]) as client:
        for line in sys.stdin:
            prefix, n = line.split()
            for path, data in small_files(prefix, int(n)).items():
                client.write_file(path, data)
            print("ok", flush=True)
