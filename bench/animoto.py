"""The Animoto experiment: image sets into videos, CloudKon against xargs -P on the same machine.

    python bench/animoto.py                          # 160 jobs x 60 images, 640x360, 2 workers, 3 rounds
    python bench/animoto.py --jobs 20 --images 30 --rounds 1

Needs the animoto extra (pip install -e '.[animoto]').  Makes the images once (not
timed), then in each round, in alternating order:
  cloudkon  client.py --local N -w videos.txt --outputs DIR: every job in a sandbox of
            its own (inputs hard-linked in, video.mp4 moved out), as a user runs it;
  xargs     the same make_video.sh in each job's image folder, xargs -P N, the
            video moved out: the same ffmpeg work with no framework at all.
Reports videos per minute (median of the rounds) and the ratio, checks every video
of the last round with examples/animoto/validate.py, and writes
bench/results/animoto.md.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANIMOTO = ROOT / "examples" / "animoto"
sys.path.insert(0, str(ROOT / "bench"))
from local import machine  # noqa: E402


def run_cloudkon(workload: Path, out: Path, workers: int) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "client.py"), "--local", str(workers), "-q",
                    "-w", str(workload), "--outputs", str(out)], check=True)
    return time.monotonic() - start


def run_xargs(folders: list[Path], out: Path, workers: int) -> float:
    out.mkdir(parents=True)
    script = shlex.quote(str(ANIMOTO / "make_video.sh"))
    commands = "".join(f"cd {shlex.quote(str(folder))} && sh {script} && "
                       f"mkdir {target} && mv video.mp4 {target}\n"
                       for i, folder in enumerate(folders) if (target := shlex.quote(str(out / str(i)))))
    path = Path(sys.executable).parent  # python3 with imageio-ffmpeg first, as CloudKon's workers have it
    start = time.monotonic()
    subprocess.run(["xargs", "-d", "\n", "-n", "1", "-P", str(workers), "sh", "-c"], input=commands.encode(),
                   check=True, env={"PATH": f"{path}:/usr/bin:/bin"})
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=160)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--report", default=str(ROOT / "bench" / "results" / "animoto.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cloudkon-animoto-") as scratch:
        work = Path(scratch)
        start = time.monotonic()
        subprocess.run([sys.executable, str(ANIMOTO / "make_jobs.py"), "--jobs", str(args.jobs), "--images",
                        str(args.images), "--size", args.size, "-o", str(work / "videos.txt")], check=True)
        print(f"images made in {time.monotonic() - start:.0f} s (not timed below)", flush=True)
        folders = [work / "videos-images" / f"job_{i:04d}" for i in range(args.jobs)]
        times: dict[str, list[float]] = {"cloudkon": [], "xargs": []}
        for round_number in range(args.rounds):
            order = ["cloudkon", "xargs"] if round_number % 2 == 0 else ["xargs", "cloudkon"]
            for system in order:
                out = work / f"out-{system}-{round_number}"
                seconds = (run_cloudkon(work / "videos.txt", out, args.workers) if system == "cloudkon"
                           else run_xargs(folders, out, args.workers))
                times[system].append(seconds)
                print(f"round {round_number + 1} {system}: {seconds:.1f} s, "
                      f"{args.jobs / seconds * 60:.1f} videos/min", flush=True)
        last = args.rounds - 1
        for system in times:
            videos = [str(work / f"out-{system}-{last}" / str(i) / "video.mp4") for i in range(args.jobs)]
            check = subprocess.run([sys.executable, str(ANIMOTO / "validate.py"), "--images",
                                    str(args.images), "--size", args.size, *videos],
                                   capture_output=True, text=True)
            print(f"{system}: {check.stdout.splitlines()[-1]}", flush=True)
            if check.returncode != 0:
                print(check.stdout, file=sys.stderr)
                return 1
    rate = {system: args.jobs / statistics.median(seconds) * 60 for system, seconds in times.items()}
    ratio = rate["cloudkon"] / rate["xargs"]
    lines = [
        "# The Animoto experiment",
        "",
        f"Machine: {machine()}.",
        f"{args.jobs} jobs of {args.images} images ({args.size}), {args.workers} workers, "
        f"median of {args.rounds} rounds (order alternating), every video of the last round validated.",
        "",
        "| system | videos/min | seconds per round |",
        "| --- | ---: | --- |",
        *(f"| {system} | {rate[system]:.1f} | {', '.join(f'{s:.1f}' for s in times[system])} |"
          for system in times),
        "",
        f"CloudKon / xargs: **{ratio:.3f}** (target >= 0.9).",
    ]
    Path(args.report).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
