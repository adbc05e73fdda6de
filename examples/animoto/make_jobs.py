"""Make the Animoto workload: N video jobs of M generated images each.

    python examples/animoto/make_jobs.py --jobs 160 --images 60 --size 1920x1080 -o videos.txt
    python client.py -w videos.txt --outputs out/
    python examples/animoto/validate.py --images 60 --size 1920x1080 out/*/video.mp4

Each job's images (a numbered frame on a gradient, made with Pillow) go to
IMAGES/job_NNNN/frame_NNNN.png (IMAGES defaults to <output>-images beside the output
file). Each line of the output is a JSON job description: make_video.sh and the
images in, video.mp4 out. With --serve, the images are served from a loopback HTTP
server instead, the jobs fetch them by URL (as the original workload did), and the
program keeps serving until interrupted.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import sys
import threading
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent


def frame(width: int, height: int, job: int, number: int) -> Image.Image:
    """A gradient in the job's own colours with the frame number on it."""
    ramp = Image.linear_gradient("L").resize((width, height))
    tint = ((job * 53) % 256, (number * 7) % 256, 255 - (job * 29) % 256)
    image = Image.merge("RGB", [ramp.point(lambda v, c=c: (v * c) // 255) for c in tint])
    font = ImageFont.load_default(size=max(12, height // 6))
    ImageDraw.Draw(image).text((width // 10, height // 3), f"{job}:{number}", fill="white", font=font)
    return image


def make_images(root: Path, jobs: int, images: int, width: int, height: int) -> list[list[Path]]:
    paths = []
    for job in range(jobs):
        folder = root / f"job_{job:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths.append([])
        for number in range(1, images + 1):
            path = folder / f"frame_{number:04d}.png"
            if not path.exists():
                frame(width, height, job, number).save(path)
            paths[-1].append(path)
    return paths


def job_line(inputs: list[str]) -> str:
    return json.dumps({"executable": "make_video.sh", "input_sandbox": [str(HERE / "make_video.sh"), *inputs],
                       "output_sandbox": ["video.mp4"]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_jobs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=160, help="videos to make (default: 160)")
    parser.add_argument("--images", type=int, default=60, help="images per video (default: 60)")
    parser.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT of the images (default: 1920x1080)")
    parser.add_argument("-o", "--output", required=True, help="the workload file to write")
    parser.add_argument("--images-dir", help="where the images go (default: <output>-images)")
    parser.add_argument("--serve", type=int, metavar="PORT",
                        help="serve the images on 127.0.0.1:PORT (0: any) and make jobs fetch them by URL")
    args = parser.parse_args(argv)
    try:
        width, height = (int(n) for n in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size {args.size!r} is not WIDTHxHEIGHT")
    if width % 2 or height % 2 or width < 16 or height < 16 or args.jobs < 1 or args.images < 1:
        parser.error("sizes are even and at least 16; --jobs and --images at least 1")
    output = Path(args.output).resolve()
    root = Path(args.images_dir).resolve() if args.images_dir else output.with_name(output.stem + "-images")
    paths = make_images(root, args.jobs, args.images, width, height)
    server = None
    if args.serve is not None:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
        server = http.server.ThreadingHTTPServer(("127.0.0.1", args.serve), handler)
        base = f"http://127.0.0.1:{server.server_address[1]}"
        lines = [job_line([f"{base}/{p.relative_to(root).as_posix()}" for p in job]) for job in paths]
    else:
        lines = [job_line([str(p) for p in job]) for job in paths]
    output.write_text("\n".join(lines) + "\n")
    print(f"{args.jobs} jobs of {args.images} images ({width}x{height}) in {output}", flush=True)
    if server is not None:
        print(f"serving images on {base} (Ctrl-C to stop)", flush=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            thread.join()
        except KeyboardInterrupt:
            server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
