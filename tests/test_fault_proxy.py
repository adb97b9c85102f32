"""The fault proxy the storage tests lean on: which request it hits depends on the request,
never on the order concurrent clients send them in."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import botocore.config
import botocore.session
from botocore.exceptions import ClientError
from fault_proxy import Fault, request_identity

KEYS = [f"data/part-{i:03d}.parquet" for i in range(40)]


def client(proxy_url: str):
    """A signed S3 client through the proxy that never retries: each call is one request."""
    return botocore.session.get_session().create_client(
        "s3", endpoint_url=proxy_url, region_name="us-east-1", aws_access_key_id="test",
        aws_secret_access_key="test",
        config=botocore.config.Config(retries={"total_max_attempts": 1},
                                      s3={"addressing_style": "path"}))


def statuses(proxy, bucket: str, order: list[str], workers: int) -> dict[str, tuple]:
    """Each key read three times (a client retrying), keys in ``order``, by ``workers``
    threads at once: the HTTP status of each try."""
    s3 = client(proxy.url)

    def one_try(key: str) -> int:
        try:
            s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            return 200
        except ClientError as exc:
            return exc.response["ResponseMetadata"]["HTTPStatusCode"]

    def three_tries(key: str) -> tuple[str, tuple]:
        return key, tuple(one_try(key) for _ in range(3))

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(three_tries, order))


def test_faults_depend_on_the_request_not_on_arrival_order(s3_bucket, fault_proxy):
    fs, bucket = s3_bucket
    for key in KEYS:
        fs.pipe(f"{bucket}/{key}", key.encode())
    fault_proxy.set(Fault("500", "GET", rate=0.4), seed=11)
    one_by_one = statuses(fault_proxy, bucket, KEYS, workers=1)
    fault_proxy.set(Fault("500", "GET", rate=0.4), seed=11)
    all_at_once = statuses(fault_proxy, bucket, KEYS[::-1], workers=8)
    assert one_by_one == all_at_once
    outcomes = [status for tries in one_by_one.values() for status in tries]
    assert set(outcomes) == {200, 500}  # the rate is felt: some hit, some pass
    # a retry draws again: some key fails and then passes
    assert any(tries[0] == 500 and 200 in tries for tries in one_by_one.values())
    # another seed, other requests hit
    fault_proxy.set(Fault("500", "GET", rate=0.4), seed=12)
    assert statuses(fault_proxy, bucket, KEYS, workers=1) != one_by_one


def test_first_fails_each_distinct_request_that_many_times(s3_bucket, fault_proxy):
    fs, bucket = s3_bucket
    for key in KEYS[:5]:
        fs.pipe(f"{bucket}/{key}", key.encode())
    fault_proxy.set(Fault("503", "GET", first=2))
    assert set(statuses(fault_proxy, bucket, KEYS[:5], workers=5).values()) == {(503, 503, 200)}
    assert fault_proxy.injected[("503", "GET")] == 10


def test_identity_is_method_path_query_and_range_without_random_names():
    base = request_identity("GET", "/b/out/part.parquet?x-id=GetObject", "bytes=0-99")
    assert base != request_identity("GET", "/b/out/part.parquet?x-id=GetObject", "bytes=100-")
    assert base != request_identity("HEAD", "/b/out/part.parquet?x-id=GetObject", "bytes=0-99")
    assert base != request_identity("GET", "/b/out/other.parquet?x-id=GetObject", "bytes=0-99")
    temporary = "/b/out/.part.parquet.{}.tmp?uploadId={}&partNumber=1"
    assert request_identity("PUT", temporary.format("a" * 32, "x1"), None) == \
        request_identity("PUT", temporary.format("0123456789abcdef" * 2, "y2"), None)
