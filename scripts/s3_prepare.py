"""The driver's streaming preparation from and to object storage: `cmsd-jobs submit --prepare-only` of a corpus on a
local S3 server (moto's, its own process on 127.0.0.1) into a job directory on the same server; prints the wall
time and the driver's peak RSS.

    python scripts/make_corpus.py /tmp/corpus-200k.jsonl --rows 200000
    python scripts/s3_prepare.py /tmp/corpus-200k.jsonl

Needs the test extras (moto[server]).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path, help="a local JSON Lines corpus, uploaded to the server first")
    parser.add_argument("--target", default="smollm2")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key="bench", secret_key="bench",
                               region="us-east-1", allow_bucket_creation=True)
        fs.create_dir("bench")
        start = time.perf_counter()
        pafs.copy_files(str(args.corpus), "bench/corpus.jsonl", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        print(f"uploaded {args.corpus.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "jobs", "submit", "--corpus", "s3://bench/corpus.jsonl",
                               "--target", args.target, "--out", "s3://bench/runs", "--prepare-only"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "", file=sys.stderr)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child: the driver
        print(f"submit --prepare-only s3 -> s3: exit {done.returncode}, {wall:.1f} s, driver peak RSS {peak:.0f} MB")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
