"""Work units of an inference pass over a split's shards (``vtd evaluate``, ``vtd predict``).

One unit per det / seg shard; tracking videos grouped by the shard they start in (a unit reads
on into the next shards for a video that continues there), so that every video is tracked by
one worker from its first frame to its last. Units, their order and the frames of each depend
only on the data.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Final

from data_pipeline.loading.decode import DecodedFrame, decode_clip
from data_pipeline.errors import DataError
from data_pipeline.loading.loader import ShardFamily, iter_shard
from data_pipeline.shards.format import CLIP_MEMBER

__all__ = ["SET_ORDER", "WorkUnit", "chunks", "plan_units", "scan_track_shard", "video_clips", "video_frames", "with_next"]

#: Order of the image sets in unit planning and in overlay selection.
SET_ORDER: Final = ("det", "seg", "track")


@dataclass(frozen=True)
class WorkUnit:
    """A piece of the split that one worker evaluates.

    ``urls``: the shards to read, in order. ``videos`` (tracking set only): ``(video, clips)``
    of the videos this unit owns and how many clips each has; clips of other videos in these
    shards are skipped. ``overlays``: how many overlay frames this unit renders.
    """

    set_name: str
    index: int
    urls: tuple[str, ...]
    videos: tuple[tuple[str, int], ...] = ()
    overlays: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return SET_ORDER.index(self.set_name), self.index



def _clip_header(sample: dict, url: str) -> tuple[str, int]:
    """``(video, first frame_index)`` of a tracking clip, from its ``clip.json`` (no decoding)."""
    where = f"{url}:{sample.get('__key__', '?')}"
    try:
        frames = json.loads(sample[CLIP_MEMBER])["frames"]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(where, f"unreadable clip header: {e!r}", field=CLIP_MEMBER) from None
    videos = {f.get("video") for f in frames}
    if len(videos) != 1 or not isinstance(next(iter(videos)), str) or not frames:
        raise DataError(where, f"a tracking clip must hold frames of exactly one video, got {sorted(map(str, videos))}", field="video")
    index = frames[0].get("frame_index")
    if not isinstance(index, int):
        raise DataError(where, f"frame_index must be an integer, got {index!r}", frame=frames[0].get("name"), field="frame_index")
    return next(iter(videos)), index


def scan_track_shard(url: str) -> list[str]:
    """The video of every clip of a tracking shard, in shard order (reads the headers only)."""
    return [_clip_header(s, url)[0] for s in iter_shard(url)]


def plan_units(families: list[ShardFamily], track_videos: list[list[str]] | None, overlays: int) -> list[WorkUnit]:
    """Units in a fixed order: one per det / seg shard; tracking videos grouped by the shard
    they start in (``track_videos[i]``: the clip videos of track shard ``i``, from
    :func:`scan_track_shard`). Overlay frames are shared out over the sets round-robin
    (track, det, seg) and given to each set's first unit (the track quota to every track unit)."""
    units: list[WorkUnit] = []
    by_set = {f.set_name: f for f in families}
    for s in SET_ORDER:
        fam = by_set.get(s)
        if fam is None:
            continue
        if s != "track":
            units += [WorkUnit(s, i, (u,)) for i, u in enumerate(fam.urls)]
            continue
        assert track_videos is not None and len(track_videos) == len(fam.urls)
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        clips: Counter = Counter()
        for i, vids in enumerate(track_videos):
            for v in vids:
                first.setdefault(v, i)
                last[v] = i
                clips[v] += 1
        starts: dict[int, list[str]] = defaultdict(list)
        for v, i in first.items():
            starts[i].append(v)
        for i in sorted(starts):
            vids = sorted(starts[i])
            end = max(last[v] for v in vids)
            units.append(WorkUnit("track", i, tuple(fam.urls[i : end + 1]), tuple((v, clips[v]) for v in vids)))
    # overlays: round-robin over the sets present, track first (it shows tracks and flow)
    present = [s for s in ("track", "det", "seg") if any(u.set_name == s for u in units)]
    quota: Counter = Counter()
    for k in range(max(0, overlays)):
        if present:
            quota[present[k % len(present)]] += 1
    out = []
    for u in units:
        # every track unit renders the track quota: a unit's videos may have no flow pair (box
        # tracking only) and the driver keeps the first frames with flow (evaluate.py)
        q = quota[u.set_name] if u.set_name == "track" else quota.pop(u.set_name, 0)
        out.append(WorkUnit(u.set_name, u.index, u.urls, u.videos, q) if q else u)
    return out


def chunks(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def with_next(frames: Iterator[DecodedFrame]) -> Iterator[tuple[DecodedFrame, DecodedFrame | None]]:
    prev = None
    for f in frames:
        if prev is not None:
            yield prev, f
        prev = f
    if prev is not None:
        yield prev, None


def video_clips(unit: WorkUnit) -> Iterator[tuple[str, list[dict]]]:
    """The raw clips of each video of a track unit, videos sorted, clips in frame order."""
    want = dict(unit.videos)
    got: dict[str, list[tuple[int, dict]]] = {v: [] for v in want}
    remaining = sum(want.values())
    for url in unit.urls:
        with contextlib.closing(iter_shard(url)) as samples:
            for sample in samples:
                video, first = _clip_header(sample, url)
                if video in got:
                    got[video].append((first, sample))
                    remaining -= 1
                    if remaining == 0:
                        break
        if remaining == 0:
            break
    for video in sorted(want):
        if len(got[video]) != want[video]:
            raise DataError(", ".join(unit.urls), f"video {video!r}: expected {want[video]} clips, found {len(got[video])} "
                            "(the shards changed since they were scanned?)")
        yield video, [s for _, s in sorted(got[video], key=lambda fs: fs[0])]


def video_frames(video: str, clips: list[dict]) -> Iterator[DecodedFrame]:
    """Decoded frames of one video in increasing ``frame_index`` (one clip decoded at a time)."""
    last = None
    for sample in clips:
        for f in decode_clip(sample):
            index = f.record.get("frame_index")
            if not isinstance(index, int) or (last is not None and index <= last):
                raise DataError(str(sample.get("__url__", "?")), f"video {video!r}: frame_index {index!r} after {last!r} "
                                "(tracking frames must be unique and ordered)", frame=f.record.get("name"), field="frame_index")
            last = index
            yield f
