"""The input URI grammar of ``edgead-run``, as its --help prints it. A module of its own, without
OpenCV, so that the CLI can build its parser (and take signals) before the heavy imports."""

URI_HELP = """\
input URIs (jetson-inference grammar):
  --camera N | v4l2:///dev/videoN   USB/V4L2 camera /dev/videoN through OpenCV's V4L2 backend.
                                    NOTE: jetson-utils reads a bare `0` as a CSI camera; edgead
                                    reads `--camera 0` as /dev/video0. Use csi://0 for CSI.
  csi://N                           MIPI CSI sensor N (nvarguscamerasrc GStreamer pipeline; needs an
                                    OpenCV built with GStreamer: JetPack's system OpenCV)
  rtsp://user:pass@host:port/path   network stream (FFmpeg), live
  file://clip.mp4 | clip.mp4        video file; ends at end of stream (see --input-loop)
  DIR | 'parts/*.png'               image folder or quoted glob, sorted by name
  synthetic://CATEGORY[?size=256&seed=0&defect_rate=0.3&rate=30]
                                    endless synthetic conveyor with ground truth (fabric, metal,
                                    wood, washer, pcb); rate=0 (default) = read on demand,
                                    rate=N = a live N fps camera stand-in (drops under overload)
"""
