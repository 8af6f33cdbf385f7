"""Opening WebDataset tar shards wherever they are: local paths, ``http(s)://`` and the other URL schemes of
``webdataset.gopen`` (curl for http), and ``pipe:`` shell commands (``pipe:aws s3 cp s3://bucket/a.tar -``), which
run only with ``data.allow_pipe=true``.

``read_shard`` yields a shard's samples with their place in the shard. A shard that fails to download (or is cut
off, or is no tar) is opened again up to ``READ_TRIES`` times, going on after the samples it already gave; then it
follows ``data.on_bad_sample``: ``stop`` raises a ``BadSample`` naming the URL, ``skip`` warns and gives no more.
"""

from __future__ import annotations

import tarfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

from gear.data.bad_samples import BadSample, SkippedSample, not_a_sample

READ_TRIES = 3
RETRY_DELAY_S = 1.0  # times the try number
# What a failed download or a cut-off stream raises: curl's exit status (OSError), a truncated or empty tar.
READ_ERRORS = (OSError, EOFError, tarfile.TarError)


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def refuse_pipe(url: str) -> ValueError:
    return ValueError(f"webdataset shards {url!r} run a shell command: set data.allow_pipe=true if you mean it (a "
                      "config does not run commands unannounced)")


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def local_path(url: str) -> Path:
    return Path(urlparse(url).path) if url.startswith("file:") else Path(url)


def expand_shards(urls: str | list[str], allow_pipe: bool = False) -> list[str]:
    """The shard list of a brace pattern (``https://host/train-{000000..000099}.tar``) or a list of them; local
    shards must exist, a ``pipe:`` needs ``allow_pipe``, a URL needs a scheme webdataset can open."""
    import webdataset as wds
    from webdataset.gopen import gopen_schemes

    shards = list(wds.SimpleShardList(urls).urls)
    if not shards:
        raise ValueError(f"webdataset shards {urls!r}: the pattern names no shard")
    for url in shards:
        if is_pipe(url):
            if not allow_pipe:
                raise refuse_pipe(url)
        elif not is_local(url) and urlparse(url).scheme not in gopen_schemes:
            known = sorted(s for s in gopen_schemes if not s.startswith("_"))
            raise ValueError(f"webdataset shard {url!r}: unknown URL scheme; use a local path, pipe: or one of {known}")
    missing = [s for s in shards if is_local(s) and not local_path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"webdataset shard {missing[0]} not found ({len(missing)} of {len(shards)} missing)")
    return shards


class CountingStream:
    """A readable stream that counts the bytes read through it (``count``)."""

    def __init__(self, stream):
        self.stream, self.count = stream, 0

    def read(self, *args):
        data = self.stream.read(*args)
        self.count += len(data)
        return data

    def close(self) -> None:
        try:
            self.stream.close()
        except READ_ERRORS:  # curl's exit status after we stopped reading early
            pass


def _tar_samples(url: str, policy: str, counted: list[int]) -> Iterator[dict]:
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def handler(err: Exception) -> bool:
        if isinstance(err, READ_ERRORS):
            raise err
        not_a_sample(policy, f"a tar member in {url}", err)
        return True

    stream = CountingStream(gopen(url, "rb"))
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=handler), handler=handler)
    finally:
        stream.close()
        counted[0] += stream.count


def read_shard(url: str, policy: str, wanted: Callable[[int], bool] | None = None, stop_after: int | None = None,
               counted: list[int] | None = None) -> Iterator[tuple[int, dict]]:
    """(place in the shard, raw sample) for the places ``wanted`` accepts (all by default), stopping after place
    ``stop_after``; adds the bytes read to ``counted[0]``. Retries, then follows ``policy`` (module docstring)."""
    counted = counted if counted is not None else [0]
    passed, error = 0, None  # places already passed (given or not wanted): a retry goes on after them
    for attempt in range(1, READ_TRIES + 1):
        try:
            for place, sample in enumerate(_tar_samples(url, policy, counted)):
                if place < passed:
                    continue
                passed = place + 1
                if wanted is None or wanted(place):
                    yield place, sample
                if stop_after is not None and place >= stop_after:
                    return
            return
        except READ_ERRORS as err:
            error = err
            if attempt < READ_TRIES:
                time.sleep(RETRY_DELAY_S * attempt)
    # webdataset appends the stream and the URL to an error's args: the first one is the message
    message = str(error.args[0]) if error.args else ""
    reason = f"{type(error).__name__}: {message.strip().splitlines()[0]}" if message.strip() else type(error).__name__
    if policy == "stop":
        raise BadSample(url, f"shard could not be read in {READ_TRIES} tries: {reason}")
    warnings.warn(f"skipped shard {url} from sample {passed} on (could not be read in {READ_TRIES} tries: {reason}; "
                  "data.on_bad_sample=skip)", SkippedSample, stacklevel=2)
