"""The seed project's five stages as one plain script: what `run_pipeline.py` is measured against.

    python bench/seed.py RUN_ID TABLE

As ../shared/seed/DE_Review1-README.md describes them, with the libraries it names and nothing else:
no notebooks, no record, no checks, no lock, no lineage. 1. requests → a pandas DataFrame → CSV in the
raw bucket; 2. the raw CSV read back, its column names capitalised, written to the clean bucket;
3. the clean CSV into a PostgreSQL table of TEXT columns, dropped and created again, rows inserted with
`execute_values`; 4. the table exported as CSV to the cloud bucket; 5. that CSV copied into the gold
bucket. The services are the pipeline's own (lib/config.py reads where they are), so both run on the
same stack and data."""

from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3  # noqa: E402
import pandas as pd  # noqa: E402
import psycopg2  # noqa: E402
import requests  # noqa: E402
from psycopg2.extras import execute_values  # noqa: E402

from lib import config  # noqa: E402  (where the services are, and their credentials)


def main(run_id: str, table: str) -> None:
    settings = config.settings()
    s3 = boto3.client("s3", endpoint_url=settings.store.url, aws_access_key_id=settings.store.access_key.reveal(),
                      aws_secret_access_key=settings.store.secret_key.reveal(), region_name=settings.store.region)
    prefix = f"seed/{run_id}"

    # 1. request_service.py: the API into a DataFrame, saved as CSV, uploaded to the raw bucket.
    response = requests.get(settings.api_url, timeout=60)
    response.raise_for_status()
    frame = pd.DataFrame(response.json())
    s3.put_object(Bucket=settings.raw_bucket, Key=f"{prefix}/capitals.csv", Body=frame.to_csv(index=False).encode())

    # 2. minio_raw_to_clean.py: column names capitalised.
    raw = pd.read_csv(io.BytesIO(s3.get_object(Bucket=settings.raw_bucket, Key=f"{prefix}/capitals.csv")["Body"].read()))
    raw.columns = [c.upper() for c in raw.columns]
    s3.put_object(Bucket=settings.clean_bucket, Key=f"{prefix}/capitals_clean.csv", Body=raw.to_csv(index=False).encode())

    # 3. minio_to_postgres.py: TEXT columns, table dropped and made again, execute_values.
    clean = pd.read_csv(io.BytesIO(s3.get_object(Bucket=settings.clean_bucket,
                                                 Key=f"{prefix}/capitals_clean.csv")["Body"].read()), dtype=str)
    db = settings.db
    conn = psycopg2.connect(host=db.host, port=db.port, user=db.user, password=db.password.reveal(), dbname=db.name)
    with conn, conn.cursor() as cur:
        cur.execute(f'DROP TABLE IF EXISTS "{table}"')
        cur.execute(f'CREATE TABLE "{table}" ({", ".join(f"{c} TEXT" for c in clean.columns)})')
        execute_values(cur, f'INSERT INTO "{table}" VALUES %s', clean.where(clean.notna(), None).values.tolist())

    # 4. postgres_to_aws.py: the table as CSV into the cloud bucket.
    exported = pd.read_sql(f'SELECT * FROM "{table}"', conn)
    conn.close()
    cloud_key = f"{settings.cloud.prefix}/{prefix}/{table}.csv"
    s3.put_object(Bucket=settings.cloud.bucket, Key=cloud_key, Body=exported.to_csv(index=False).encode())

    # 5. aws_to_minio.py: the cloud CSV into the gold bucket.
    body = s3.get_object(Bucket=settings.cloud.bucket, Key=cloud_key)["Body"].read()
    s3.put_object(Bucket=settings.gold_bucket, Key=f"{prefix}/{table}.csv", Body=body)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
