"""The messages between the daemon and its engine process (``hosted.py`` is
the daemon's side, ``host.py`` the engine process's).

They travel over a socket pair with multiprocessing's message framing, each a
tuple whose first item is a ``Msg``:

    daemon -> host   Load(profile, models_dir, media)     once, at start (media: the
                                                          spool's image folder and hosts)
    host -> daemon   Ready(load_seconds, capabilities, problems, max_num_seqs)
                     | LoadFailed(text, killed)           killed: vLLM's processes were
                                                          killed mid-load (a death), else
                                                          a load that failed by itself
    daemon -> host   (STREAM, sampling, window)           one stream: every running job's
                                                          requests, each with its own
                                                          job name and sampling
    host -> daemon   (WANT, n)                            send up to n more requests
    daemon -> host   (REQUESTS, [Request, ...])           an empty list: no more
                     | (HOLD,)                            none now; ask again later
    host -> daemon   (ANSWERS, [(key, body, error), ...])   every 0.1-0.25 s;
                                                          key: (job, line); an empty
                                                          bunch at least every 0.25 s
    daemon -> host   (MORE, n)                            a job joined: ask (WANT) now; the
                                                          first n given start at once
    daemon -> host   (ABORT,)                             stop this stream early
    host -> daemon   (END,) | (DEAD, text)                the stream is over
    daemon -> host   (CLOSE,) or end of file              exit
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

WANT_BATCH = 256  # requests per round trip: few messages, little read ahead


class Load(NamedTuple):
    profile: Any  # profiles.Profile
    models_dir: Path
    media: dict[str, Any]


class Ready(NamedTuple):
    load_seconds: float
    capabilities: str  # one line: what the profile's server options give on this vLLM
    problems: list[str]
    max_num_seqs: int | None  # vLLM's batch


class LoadFailed(NamedTuple):
    text: str
    killed: bool  # vLLM's processes were killed (the OOM killer): an engine death


class Msg(str, Enum):
    STREAM = "stream"
    WANT = "want"
    REQUESTS = "requests"
    HOLD = "hold"
    ANSWERS = "answers"
    MORE = "more"
    ABORT = "abort"
    END = "end"
    DEAD = "dead"
    CLOSE = "close"
