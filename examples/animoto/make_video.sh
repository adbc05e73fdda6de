#!/bin/sh
# Make video.mp4: a slideshow of the frame_NNNN.png images in the current directory.
# ffmpeg comes from the imageio-ffmpeg package (it ships the binary): no system install.
set -eu
ffmpeg=$(python3 -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())')
exec "$ffmpeg" -nostdin -v error -y -framerate "${FPS:-10}" -i frame_%04d.png \
    -c:v libx264 -preset veryfast -pix_fmt yuv420p video.mp4
