"""The driver's streaming preparation and the reducer on object storage: `cmsd-jobs submit --prepare-only` of a corpus
on a local S3 server (moto's, its own process on 127.0.0.1) into a job directory on the same server; with --report,
made-up results for every shard (scripts/fake_results.py, through the workers' writer) and then `cmsd-jobs report`
(the reducer and the report reading them back from the bucket). Prints each command's wall time and peak RSS.

    python scripts/make_corpus.py /tmp/corpus-200k.jsonl --rows 200000
    python scripts/s3_prepare.py /tmp/corpus-200k.jsonl [--report]

Needs the test extras (moto[server]).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path, help="a local JSON Lines corpus, uploaded to the server first")
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--report", action="store_true", help="then fake results and run `cmsd-jobs report`")
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
        job = "s3://bench/runs/bench"
        if measured(env, "submit --prepare-only s3 -> s3", "submit", "--corpus", "s3://bench/corpus.jsonl", "--target",
                 args.target, "--out", "s3://bench/runs", "--job-id", "bench", "--prepare-only"):
            return
        if args.report:
            os.environ.update(env)  # this process writes the results through the job store
            from scripts.fake_results import write_fake_results

            start = time.perf_counter()
            rows = write_fake_results(job)
            print(f"{rows} made-up results committed to {job} in {time.perf_counter() - start:.1f} s")
            measured(env, "report (reducer + report) s3", "report", job)
    finally:
        server.terminate()
        server.wait()


def measured(env: dict[str, str], what: str, *command: str) -> int:
    """Run `cmsd-jobs COMMAND`, print its exit code, wall time and peak RSS (its own, from wait4); return the code."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "jobs", *command], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    err = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    print(err.strip().splitlines()[-1] if err.strip() else "", file=sys.stderr)
    code = os.waitstatus_to_exitcode(status)
    print(f"{what}: exit {code}, {wall:.1f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MB")
    return code


if __name__ == "__main__":
    main()
