"""Images in a job's lines (contract section 19).

Where a line's image comes from decides what happens to it:

- a ``data:image/...;base64,`` URL (or an Anthropic base64 source) is in the
  line itself and goes to vLLM as it is;
- a path relative to the job's media folder (``inbox/NAME.media/``, in
  ``work/media/JOB/`` while the job runs) is checked twice here and once by vLLM:
  at validation it must stay inside the folder (no ``..``, no absolute path, no
  symbolic link out of it, resolved with ``realpath``), name a regular file and
  start like an image (its first bytes, never decoded); when it is sent it is
  resolved again and becomes a ``file://`` URL under ``work/media/``, the one
  folder vLLM's ``allowed_local_media_path`` lets it read;
- an ``http(s)`` URL only when config's ``[media] allowed_domains`` (or the
  profile's ``[media]``) lets its host be fetched: whoever can write to the
  inbox must not make the daemon fetch arbitrary URLs;
- a ``file://`` URL only on a profile with its own ``[media] local_folder``.

Anything else is that line's ``invalid_image`` error, naming the line and the
path, before the engine sees it. vLLM reads each file when its request runs,
so a job of 100,000 images never holds more than the requests in flight.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from ..lines import LineError, Request
from ..profiles import MediaOptions

CODE = "invalid_image"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
# The first bytes of the formats vLLM's image loader (Pillow) reads.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
          (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"))


@dataclass(frozen=True)
class Ref:
    """One image of a line: where in the body (PARAM), its URL, and the dict
    and key that hold the URL (None for an Anthropic base64 source)."""

    param: str
    url: str
    holder: dict[str, Any] | None = None
    key: str = ""

    @property
    def kind(self) -> str:
        """data, remote, file, scheme (another one) or path (in the media folder)."""
        match = _SCHEME.match(self.url)
        if match is None:
            return "path"
        scheme = match.group(1).lower()
        return {"data": "data", "http": "remote", "https": "remote",
                "file": "file"}.get(scheme, "scheme")


# What describes the answer, not the input: never an image.
NOT_INPUT = frozenset({"tools", "tool_choice", "response_format", "structured_outputs",
                       "text", "metadata"})


def refs(body: dict[str, Any]) -> Iterator[Ref]:
    """Every image of a body, in prompt order, wherever vLLM's parsers would find
    one: any part with an ``image_url`` (typed ``image_url`` or ``input_image``,
    or with no type at all, as vLLM's chat parser takes it), and Anthropic's
    ``image`` blocks, tool results' included."""
    for key, value in body.items():
        if key not in NOT_INPUT:
            yield from _walk(value, key)


def _walk(value: Any, where: str) -> Iterator[Ref]:
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, f"{where}.{i}")
        return
    if not isinstance(value, dict):
        return
    image = value.get("image_url")
    if isinstance(image, dict) and isinstance(image.get("url"), str):
        yield Ref(f"{where}.image_url.url", image["url"], image, "url")
    elif isinstance(image, str):
        yield Ref(f"{where}.image_url", image, value, "image_url")
    source = value.get("source")
    if value.get("type") == "image" and isinstance(source, dict):  # Anthropic's block
        if isinstance(source.get("url"), str):
            yield Ref(f"{where}.source.url", source["url"], source, "url")
        elif source.get("type") == "base64":
            yield Ref(f"{where}.source", f"data:{source.get('media_type')};base64,")
    for key, item in value.items():
        if isinstance(item, (dict, list)) and key not in ("image_url", "source"):
            yield from _walk(item, f"{where}.{key}")


def local_files(value: Any, where: str = "") -> Iterator[str]:
    """Where in VALUE a string names a local file (``file:``): an image part's
    URL, audio, video or a field no walk above knows. vLLM would read it under
    its allowed folder, which holds every running job's pictures."""
    if isinstance(value, str):
        if value.lstrip()[:5].lower() == "file:":
            yield where
        return
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if not (where == "" and key in NOT_INPUT):
            yield from local_files(item, f"{where}.{key}" if where else str(key))


def count(body: dict[str, Any], allowed_domains: list[str] | None = None) -> int:
    """BODY's images; with ALLOWED_DOMAINS, 0 for a line with an image batchd
    refuses whatever the profile (file://, another scheme, a host not allowed)."""
    found = list(refs(body))
    if allowed_domains is not None and any(
            ref.kind in ("file", "scheme") or ref.kind == "remote" and
            (urlsplit(ref.url).hostname or "").lower() not in
            {d.lower() for d in allowed_domains}
            for ref in found):
        return 0
    return len(found)


def _error(item: Request, param: str, message: str) -> LineError:
    return LineError(item.line, item.custom_id, CODE, f"line {item.line}: {message}", param,
                     anthropic=item.anthropic)


def check(item: Request, folder: Path | None) -> LineError | None:
    """Validation: the first image path of ITEM that is not an image inside
    FOLDER (the job's media folder, None when none came)."""
    for ref in refs(item.body):
        if ref.kind == "path":
            found = resolve(folder, ref.url)
            if isinstance(found, str):
                return _error(item, ref.param, found)
    return None


def resolve(folder: Path | None, path: str) -> Path | str:
    """The real file PATH names inside FOLDER, or why it is not an image there."""
    shown = repr(path)
    if folder is None:
        return f"image {shown}: no media folder came with the file (drop NAME.media/ " \
               "before NAME.jsonl)"
    if not path or path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path):
        return f"image {shown} is an absolute path; give a path inside the media folder"
    if ".." in re.split(r"[/\\]", path):
        return f"image {shown} leaves the media folder (..)"
    try:
        os.fsencode(path)
        root = os.path.realpath(folder)
        real = os.path.realpath(os.path.join(root, path))
    except (ValueError, UnicodeError):  # a NUL byte, a lone surrogate
        return f"image {shown} is not a valid file name"
    if not real.startswith(root + os.sep):
        return f"image {shown} is a symbolic link out of the media folder"
    try:
        st = os.stat(real)
    except OSError:
        return f"image {shown} is not in the media folder"
    if not stat.S_ISREG(st.st_mode):
        return f"image {shown} is not a regular file"
    why = sniff(Path(real))
    if why:
        return f"image {shown} {why}"
    return Path(real)


def sniff(path: Path) -> str | None:
    """Why PATH's first bytes are not an image's (None: they are)."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(16)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return None
    if any(head.startswith(magic) for magic, _ in _MAGIC) and len(head) >= 8:
        return None
    return "is not an image (not PNG, JPEG, GIF, WebP, BMP or TIFF)"


def for_engine(item: Request, folder: Path | None, media: MediaOptions,
               allowed_domains: list[str]) -> Request | LineError:
    """ITEM as it goes to vLLM: its media-folder paths as file:// URLs (resolved
    again), or the line's invalid_image error for an image it may not read."""
    found = list(refs(item.body))
    if not media.local_folder:
        for where in local_files(item.body):
            return _error(item, where, f"{where}: file:// URLs are not read; put the "
                          "image in the media folder and give its path there")
    if not found:
        return item
    domains = {d.lower() for d in allowed_domains}
    local: dict[str, Path] = {}
    for ref in found:
        kind = ref.kind
        if ref.holder is not None and "uuid" in ref.holder or "uuid" in _part(item.body,
                                                                              ref.param):
            return _error(item, ref.param, "an image's uuid is not taken: images share "
                          "the engine's cache with other jobs by their bytes only")
        if kind == "remote":
            host = (urlsplit(ref.url).hostname or "").lower()
            if host not in domains and not (
                    media.allow_remote and (not media.allowed_domains
                                            or host in media.allowed_domains)):
                return _error(item, ref.param, f"image {ref.url[:200]!r}: {host or 'a host'} "
                              "is not in [media] allowed_domains; remote images are not "
                              "fetched (send a data: URL or a file in the media folder)")
        elif kind == "scheme":
            return _error(item, ref.param, f"image {ref.url[:200]!r}: not a data:, http(s) "
                          "URL or a path in the media folder")
        elif kind == "path":
            if media.local_folder:
                return _error(item, ref.param, f"image {ref.url!r}: this profile reads "
                              "local images from its [media] local_folder only")
            path = resolve(folder, ref.url)
            if isinstance(path, str):
                return _error(item, ref.param, path)
            local[ref.param] = path
    if not local:
        return item
    body = copy.deepcopy(item.body)
    for ref in refs(body):
        if ref.param in local and ref.holder is not None:
            ref.holder[ref.key] = local[ref.param].as_uri()
    return replace(item, body=body)


def _part(body: dict[str, Any], param: str) -> dict[str, Any]:
    """The content part that holds the image at PARAM (its own dict)."""
    node: Any = body
    for step in param.split("."):
        if step in ("image_url", "source", "url"):
            break
        node = node[int(step)] if isinstance(node, list) else node.get(step)
        if not isinstance(node, (dict, list)):
            return {}
    return node if isinstance(node, dict) else {}


def cache_body(body: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    """BODY for the result cache's key: a file of the media folder stands as the
    hash of its bytes, not its name (the same picture under two names is one
    request; two pictures under one name in two jobs are two)."""
    if folder is None:
        return body
    prefix = Path(os.path.realpath(folder)).as_uri() + "/"
    local = [ref for ref in refs(body) if ref.url.startswith(prefix)]
    if not local:
        return body
    body = copy.deepcopy(body)
    for ref in refs(body):
        if ref.holder is not None and ref.url.startswith(prefix):
            ref.holder[ref.key] = "sha256:" + _digest(ref.url)
    return body


def _digest(uri: str) -> str:
    from urllib.request import url2pathname

    digest = hashlib.sha256()
    with open(url2pathname(urlsplit(uri).path), "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
