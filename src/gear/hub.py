"""Hub references: ``hf://OWNER/REPO[@REVISION][/PATH]`` fetched into the Hugging Face cache, opt-in.

A released checkpoint file is named by its path in the repository (``hf://BinLin203/GEAR-VQ/gear-vq.pt``); a
model directory by the repository (``hf://OWNER/REPO``) or a folder in it (``hf://OWNER/REPO/tokenizer``). The
revision, when given, follows the repository name as in the Hub's own URIs (``hf://OWNER/REPO@v1.0/file.pt``,
``@refs/pr/3``, a commit hash); the default is ``main``.

``resolve`` returns any other path unchanged: nothing is ever fetched unless a Hub reference was given. Fetching
goes through ``huggingface_hub`` (``hf_hub_download``, ``snapshot_download``) into its standard cache
(``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), so a file fetched once, by this project or by
``hf download``, is read from there afterwards. With ``HF_HUB_OFFLINE=1`` only the cache is read. An uncached,
missing or unreachable file is one line naming it and the command that fetches it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

SCHEME = "hf://"
# What a model directory holds (pretrained.py), at the top of the repository or in a folder of it; everything
# else in a repository (training checkpoints, samples) is left on the Hub.
MODEL_DIR_FILES = ("config.json", "model.safetensors", "README.md")

P = TypeVar("P", str, os.PathLike)


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://`` reference to a model repository (datasets and spaces are not model sources)."""

    repo_id: str              # OWNER/REPO
    path: str = ""            # a file or folder in the repository; "" is the repository itself
    revision: str | None = None

    @property
    def is_file(self) -> bool:
        """A path whose last part has a suffix names a file (``gear-vq.pt``); otherwise a model directory."""
        return bool(self.path) and bool(PurePosixPath(self.path).suffix)

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{SCHEME}{self.repo_id}{rev}{'/' + self.path if self.path else ''}"

    def download_command(self) -> str:
        """The Hub CLI command that puts this reference into the cache."""
        rev = f" --revision {self.revision}" if self.revision else ""
        if self.is_file:
            return f"hf download {self.repo_id} {self.path}{rev}"
        folder = f"{self.path}/" if self.path else ""
        files = " ".join(f"--include '{folder}{name}' --include '{folder}*/{name}'" for name in MODEL_DIR_FILES[:2])
        return f"hf download {self.repo_id}{rev} {files}"


def is_hub_ref(path: object) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


def parse(ref: str) -> HubRef:
    """``hf://OWNER/REPO[@REVISION][/PATH]`` -> HubRef; a malformed reference is a ValueError (one line)."""
    if not is_hub_ref(ref):
        raise ValueError(f"{ref!r} is not a Hub reference: expected {SCHEME}OWNER/REPO[@REVISION][/PATH]")
    body = ref[len(SCHEME):]
    parts = body.split("/")
    if parts[0] in ("datasets", "spaces", "buckets", "kernels"):
        raise ValueError(f"{ref}: only model repositories hold gear models; use {SCHEME}OWNER/REPO[/PATH]")
    if parts[0] == "models":  # the explicit type prefix of the Hub's URIs
        parts = parts[1:]
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"{ref}: expected {SCHEME}OWNER/REPO[@REVISION][/PATH in the repository]")
    owner, name = parts[0], parts[1]
    rest = parts[2:]
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
        if revision == "refs" and len(rest) >= 2 and rest[0] in ("pr", "convert"):  # refs/pr/3, refs/convert/x
            revision, rest = f"refs/{rest[0]}/{rest[1]}", rest[2:]
        if not revision:
            raise ValueError(f"{ref}: empty revision after '@'")
    if any("@" in p for p in rest):
        raise ValueError(f"{ref}: the revision goes after the repository name, as in "
                         f"{SCHEME}{owner}/{name}@REVISION/{'/'.join(rest).split('@')[0]}")
    if any(p in ("", ".", "..") for p in rest):
        raise ValueError(f"{ref}: the path in the repository has an empty, '.' or '..' part")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(f"{owner}/{name}")
    except HFValidationError as err:
        raise ValueError(f"{ref}: {str(err).splitlines()[0]}") from None
    return HubRef(f"{owner}/{name}", "/".join(rest), revision)


def resolve(path: P) -> P | Path:
    """A local path for ``path``: a Hub reference is fetched (or found in the cache) and its local copy returned;
    anything else is returned unchanged, without touching the network."""
    if not is_hub_ref(path):
        return path
    from huggingface_hub import constants

    return _fetch_once(parse(path), constants.HF_HUB_CACHE, bool(constants.HF_HUB_OFFLINE))


@functools.lru_cache(maxsize=64)
def _fetch_once(ref: HubRef, cache: str, offline: bool) -> Path:
    # a loader may resolve the same reference twice (config, then weights): one Hub request per process
    return fetch(ref)


def fetch(ref: HubRef) -> Path:
    """The cached local copy of ``ref`` (a file, or a model directory), fetched when not cached and not offline."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = bool(constants.HF_HUB_OFFLINE)
    fetch_it = f"fetch it with `{ref.download_command()}`"
    try:
        if ref.is_file:
            return Path(hf_hub_download(ref.repo_id, ref.path, revision=ref.revision, local_files_only=offline))
        folder = f"{ref.path}/" if ref.path else ""
        patterns = [f"{folder}{name}" for name in MODEL_DIR_FILES] + [f"{folder}*/{name}" for name in MODEL_DIR_FILES]
        snapshot = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns,
                                          local_files_only=offline))
        local = snapshot / ref.path if ref.path else snapshot
        if not local.is_dir():
            raise FileNotFoundError(f"{ref}: the repository has no folder {ref.path!r} at revision "
                                    f"{ref.revision or 'main'}")
        return local
    except LocalEntryNotFoundError:  # before EntryNotFoundError: it is one
        where = constants.HF_HUB_CACHE
        if offline:
            raise FileNotFoundError(f"{ref} is not in the Hugging Face cache ({where}) and HF_HUB_OFFLINE=1: "
                                    f"{fetch_it} where the Hub is reachable, or unset HF_HUB_OFFLINE") from None
        raise FileNotFoundError(f"{ref} is not in the Hugging Face cache ({where}) and the Hub could not be "
                                f"reached: {fetch_it} once the network is up") from None
    except GatedRepoError:
        raise FileNotFoundError(f"{ref}: {ref.repo_id} is gated: accept its terms on https://huggingface.co/"
                                f"{ref.repo_id}, log in with `hf auth login`, then {fetch_it}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{ref}: no model repository {ref.repo_id} on the Hugging Face Hub (or it is "
                                "private: log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{ref}: {ref.repo_id} has no revision {ref.revision!r}; see "
                                f"https://huggingface.co/{ref.repo_id}/tree/main") from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"{ref}: {ref.repo_id} has no file {ref.path!r} at revision {ref.revision or 'main'}; "
                                f"see https://huggingface.co/{ref.repo_id}/tree/{ref.revision or 'main'}") from None
    except HfHubHTTPError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"{ref}: the Hub answered {first}; {fetch_it} to see more") from None
