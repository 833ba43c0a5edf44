"""The messages between the daemon and its engine process (``hosted.py`` is
the daemon's side, ``host.py`` the engine process's).

They travel over a socket pair with multiprocessing's message framing, each a
tuple whose first item is a ``Msg``:

    daemon -> host   (profile, models_dir, media)         once, at start (media: the
                                                          spool's image folder and hosts)
    host -> daemon   (READY, load_seconds, (capabilities, problems), max_num_seqs)
                     | (ERROR, text)                      a load that failed by itself
                     | (DEAD, text)                       vLLM's processes killed mid-load
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

WANT_BATCH = 256  # requests per round trip: few messages, little read ahead


class Msg(str, Enum):
    READY = "ready"
    ERROR = "error"
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
