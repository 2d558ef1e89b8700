"""The Hugging Face Hub through `huggingface_hub.HfApi` (`push_to_hub`, `hub_model_id`, `model_card_private`).

`create_repo(exist_ok=True)` then `upload_folder`, then the repo tree is listed to verify that every file is there
with its size (and, for LFS files, its sha256). With `push_to_hub_background` the upload runs in a background thread;
`submit` / `upload_checkpoint` return a `HubUpload` handle whose `.wait()` gives the record (or raises the error, which
is also logged when it happens). Uploads to one repo run one at a time (a lock per repo).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, InputError
from .base import LocalFile, join_key, local_files, log, log_record, make_record
from ..notify.hooks import run_post_upload
from .options import UploadOptions
from .retry import retry_call

PROVIDER = "huggingface"
TOKEN_HINT = "set HF_TOKEN or run `huggingface-cli login` (`hf auth login`)"
CHECK_TIMEOUT_S = 10.0
_REPO_LOCKS: dict[str, threading.Lock] = {}
_REPO_LOCKS_GUARD = threading.Lock()


def hub_endpoint() -> str:
    """HF_ENDPOINT as set now (huggingface_hub reads it once, at import), else the library's endpoint."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set now, or when huggingface_hub was imported (it then refuses every request)."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return now or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _ignored_by_hub(rel: str) -> bool:
    """Files `upload_folder` leaves out by default (.git, .cache/huggingface)."""
    parts = rel.split("/")
    return ".git" in parts[:-1] or parts[-1] == ".git" or ".cache/huggingface/" in f"{rel}/"


class HubUpload:
    """Handle of one hub upload: finished already, or running in a background thread."""

    def __init__(self, description: str):
        self.description = description
        self._finished = threading.Event()
        self._result: dict | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def finished(cls, description: str, record: dict) -> "HubUpload":
        handle = cls(description)
        handle._result = record
        handle._finished.set()
        return handle

    def _start(self, fn: Callable[[], dict]) -> "HubUpload":
        def run():
            try:
                self._result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to wait()
                self._error = exc
                log.error("background upload to %s failed: %s", self.description, exc)
            finally:
                self._finished.set()

        self._thread = threading.Thread(target=run, name=f"hub-upload {self.description}", daemon=False)
        self._thread.start()
        return self

    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def join(self, timeout: float | None = None) -> bool:
        """Block until the upload ends (or `timeout`), without raising its error; returns whether it ended."""
        return self._finished.wait(timeout)

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the upload ends; return its record or raise its error (TimeoutError if still running)."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"upload to {self.description} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class HubTarget:
    """Uploads folders to one model repo of the Hub."""

    provider = PROVIDER

    def __init__(self, options: UploadOptions, base_dir: Path | None = None, *,
                 sleep: Callable[[float], None] | None = None, token: str | None = None,
                 endpoint: str | None = None):  # fmt: skip
        if not options.hub_model_id or not isinstance(options.hub_model_id, str):
            raise ConfigError("push_to_hub needs hub_model_id (e.g. 'your-name/your-lora')")
        self.repo_id = options.hub_model_id
        self.private = options.private
        self.background = options.background
        self.hooks = options.hooks
        self.base_dir = base_dir
        self._token = token
        self.endpoint = (endpoint or hub_endpoint()).rstrip("/")
        self._retry_kwargs = {"sleep": sleep} if sleep else {}

    @classmethod
    def from_config(cls, config: Any, base_dir: Path | None = None, *,
                    sleep: Callable[[float], None] | None = None) -> "HubTarget":
        """The target of `hub_model_id`, `model_card_private`, `push_to_hub_background`, `post_upload_script`."""
        return cls(UploadOptions.from_config(config), base_dir, sleep=sleep)

    def __repr__(self) -> str:
        return f"HubTarget({self.repo_id!r})"

    @property
    def url(self) -> str:
        return f"{self.endpoint}/{self.repo_id}"

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self._token)

    # Pre-flight --------------------------------------------------------------------------------------------------

    def check(self, timeout: float = CHECK_TIMEOUT_S) -> str:
        """Offline mode, a token, and a whoami request answered by the hub; raises InputError otherwise."""
        user = check_hub(self.endpoint, timeout=timeout, token=self._token)
        return f"hub {self.endpoint}: logged in as {user}, pushing to {self.repo_id}"

    # Uploads -----------------------------------------------------------------------------------------------------

    def upload(self, folder: Path, path_in_repo: str | None = None, *, files: list[LocalFile] | None = None,
               commit_message: str | None = None, step: int | None = None) -> dict:
        """Create the repo if needed, upload `folder` (under `path_in_repo`), verify; return the record."""
        folder = Path(folder)
        files = files if files is not None else local_files(folder)
        if hub_offline():
            raise InputError(f"cannot push to {self.repo_id}: the Hugging Face hub is offline (HF_HUB_OFFLINE=1); "
                             "unset HF_HUB_OFFLINE or set push_to_hub=false")
        destination = f"{self.repo_id}/{path_in_repo}" if path_in_repo else self.repo_id
        api = self._api()
        message = commit_message or (f"st: checkpoint {step}" if step is not None else "st: upload model")
        with _repo_lock(self.repo_id):
            try:
                retry_call(lambda: api.create_repo(self.repo_id, private=self.private, exist_ok=True,
                                                   repo_type="model"),
                           what=f"hub {self.repo_id}: creating the repo", **self._retry_kwargs)
                log.info("uploading %s -> %s (%d files)", folder, self.url + (f"/{path_in_repo}" if path_in_repo
                                                                               else ""), len(files))
                info = retry_call(lambda: api.upload_folder(repo_id=self.repo_id, folder_path=str(folder),
                                                            path_in_repo=path_in_repo, commit_message=message,
                                                            repo_type="model"),
                                  what=f"hub {destination}: uploading", **self._retry_kwargs)
                remote = retry_call(lambda: list(api.list_repo_tree(self.repo_id, path_in_repo=path_in_repo,
                                                                    recursive=True, repo_type="model")),
                                    what=f"hub {destination}: listing", **self._retry_kwargs)
            except InputError:
                raise
            except Exception as exc:
                raise explain_hub_error(exc, self.repo_id, self.endpoint) from exc
        self._verify(remote, files, path_in_repo, destination)
        record = make_record(PROVIDER, destination, files, len(files), url=self.url, private=self.private)
        commit = getattr(info, "oid", None)
        if isinstance(commit, str):
            record["commit"] = commit
        log_record(record)
        run_post_upload(self.hooks, step, folder, f"{self.url}/tree/main/{path_in_repo or ''}".rstrip("/"),
                        cwd=self.base_dir, provider=PROVIDER, huggingface_path=self.repo_id)
        return record

    def submit(self, folder: Path, path_in_repo: str | None = None, *, background: bool | None = None,
               files: list[LocalFile] | None = None, commit_message: str | None = None,
               step: int | None = None) -> HubUpload:
        """Upload now (errors raise here) or, with `background` (default: push_to_hub_background), in a thread."""
        background = self.background if background is None else background
        description = f"{self.repo_id}/{path_in_repo}" if path_in_repo else self.repo_id
        files = files if files is not None else local_files(Path(folder))

        def run() -> dict:
            return self.upload(folder, path_in_repo, files=files, commit_message=commit_message, step=step)

        if not background:
            return HubUpload.finished(description, run())
        log.info("uploading to %s in the background", description)
        return HubUpload(description)._start(run)

    def upload_checkpoint(self, folder: Path, step: int, *, background: bool | None = None) -> HubUpload:
        """push_checkpoints_to_hub: upload a checkpoint folder to `checkpoints/checkpoint-{step}` of the repo."""
        return self.submit(folder, f"checkpoints/checkpoint-{int(step)}", background=background, step=int(step),
                           commit_message=f"st: checkpoint {int(step)}")

    def _verify(self, remote: list, files: list[LocalFile], path_in_repo: str | None, destination: str) -> None:
        found = {item.path: item for item in remote if getattr(item, "size", None) is not None}
        problems = []
        for f in files:
            if _ignored_by_hub(f.rel):
                continue
            item = found.get(join_key(path_in_repo or "", f.rel))
            if item is None:
                problems.append(f"{f.rel} missing")
                continue
            if item.size != f.size:
                problems.append(f"{f.rel} has {item.size} bytes, not {f.size}")
                continue
            lfs = getattr(item, "lfs", None)
            sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
            if sha and sha != f.sha256:
                problems.append(f"{f.rel} sha256 differs")
        if problems:
            raise InputError(f"verification of hub {destination} failed: {'; '.join(problems)}")


def upload_checkpoint(config: Any, folder: Path, step: int, base_dir: Path | None = None,
                      background: bool | None = None) -> HubUpload:
    """push_checkpoints_to_hub from `st train`: `HubTarget.from_config(config).upload_checkpoint(folder, step)`."""
    return HubTarget.from_config(config, base_dir).upload_checkpoint(folder, step, background=background)


def _repo_lock(repo_id: str) -> threading.Lock:
    with _REPO_LOCKS_GUARD:
        return _REPO_LOCKS.setdefault(repo_id, threading.Lock())


def check_hub(endpoint: str | None = None, *, timeout: float = CHECK_TIMEOUT_S, token: str | None = None) -> str:
    """Raise InputError unless the hub is online, a token is set, and whoami answers; returns the user name."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import build_hf_headers, get_session

    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    if hub_offline():
        raise InputError("push_to_hub is set but the Hugging Face hub is offline (HF_HUB_OFFLINE=1): unset "
                         "HF_HUB_OFFLINE, or set push_to_hub=false")
    token = token or get_token()
    if not token:
        raise InputError(f"push_to_hub is set but no Hugging Face token was found: {TOKEN_HINT}")
    try:
        response = get_session().get(f"{endpoint}/api/whoami-v2", headers=build_hf_headers(token=token),
                                     timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any transport failure means unreachable
        raise InputError(f"push_to_hub is set but the Hugging Face hub at {endpoint} is unreachable "
                         f"({type(exc).__name__}: {exc}); check the network or HF_ENDPOINT, or set "
                         "push_to_hub=false") from None
    status = response.status_code
    if status == 401:
        raise InputError(f"the Hugging Face hub at {endpoint} rejected the token (HTTP 401): {TOKEN_HINT} "
                         "with a valid write token")
    if status == 429:
        log.warning("hub whoami is rate-limited (HTTP 429); the token was not checked")
        return "(unchecked)"
    if status >= 400:
        raise InputError(f"the Hugging Face hub at {endpoint} answered HTTP {status} to a whoami request; "
                         "try again later or set push_to_hub=false")
    try:
        return str(response.json().get("name") or "(unknown)")
    except (ValueError, AttributeError, json.JSONDecodeError):
        return "(unknown)"


def explain_hub_error(exc: BaseException, repo_id: str, endpoint: str) -> InputError:
    """A clear user error for a failed hub call (the token never appears)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "OfflineModeIsEnabled" in names:
        return InputError(f"cannot push to {repo_id}: the Hugging Face hub is offline (HF_HUB_OFFLINE=1)")
    if "LocalTokenNotFoundError" in names:
        return InputError(f"cannot push to {repo_id}: no Hugging Face token: {TOKEN_HINT}")
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status == 401:
        return InputError(f"the hub rejected the token while pushing to {repo_id} (HTTP 401): {TOKEN_HINT}")
    if status == 403:
        return InputError(f"no write access to {repo_id} (HTTP 403): use a token with write permission for that "
                          "namespace, or change hub_model_id")
    if status == 404:
        return InputError(f"repo {repo_id} not found on {endpoint} (HTTP 404): check hub_model_id")
    if names & {"TransportError", "ConnectionError", "TimeoutException", "Timeout", "TimeoutError"}:
        return InputError(f"cannot reach the Hugging Face hub at {endpoint} while pushing to {repo_id}: {exc}")
    return InputError(f"pushing to hub repo {repo_id} failed: {type(exc).__name__}: {exc}")
