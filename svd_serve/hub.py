"""Model names → local directories: a local directory as it is, or a Hugging Face Hub id (at a
revision: a branch, a tag or a commit hash) resolved through ``huggingface_hub`` and its cache.

Every command that takes a base (or a PEFT adapter to import) resolves it here, once, and works on
the local directory (:class:`svd_serve.weights.Weights` and :func:`svd_serve.model.load_base` only
read local directories). The rules, in order:

- a local directory that exists wins, whatever the name looks like;
- a name that looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, an existing file, any
  :class:`~pathlib.Path` object) stays a local path, for the caller's own check to refuse (``base
  model directory not found: ...``);
- any other name must be a valid Hub id (``huggingface_hub.utils.validate_repo_id``). With the Hub
  reachable its revision is resolved there (a bounded request, ``HF_HUB_ETAG_TIMEOUT`` seconds, default
  10: a closed network never makes a command hang) and the snapshot downloaded into the cache
  (``snapshot_download``, only the files svd-serve reads); offline (``HF_HUB_OFFLINE=1``) or with the
  Hub unreachable the snapshot comes from the cache alone.

``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` are read at each call (``huggingface_hub``
reads them once, at import), so a library caller can change them in-process. What was resolved
(:meth:`Source.record`: the name given, the repo id, the revision asked for and the snapshot's commit)
goes into the manifests of what is written from it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SvdServeError
from .weights import MODEL_FILES

COMMIT = re.compile(r"[0-9a-f]{40}")
DEFAULT_TIMEOUT_S = 10.0  # the revision look-up's limit (huggingface_hub's default etag timeout)
# the files svd-serve reads from a snapshot: safetensors first, pytorch_model*.bin only without them
PATTERNS = {
    "model": [*MODEL_FILES, "*.safetensors", "model.safetensors.index.json"],
    "model-bin": [*MODEL_FILES, "pytorch_model*.bin", "pytorch_model.bin.index.json"],
    "adapter": ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"],
}

_resolved: dict[tuple, "Source"] = {}  # one resolution per name and setting in a process (one commit)


@dataclass(frozen=True)
class Source:
    """A resolved model name: the local directory, and where it came from."""

    name: str  # as given
    path: Path  # the local directory (a snapshot in the Hugging Face cache for a Hub id)
    repo_id: str | None = None  # None: a local directory
    revision: str | None = None  # the revision asked for (None: the default branch)
    commit: str | None = None  # the snapshot's commit hash

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    def record(self) -> dict:
        """The manifest entry: name, repo id, revision asked for and resolved commit."""
        return {"name": self.name, "repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}

    def __str__(self) -> str:
        return self.name


def cache_dir() -> str:
    """The Hugging Face cache: ``$HF_HUB_CACHE`` now, else huggingface_hub's (``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) now, or as huggingface_hub read it at import
    (it then refuses every request itself)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE") or constants.is_offline_mode()


def _timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_TIMEOUT_S)
    except ValueError:
        return DEFAULT_TIMEOUT_S


def looks_like_path(name: str) -> bool:
    """A name no Hub id can be: absolute, relative to ``.`` or ``~``, nested deeper than
    ``owner/name``, or an existing file."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or Path(name).expanduser().exists())


def resolve(name: str | Path | Source, revision: str | None = None, kind: str = "model",
            flag: str = "--revision", cache_only: bool = False) -> Source:
    """``name`` as a local directory (see the module docstring); ``kind``: ``"model"`` or
    ``"adapter"`` (a PEFT adapter), the files fetched from the Hub; ``flag``: the option naming
    ``revision`` in messages; ``cache_only``: never ask the Hub, as offline."""
    if isinstance(name, Source):
        return name
    text = str(name)
    if revision is not None and not str(revision).strip():
        raise SvdServeError(f"{flag} is empty")
    if Path(text).expanduser().is_dir() or looks_like_path(text) or isinstance(name, Path):
        if revision is not None:
            raise SvdServeError(f"{flag} {revision} is for a Hugging Face Hub id; {text} is a local path")
        return Source(text, Path(text).expanduser())
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as e:
        raise SvdServeError(f"{text} is neither a local directory nor a valid Hugging Face Hub id: "
                            f"{str(e).splitlines()[0]}") from None
    key = (text, revision, kind, cache_dir(), os.environ.get("HF_ENDPOINT"), offline() or cache_only)
    if key in _resolved and _resolved[key].path.is_dir():
        return _resolved[key]
    source = _from_hub(text, revision, kind, flag, cache_only)
    _resolved[key] = source
    return source


def local_dir(name: str | Path | Source, revision: str | None = None, kind: str = "model") -> Path:
    """:func:`resolve`'s local directory."""
    return resolve(name, revision, kind).path


def _from_hub(repo_id: str, revision: str | None, kind: str, flag: str, cache_only: bool = False) -> Source:
    """The snapshot of ``repo_id`` at ``revision``: from the Hub when it answers, else from the cache."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None
    reason = ("offline mode is on (HF_HUB_OFFLINE=1)" if offline() else "only the cache was searched"
              if cache_only else None)
    if reason is None:  # one bounded request: snapshot_download's own look-up has no time limit
        try:
            HfApi(endpoint=endpoint).repo_info(repo_id, revision=revision, timeout=_timeout())
        except RevisionNotFoundError:
            raise SvdServeError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub ({flag})") from None
        except HfHubHTTPError as e:  # not found, gated, private without a token, the Hub down
            status = getattr(e.response, "status_code", None)
            what = "not found (or private or gated)" if status in (401, 403, 404) else f"HTTP {status}"
            reason = f"the Hugging Face Hub answers {what}"
        except Exception as e:  # noqa: BLE001 -- any network failure (connect, DNS, timeout, proxy, TLS)
            reason = f"the Hugging Face Hub is not reachable ({type(e).__name__}: {_first_line(e)})"
    path = _snapshot(repo_id, revision, kind, endpoint, local=reason is not None, reason=reason, flag=flag)
    if kind == "model" and not any(path.glob("*.safetensors")):
        path = _snapshot(repo_id, revision, "model-bin", endpoint, local=reason is not None, reason=reason,
                         flag=flag)
    return Source(repo_id, path, repo_id, revision, path.name if COMMIT.fullmatch(path.name) else None)


def _snapshot(repo_id: str, revision: str | None, kind: str, endpoint: str | None, local: bool,
              reason: str | None, flag: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, IncompleteSnapshotError, RevisionNotFoundError

    cache = cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=local,
                                      allow_patterns=PATTERNS[kind], endpoint=endpoint))
    except RevisionNotFoundError:
        raise SvdServeError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub ({flag})") from None
    except IncompleteSnapshotError as e:
        raise SvdServeError(f"{repo_id}: the cached snapshot is incomplete ({cache}); "
                            f"{reason or _first_line(e)}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:  # LocalEntryNotFoundError is an OSError
        if not local:
            raise SvdServeError(f"cannot download {repo_id}{_at(revision)} from the Hugging Face Hub: "
                                f"{_first_line(e)}") from None
    what = "model" if kind.startswith("model") else "PEFT adapter"
    cached = cached_revisions(repo_id, cache)
    if cached and revision is not None:
        raise SvdServeError(f"{repo_id} has no revision {revision!r} in the Hugging Face cache (HF_HUB_CACHE={cache}; "
                            f"cached: {', '.join(cached)}); {reason}")
    raise SvdServeError(f"{repo_id}{_at(revision)} is neither a local directory nor a {what} in the Hugging Face "
                        f"cache (HF_HUB_CACHE={cache}); {reason}")


def cached_revisions(repo_id: str, cache: str) -> list[str]:
    """The refs and commits the cache holds for ``repo_id`` (``huggingface_hub.scan_cache_dir``), for
    messages; empty where it holds none or cannot be read."""
    from huggingface_hub import scan_cache_dir

    try:
        repos = [r for r in scan_cache_dir(cache).repos if r.repo_id == repo_id and r.repo_type == "model"]
    except Exception:  # noqa: BLE001 -- no cache, or an unreadable one: nothing to list
        return []
    out = []
    for repo in repos:
        for rev in sorted(repo.revisions, key=lambda r: r.commit_hash):
            refs = ",".join(sorted(rev.refs))
            out.append(f"{refs} ({rev.commit_hash[:12]})" if refs else rev.commit_hash[:12])
    return out


def _at(revision: str | None) -> str:
    return f" at revision {revision!r}" if revision is not None else ""


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
