"""Stage inputs and outputs as local folders or `s3://bucket/prefix` on S3 and S3-compatible stores: one
abstraction for both (`location`), the objects of a prefix through boto3 (`store`), local copies of remote outputs
(`mirror`), the remote lock and ownership record (`claim`) and what the commands call (`stages`).

Endpoint and credentials come from the standard AWS environment: AWS_ENDPOINT_URL (S3-compatible stores such as
MinIO or R2), AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or AWS_PROFILE.
"""

from .location import S3Prefix, is_remote, parse_location

__all__ = ["S3Prefix", "is_remote", "parse_location"]
