"""Which threads of one process a py-spy profile caught, and where: the share of its samples
by thread, each with its hottest frames: the innermost of our code, else of PyTriton, zmq, asyncio or torch.

With ``--gil`` profiles (``serving_overhead.py --profile-with``, odd rounds) a thread's share is
how long it held the GIL: in the engine's process every share that is not the engine's thread
is time its kernel launches could not run.

    python benchmarks/profile_threads.py PROFILE.txt --pid SERVER_PID [--top 6]
"""

from __future__ import annotations

import argparse
import collections
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# py-spy's raw format: one stack per line, "process P:cmd;thread (T): name;frame;...;frame COUNT",
# with a "process" frame for each parent when it samples subprocesses.
_PROCESS_FRAME = re.compile(r"process (\d+):")
_THREAD_FRAME = re.compile(r"thread \(\d+\): ?(.*)")
_ENGINE_FRAME = "pytest_mtserve/server/engine.py"
_OUR_FRAMES = ("pytest_mtserve",)
_LIBRARY_FRAMES = ("pytriton", "zmq", "asyncio", "torch", "megatron")


@dataclass(frozen=True)
class ThreadShare:
    name: str
    samples: int
    share: float  # of the process's samples
    hottest: tuple[tuple[str, int], ...]  # innermost frame of interest, samples


def thread_shares(lines: Iterable[str], pid: int, top_frames: int = 3) -> list[ThreadShare]:
    """Threads of process ``pid`` by samples, most first (a thread pool's threads together)."""
    samples: collections.Counter[str] = collections.Counter()
    frames: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not count.isdigit():
            continue
        parts = stack.split(";")
        processes = [match.group(1) for part in parts if (match := _PROCESS_FRAME.match(part))]
        if not processes or processes[-1] != str(pid):
            continue
        thread = next((match.group(1) for part in parts if (match := _THREAD_FRAME.match(part))), "?")
        # "inference_handler-0" and "-1" are one role, each taking turns in the engine
        name = re.sub(r"-(\d+|[0-9a-f]{4,})(?=-|$)", "-*", thread) or "?"
        if any(_ENGINE_FRAME in part for part in parts):
            name += " (in the engine)"
        samples[name] += int(count)
        code = [part for part in parts if not (_PROCESS_FRAME.match(part) or _THREAD_FRAME.match(part))]
        # our innermost frame says which step of a batch it is; else the library's says what waits
        for markers in (_OUR_FRAMES, _LIBRARY_FRAMES):
            if of_interest := [part for part in code if any(marker in part for marker in markers)]:
                frames[name][of_interest[-1]] += int(count)
                break
    total = sum(samples.values())
    return [
        ThreadShare(name, count, count / total, tuple(frames[name].most_common(top_frames)))
        for name, count in samples.most_common()
    ]


def format_shares(shares: list[ThreadShare], top: int) -> str:
    lines = []
    for share in shares[:top]:
        lines.append(f"  {100 * share.share:5.1f} %  {share.samples:6d}  {share.name}")
        lines.extend(f"                    {count:6d}  {frame[:110]}" for frame, count in share.hottest)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--pid", type=int, required=True, help="the process whose threads to show")
    parser.add_argument("--top", type=int, default=6, help="threads shown (default: 6)")
    args = parser.parse_args()
    with args.profile.open(errors="replace") as profile:
        shares = thread_shares(profile, args.pid)
    if not shares:
        raise SystemExit(f"{args.profile} holds no samples of process {args.pid}")
    print(format_shares(shares, args.top))


if __name__ == "__main__":
    main()
