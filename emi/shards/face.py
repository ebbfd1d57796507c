"""One face box per clip with OpenCV's Haar frontal-face detector (`--face-crop opencv`).

Per clip, in a first pass over the clip at small size: detect on up to DETECT_FRAMES evenly spaced frames
(grey, short side at most DETECT_SHORT_SIDE), keep the largest face of each frame, take the median centre and size
over those frames (steady through the clip), and make a square MARGIN times the face, clamped to the frame. The
second pass crops that box out of the frames at source resolution before scaling, so no frame is ever held at
source size.
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
        raise UsageError(
            f"--face-crop opencv needs OpenCV's Haar cascades, which OpenCV {cv2.__version__} does "
            "not ship: pip install 'opencv-python-headless>=4.9,<5'"
        )
    detector = cv2.CascadeClassifier(cv2.data.haarcascades + HAAR_CASCADE)
    if detector.empty():
        raise UsageError(f"OpenCV could not load {cv2.data.haarcascades + HAAR_CASCADE}")
    return detector


def largest_face(gray: np.ndarray, detector) -> tuple[float, float, float] | None:
    """(centre x, centre y, size) of the largest face in a grey frame [H, W], in its pixels; None without one."""
    min_face = max(24, DETECT_SHORT_SIDE // 8)
    found = detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face))
    if not len(found):
        return None
    x, y, w, h = max(found, key=lambda box: box[2] * box[3])
    return x + w / 2, y + h / 2, max(w, h)


def face_box(faces: list[tuple[float, float, float]], scale: tuple[float, float], width: int, height: int) -> list[int]:
    """The square box [x, y, side, side] in a width x height frame around the median of `faces`, found in frames
    that were `scale` (x, y) times smaller."""
    faces_array = np.array(faces)
    centre_x, centre_y = np.median(faces_array[:, 0]) * scale[0], np.median(faces_array[:, 1]) * scale[1]
    size = np.median(faces_array[:, 2]) * max(scale)
    side = min(round(size * MARGIN), width, height)
    side -= side % 2  # yuv420 frames are cropped on even sizes
    x = int(np.clip(round(centre_x - side / 2), 0, width - side))
    y = int(np.clip(round(centre_y - side / 2), 0, height - side))
    return [x, y, side, side]
