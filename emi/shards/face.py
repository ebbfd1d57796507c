"""One face box per clip with OpenCV's Haar frontal-face detector (`--face-crop opencv`).

Per clip: detect on up to DETECT_FRAMES evenly spaced frames (downscaled so the short side is DETECT_SHORT_SIDE),
keep the largest face of each frame, take the median centre and size over those frames (steady through the
clip), and make a square MARGIN times the face, clamped to the frame.
"""
from __future__ import annotations

import numpy as np

from emi.errors import UsageError

DETECT_FRAMES = 8
DETECT_SHORT_SIDE = 240
MARGIN = 1.25
HAAR_CASCADE = "haarcascade_frontalface_default.xml"


def load_face_detector():
    """The Haar cascade, or a UsageError that says what to install."""
    try:
        import cv2
    except ImportError:
        raise UsageError("--face-crop opencv needs OpenCV: pip install 'opencv-python-headless>=4.9,<5'") from None
    if not hasattr(cv2, "CascadeClassifier"):
        raise UsageError(f"--face-crop opencv needs OpenCV's Haar cascades, which OpenCV {cv2.__version__} does "
                         "not ship: pip install 'opencv-python-headless>=4.9,<5'")
    detector = cv2.CascadeClassifier(cv2.data.haarcascades + HAAR_CASCADE)
    if detector.empty():
        raise UsageError(f"OpenCV could not load {cv2.data.haarcascades + HAAR_CASCADE}")
    return detector


def find_face_box(frames: np.ndarray, detector) -> tuple[list[int] | None, int, int]:
    """(box [x, y, w, h] in frame pixels or None, frames with a face, frames checked) for frames [T, H, W, 3]."""
    import cv2

    num_frames, height, width = frames.shape[:3]
    checked = np.unique(np.linspace(0, num_frames - 1, min(num_frames, DETECT_FRAMES)).round().astype(int))
    scale = min(1.0, DETECT_SHORT_SIDE / min(height, width))
    min_face = max(24, DETECT_SHORT_SIDE // 8)
    faces = []  # (centre x, centre y, size) in frame pixels
    for index in checked:
        gray = cv2.cvtColor(frames[index], cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            gray = cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        found = detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face))
        if len(found):
            x, y, w, h = max(found, key=lambda box: box[2] * box[3])
            faces.append(((x + w / 2) / scale, (y + h / 2) / scale, max(w, h) / scale))
    if not faces:
        return None, 0, len(checked)
    centre_x, centre_y, size = np.median(np.array(faces), axis=0)
    side = min(round(size * MARGIN), width, height)
    x = int(np.clip(round(centre_x - side / 2), 0, width - side))
    y = int(np.clip(round(centre_y - side / 2), 0, height - side))
    return [x, y, side, side], len(faces), len(checked)
