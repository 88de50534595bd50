"""Fixtures and helpers for the tests of jobs/ and workers/: a real local Ray, a real S3 server on 127.0.0.1, a tiny
target model on disk.

tests/conftest.py imports the fixtures from here, once for the whole session. Ray is started once per
session (the first fixture that asks starts it, and only that one shuts it down), after the S3 server, so that its
workers inherit the server's AWS_* environment as a cluster's pods inherit theirs from a Secret.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class S3Server:
    """moto's S3 server (real HTTP on 127.0.0.1, signatures checked) and the credentials of its one user."""

    endpoint: str
    access_key: str
    secret_key: str
    server: Any  # moto.server.ThreadedMotoServer

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def fs(self) -> Any:
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, access_key=self.access_key,
                                 secret_key=self.secret_key, region="us-east-1", allow_bucket_creation=True)

    def bucket(self, name: str) -> str:
        """A new empty bucket; returns its URI."""
        self.fs().create_dir(name)
        return f"s3://{name}"

    def put(self, key: str, data: bytes) -> str:
        with self.fs().open_output_stream(key) as stream:
            stream.write(data)
        return f"s3://{key}"

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under bucket/prefix and its bytes."""
        import pyarrow.fs as pafs

        fs = self.fs()
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        return {i.path: fs.open_input_stream(i.path).read() for i in infos if i.type == pafs.FileType.File}

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        """Start again on the same port (moto keeps its buckets in this process)."""
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 server on 127.0.0.1 (moto's, over HTTP) with authentication on: one IAM user allowed s3:*, whose
    keys go into the AWS_* environment pyarrow reads (AWS_ENDPOINT_URL points at the server). Stopped at the end."""
    import boto3
    from moto import settings
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName="cmsd")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="cmsd", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="cmsd")["AccessKey"]
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request is authenticated
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    s3 = S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], server)
    try:
        yield s3
    finally:
        s3.server.stop()
        settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def ray_local(s3_server: S3Server) -> Iterator[str]:
    """A real local Ray instance with 2 CPUs; yields its GCS address (for `ray start --address`)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as a Hugging Face directory, with the real SmolLM2 tokenizer (same vocab)."""
    folder = tmp_path_factory.getbasetemp() / "tiny-target"
    if not (folder / "config.json").is_file():
        build_tiny_target(folder)
    return folder


def build_tiny_target(folder: Path, max_positions: int = 512) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cmsd import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """Records as JSON lines; a str record is written as it is (a broken line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def articles(count: int, words: int = 30, start: int = 0) -> list[dict[str, str]]:
    """Short made-up articles with references; each repeats itself a little so the n-gram drafter has work."""
    out = []
    for i in range(start, start + count):
        body = " ".join(f"word{(i * 7 + j) % 50}" for j in range(words))
        out.append({"id": f"doc-{i:03d}", "source": f"Article {i}. {body}. {body[:60]}",
                    "reference": f"summary of article {i}"})
    return out


def result_ids(job_dir: str | Path) -> list[str]:
    """Every id in every committed result file of a job (duplicates kept)."""
    import pyarrow.parquet as pq

    files = sorted(Path(job_dir, "results").glob("shard-*.parquet"))
    return [doc_id for f in files for doc_id in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


def error_records(job_dir: str | Path) -> list[dict[str, Any]]:
    files = sorted(Path(job_dir, "errors").glob("shard-*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
