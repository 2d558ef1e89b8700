"""Azure Blob Storage through azure-storage-blob (`pip install azure-storage-blob`).

Blobs carry their sha256 in metadata; a re-run skips blobs present with the same size and sha256. The SDK uploads
large blobs in blocks, in parallel (`max_concurrency`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ...errors import ConfigError, InputError
from .base import (
    MB, POSITIVE_INT, STR, LocalFile, from_env, join_key, local_files, log, make_record, normalise_entry,
    require_key, require_sdk,
)
from .retry import retry_call

SCHEMA = {
    "container": (STR, ("container_name",)),
    "prefix": (STR, ("base_path", "path")),
    "connection_string": (STR, ()),
    "account_url": (STR, ()),
    "credential": (STR, ("account_key", "sas_token")),
    "max_concurrency": (POSITIVE_INT, ()),
}
CONNECTION_ENV = ("AZURE_STORAGE_CONNECTION_STRING",)


def validate(entry: dict, where: str, provider: str) -> dict:
    """Check an `azure_blob` entry offline (container and a way to connect)."""
    spec = normalise_entry(entry, where, provider, SCHEMA)
    require_key(spec, "container", where, "the blob container name")
    if not from_env(spec, "connection_string", CONNECTION_ENV) and not spec.get("account_url"):
        raise ConfigError(f"{where}: provider '{provider}' needs 'connection_string' (or the "
                          "AZURE_STORAGE_CONNECTION_STRING environment variable), or 'account_url' with 'credential'")
    spec["prefix"] = spec.get("prefix", "").strip("/")
    return spec


class AzureBlobTarget:
    """Uploads a folder under `azure://container/prefix/`."""

    def __init__(self, spec: dict, *, sleep: Callable[[float], None] | None = None):
        require_sdk("azure.storage.blob", "azure-storage-blob", "azure_blob")
        self.spec = spec
        self.provider = "azure_blob"
        self.container_name = spec["container"]
        self.prefix = spec.get("prefix", "")
        self._retry_kwargs = {"sleep": sleep} if sleep else {}

    @property
    def destination(self) -> str:
        return f"azure://{self.container_name}/{self.prefix}".rstrip("/")

    def __repr__(self) -> str:
        return f"AzureBlobTarget({self.destination!r})"

    def _container(self):
        from azure.storage.blob import BlobServiceClient

        connection = from_env(self.spec, "connection_string", CONNECTION_ENV)
        if connection:
            service = BlobServiceClient.from_connection_string(connection)
        else:
            service = BlobServiceClient(account_url=self.spec["account_url"], credential=self.spec.get("credential"))
        container = service.get_container_client(self.container_name)
        retry_call(container.get_container_properties, what=f"{self.destination}: checking the container",
                   **self._retry_kwargs)
        return container

    def check(self) -> str:
        try:
            self._container()
        except Exception as exc:
            raise self._explain(exc) from None
        return f"{self.destination}: container reachable"

    def upload(self, folder: Path, files: list[LocalFile] | None = None) -> dict:
        files = files if files is not None else local_files(folder)
        try:
            container = self._container()
            uploaded = 0
            for f in files:
                blob = container.get_blob_client(join_key(self.prefix, f.rel))
                if self._matches(blob, f):
                    continue
                log.info("uploading %s -> %s/%s (%.1f MB)", f.rel, self.destination, f.rel, f.size / MB)

                def put(f=f, blob=blob):
                    with open(f.path, "rb") as handle:
                        blob.upload_blob(handle, length=f.size, overwrite=True, metadata={"sha256": f.sha256},
                                         max_concurrency=int(self.spec.get("max_concurrency", 4)))

                retry_call(put, what=f"{self.destination}: uploading {f.rel}", **self._retry_kwargs)
                if not self._matches(blob, f):
                    raise InputError(f"verification failed for {self.destination}/{f.rel}: size or sha256 differs")
                uploaded += 1
            prefix = f"{self.prefix}/" if self.prefix else ""
            listed = {b.name for b in retry_call(lambda: list(container.list_blobs(name_starts_with=prefix)),
                                                 what=f"{self.destination}: listing", **self._retry_kwargs)}
        except InputError:
            raise
        except Exception as exc:
            raise self._explain(exc) from exc
        missing = [f.rel for f in files if join_key(self.prefix, f.rel) not in listed]
        if missing:
            raise InputError(f"{self.destination}: uploaded blobs missing from the listing: {', '.join(missing)}")
        return make_record(self.provider, self.destination, files, uploaded, remote_objects=len(listed))

    def _matches(self, blob, f: LocalFile) -> bool:
        from azure.core.exceptions import ResourceNotFoundError

        def props():
            try:
                return blob.get_blob_properties()
            except ResourceNotFoundError:
                return None

        found = retry_call(props, what=f"{self.destination}: checking {f.rel}", **self._retry_kwargs)
        return found is not None and found.size == f.size and (found.metadata or {}).get("sha256") == f.sha256

    def _explain(self, exc: Exception) -> Exception:
        names = {cls.__name__ for cls in type(exc).__mro__}
        if "ResourceNotFoundError" in names:
            return InputError(f"{self.destination}: container '{self.container_name}' does not exist")
        if "ClientAuthenticationError" in names:
            return InputError(f"{self.destination}: Azure rejected the credentials (connection_string / "
                              "AZURE_STORAGE_CONNECTION_STRING, or account_url + credential)")
        if "ValueError" in names and "connection" in str(exc).lower():
            return ConfigError(f"{self.destination}: the connection string is malformed")
        return InputError(f"{self.destination}: Azure error: {type(exc).__name__}: {exc}")
