"""Check Animoto videos: each decodes cleanly and has the expected frames and size.

    python examples/animoto/validate.py --images 60 --size 640x360 out/*/video.mp4

Prints one line per video; exit code 0 if every one is valid, 1 otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import imageio_ffmpeg


def problems(path: str, frames: int, size: tuple[int, int]) -> list[str]:
    """What is wrong with the video at ``path`` (nothing: an empty list)."""
    decode = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", path,
                             "-f", "null", "-"], capture_output=True, text=True)
    if decode.returncode != 0 or decode.stderr.strip():
        return [f"does not decode: {decode.stderr.strip()[:200] or decode.returncode}"]
    found = []
    counted, _ = imageio_ffmpeg.count_frames_and_secs(path)
    if counted != frames:
        found.append(f"{counted} frames, not {frames}")
    reader = imageio_ffmpeg.read_frames(path)
    meta = next(reader)
    reader.close()
    if tuple(meta["size"]) != size:
        found.append(f"{meta['size'][0]}x{meta['size'][1]}, not {size[0]}x{size[1]}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="validate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, required=True, help="frames each video must have")
    parser.add_argument("--size", required=True, help="WIDTHxHEIGHT each video must have")
    parser.add_argument("videos", nargs="+")
    args = parser.parse_args(argv)
    size = tuple(int(n) for n in args.size.lower().split("x"))
    bad = 0
    for video in args.videos:
        found = problems(video, args.images, size)  # type: ignore[arg-type]
        bad += bool(found)
        print(f"{video}: {'; '.join(found) if found else 'ok'}")
    print(f"{len(args.videos) - bad} of {len(args.videos)} videos valid")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
