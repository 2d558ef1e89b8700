"""Azure Blob Storage through azure-storage-blob (`pip install azure-storage-blob`).

Blobs carry their sha256 in metadata; a re-run skips blobs present with the same size and sha256. The SDK uploads
large blobs in blocks, in parallel (`max_concurrency`).
"""

from __future__ import annotations


from ..errors import ConfigError, InputError
from .base import (
    POSITIVE_INT, STR, LocalFile, StorageTarget, from_env, join_key, normalise_entry, require_key,
)

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


class AzureBlobTarget(StorageTarget):
    """Uploads a folder under `azure://container/prefix/`."""

    scheme = "azure"
    location_key = "container"
    sdk = ("azure.storage.blob", "azure-storage-blob")

    def _open(self):
        from azure.storage.blob import BlobServiceClient

        connection = from_env(self.spec, "connection_string", CONNECTION_ENV)
        if connection:  # retry_total=0: retries are st's own (retry.py)
            service = BlobServiceClient.from_connection_string(connection, retry_total=0)
        else:
            service = BlobServiceClient(account_url=self.spec["account_url"], credential=self.spec.get("credential"),
                                        retry_total=0)
        container = service.get_container_client(self.location)
        self._retry(container.get_container_properties, "checking the container")
        return container

    _probe = _open

    def _put(self, container, f: LocalFile) -> None:
        with open(f.path, "rb") as handle:
            container.get_blob_client(join_key(self.prefix, f.rel)).upload_blob(
                handle, length=f.size, overwrite=True, metadata={"sha256": f.sha256},
                max_concurrency=int(self.spec.get("max_concurrency", 4)))

    def _remote(self, container, f: LocalFile) -> tuple[int, str] | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            found = container.get_blob_client(join_key(self.prefix, f.rel)).get_blob_properties()
        except ResourceNotFoundError:
            return None
        return found.size, (found.metadata or {}).get("sha256")

    def _listed(self, container) -> set[str]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        return self._retry(lambda: {b.name for b in container.list_blobs(name_starts_with=prefix)}, "listing")

    def _explain(self, exc: Exception) -> Exception:
        names = {cls.__name__ for cls in type(exc).__mro__}
        if "ResourceNotFoundError" in names:
            return InputError(f"{self.destination}: container '{self.location}' does not exist")
        if "ClientAuthenticationError" in names:
            return InputError(f"{self.destination}: Azure rejected the credentials (connection_string / "
                              "AZURE_STORAGE_CONNECTION_STRING, or account_url + credential)")
        if "ValueError" in names and "connection" in str(exc).lower():
            return ConfigError(f"{self.destination}: the connection string is malformed")
        return InputError(f"{self.destination}: Azure error: {type(exc).__name__}: {exc}")
