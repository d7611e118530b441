"""The real servers the storage tests start (tests/servers.py) start, answer and restart."""

from __future__ import annotations

import psycopg

from tests.servers import Postgres, SeaweedFS


def test_postgres_answers_and_keeps_its_data_across_a_restart(pg_server: Postgres,
                                                              pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.execute("CREATE TABLE kept (x INTEGER)")
        conn.execute("INSERT INTO kept VALUES (42)")
    url = pg_server.url
    pg_server.restart()
    assert pg_server.url == url  # same socket, same URL: a client reconnects as is
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT x FROM kept").fetchone() == (42,)


def test_each_pg_url_is_a_fresh_database(pg_server: Postgres, pg_url: str) -> None:
    other = pg_server.new_database()
    assert other != pg_url
    with psycopg.connect(other) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchone() == (0,)


def test_seaweedfs_serves_s3_and_requires_credentials(s3_server: SeaweedFS) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    bucket = s3_server.make_bucket()
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="k", Body=b"hello")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"hello"
    stranger = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                            aws_access_key_id="nobody", aws_secret_access_key="nothing",
                            config=Config(s3={"addressing_style": "path"}))
    try:
        stranger.get_object(Bucket=bucket, Key="k")
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "InvalidAccessKeyId"
    else:
        raise AssertionError("SeaweedFS served an object to unknown credentials")
