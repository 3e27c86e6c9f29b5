"""Write uint8 frames to a real video file with PyAV (tests, synthetic data, transcoding)."""

import av
import numpy as np

# codec name -> (PyAV encoder, pixel format)
CODECS = {
    "h264": ("libx264", "yuv420p"),
    "mpeg4": ("mpeg4", "yuv420p"),
    "vp8": ("libvpx", "yuv420p"),
    "vp9": ("libvpx-vp9", "yuv420p"),
    "mjpeg": ("mjpeg", "yuvj420p"),
}


def write_video(path, frames, fps=25, codec="h264", gop=None, crf=None):
    """Encode frames `(T, H, W, 3)` uint8 RGB to `path` (container from the extension).

    `gop` sets the keyframe interval (short GOPs make random access cheap);
    `crf` the quality for libx264/libvpx (lower is better).
    """
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape}")
    encoder, pix_fmt = CODECS[codec]
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height = width - width % 2, height - height % 2
        stream.pix_fmt = pix_fmt
        options = {}
        if gop is not None:
            stream.codec_context.gop_size = gop
            if encoder == "libx264":
                options["keyint_min"] = str(gop)
        if crf is not None and encoder in ("libx264", "libvpx", "libvpx-vp9"):
            options["crf"] = str(crf)
        if encoder == "libx264":
            options.setdefault("preset", "veryfast")
        if encoder.startswith("libvpx"):
            options.update({"deadline": "realtime", "cpu-used": "8"})
            options.setdefault("b", "0" if crf is not None else "1M")
        stream.options = options
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(frame[: stream.height, : stream.width], format="rgb24")
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))
    return path
