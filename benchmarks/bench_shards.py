"""Shard building: emi's builder against the strongest builders a user would write, against the floor of the work,
and its memory on long clips.

Speed. Every contender builds the same clips the same way: frames at 5 fps at the builder's frame size (short side
256), 16 kHz mono audio, written to disk, two clips at a time. emi: the real command line, `python -m emi.cli
shards build --workers 2`, into a new folder each round (start-up, decoding, JPEG/WAV encoding, tar, manifest and
sha256 all included). Baselines (frame sizes and counts computed before timing):
- ffmpeg_cli: the ffmpeg command line per clip (one decode, two outputs: JPEGs at -q:v 2 and a wav), two at a
  time as `xargs -P 2` would run it;
- ffmpeg_pipe: a script reading MJPEG frames from `ffmpeg -f image2pipe` and writing them, the wav from ffmpeg;
- torchcodec: a script in a pool of 2 processes: torchcodec's VideoDecoder with its Resize transform picks the
  frames played at k/5 s, Pillow encodes them, AudioDecoder resamples to 16 kHz mono (left out where torchcodec
  does not import);
- pyav: a script in a pool of 2 processes: PyAV decodes, the kept frames are resized (bicubic, in YUV, then
  converted: swscale's cheaper path) and JPEG-encoded with Pillow at emi's quality, a wav written.
The three scripts run as a user runs them (`python -m benchmarks.bench_shards --script NAME TASKS OUT`), their
start-up counted as emi's is.
Rounds: harness.interleave, 5 (2 with --quick), the order reversed every other round. The ratio is emi's clips/s
over the best baseline's (highest median), taken within each round: median and range over the rounds.
Targets: emi >= 1.2x the best baseline on short 640x360 clips (`emi synth`, 2-8 s) and on long 720p clips.

Floor. CPU seconds per clip-second (every process) of emi against (a) decoding alone (PyAV, the decoder threads
emi's workers use, every video and audio frame decoded and dropped) and (b) that plus resizing and JPEG-encoding
the kept 5 fps frames; the floors run in a pool of 2 processes started before the rounds, counting only the work.
Target: emi within 1.15x of (b).

Memory. Peak RSS (VmHWM, sampled every 20 ms) of `emi shards build --workers 1` (one process decodes, encodes and
writes) over a 10 s 720p clip and a long one (150 s in the full run, to fit the time budget: memory is flat in the
length, the stream never holds more than a few frames), with and without `--face-crop opencv`. Target: long within
1.5x of short.

    python -m benchmarks.bench_shards [--quick]    (writes its clips to a temp dir, prints the section)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
from PIL import Image

from benchmarks import harness
from benchmarks.harness import show, spread_json
from emi import EMI_EMOTIONS

REPO = Path(__file__).resolve().parents[1]
FPS, SAMPLE_RATE, FRAME_SIZE, WORKERS = 5, 16000, 256, 2
# emi.shards.sample.JPEG_QUALITY (a test holds them equal), not imported: the baselines' workers import this module,
# and emi's media modules would add numpy's import to their start-up, which a user's script need not pay.
JPEG_QUALITY = 90
DECODER_THREADS = max(1, (os.cpu_count() or 1) // WORKERS)  # what emi gives each worker's decoder
SPEED_TARGET = 1.2  # emi clips/s over the best baseline's
FLOOR_TARGET = 1.15  # emi CPU per clip-second over decode + encode's
MEMORY_TARGET = 1.5  # peak RSS on the long clip over the short clip's
BASELINES = ("ffmpeg_cli", "ffmpeg_pipe", "torchcodec", "pyav")
FLOORS = ("decode", "decode_encode")
FFMPEG = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
TORCHCODEC_BATCH = 32  # frames decoded at a time: memory stays flat on long clips


@dataclass(frozen=True)
class Sizes:
    """Inputs and rounds. The full run: about 5 minutes on an idle 2-core machine (budget: 12), each contender's
    build 2-5 s a round."""

    short_clips: int = 24  # emi synth 640x360, 2-8 s: about 130 s of clips
    long_clips: int = 2
    long_s: float = 90
    long_size: str = "1280x720"
    memory_short_s: float = 10
    memory_long_s: float = 150
    memory_size: str = "1280x720"
    rounds: int = harness.MIN_ROUNDS


QUICK = Sizes(short_clips=2, long_s=2, memory_short_s=1, memory_long_s=4, memory_size="160x90", rounds=2)


@dataclass(frozen=True)
class ClipTask:
    """One clip as every contender builds it: the builder's frame size, frame and sample counts."""

    path: Path
    key: str
    seconds: float
    width: int
    height: int
    num_frames: int
    num_samples: int


def plan(videos: Path) -> list[ClipTask]:
    """The clips of a folder with what the builder makes of them (computed before timing)."""
    from emi.media import ClipStream, output_size

    tasks = []
    for clip in sorted(videos.iterdir()):
        with ClipStream(clip, FPS, SAMPLE_RATE, frame_size=None, with_audio=False) as stream:
            next(item for item in stream if item[0] == "frame")  # the displayed size is known from the first frame
            width, height = output_size(*stream.source_size, FRAME_SIZE)
            tasks.append(
                ClipTask(clip, clip.stem, stream.duration_s, width, height, stream.num_frames, stream.num_samples)
            )
    return tasks


# --- inputs ---


def write_labels(videos: Path, labels: Path) -> Path:
    """A labels CSV naming every clip of the folder (the intensities do not matter here)."""
    with open(labels, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["Filename", *EMI_EMOTIONS])
        writer.writerows([clip.name] + ["0.5"] * len(EMI_EMOTIONS) for clip in sorted(videos.iterdir()))
    return labels


def short_clips(root: Path, clips: int, seed: int = 0) -> tuple[Path, Path]:
    """`clips` clips of `emi synth --size 640x360` (2-8 s, H.264/AAC, 25 fps) in root/videos, labels beside."""
    from emi.synth import synthesize

    synthesize(root, clips=clips, seed=seed, workers=WORKERS, size=(640, 360))
    return root / "videos", root / "labels.csv"


def generated_clip(path: Path, seconds: float, size: str, rate: int = 25) -> Path:
    """An H.264/AAC mp4 of ffmpeg's testsrc2 pattern and a tone, at a low bitrate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    video = f"testsrc2=s={size}:r={rate}:d={seconds}"
    audio = f"sine=frequency=440:duration={seconds}"
    encode = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "35", "-g", str(10 * rate), "-pix_fmt", "yuv420p"]
    command = [*FFMPEG, "-f", "lavfi", "-i", video, "-f", "lavfi", "-i", audio, *encode, "-c:a", "aac", "-b:a", "32k"]
    subprocess.run([*command, str(path)], check=True)
    return path


def long_clips(root: Path, clips: int, seconds: float, size: str) -> tuple[Path, Path]:
    """`clips` copies of one generated clip (the same decoding work each) in root/videos, labels beside."""
    videos = root / "videos"
    first = generated_clip(videos / "long00.mp4", seconds, size)
    for index in range(1, clips):
        shutil.copy(first, videos / f"long{index:02d}.mp4")
    return videos, write_labels(videos, root / "labels.csv")


# --- emi ---


def emi_build(videos: Path, labels: Path, out: Path, workers: int, *extra: str) -> subprocess.Popen:
    """`python -m emi.cli shards build` as a user runs it, its stderr kept in a file for the error message."""
    settings = {"--fps": FPS, "--sample-rate": SAMPLE_RATE, "--frame-size": FRAME_SIZE, "--workers": workers}
    command = [sys.executable, "-m", "emi.cli", "shards", "build", "--videos", str(videos), "--labels", str(labels)]
    command += ["--out", str(out), *(str(item) for pair in settings.items() for item in pair), *extra]
    log = tempfile.TemporaryFile()  # noqa: SIM115 (a file, not a pipe: the build never waits for a reader)
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    process.log = log
    return process


def _peak_rss_kb(pid: int) -> int | None:
    """VmHWM: the peak RSS of the process's own address space since its exec (ru_maxrss would also count the
    benchmark process it was forked from)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def finished(process: subprocess.Popen) -> int:
    """Wait for an emi build, sampling its peak RSS every 20 ms; the last sample in KB (the peak never falls).
    RuntimeError with its message if it failed."""
    peak = 0
    while process.poll() is None:
        peak = max(peak, _peak_rss_kb(process.pid) or 0)
        time.sleep(0.02)
    if process.returncode != 0:
        process.log.seek(0)
        raise RuntimeError(f"emi shards build failed ({process.returncode}): {process.log.read()[-2000:]!r}")
    process.log.close()
    return peak


# --- the ffmpeg baselines ---


def _ffmpeg_outputs(task: ClipTask, frames: list[str], folder: Path) -> list[str]:
    """ffmpeg's arguments for one clip: one decode, frames at 5 fps at the builder's size, a 16 kHz mono wav."""
    video = ["-map", "0:v:0", "-vf", f"fps={FPS},scale={task.width}:{task.height}", *frames]
    audio = ["-map", "0:a:0", "-ac", "1", "-ar", str(SAMPLE_RATE), str(folder / "audio.wav")]
    return [*FFMPEG, "-i", str(task.path), *video, *audio]


def ffmpeg_cli(task: ClipTask, out: Path) -> None:
    """ffmpeg_cli: the command line writes the JPEG files itself."""
    folder = out / task.key
    folder.mkdir(parents=True)
    subprocess.run(_ffmpeg_outputs(task, ["-q:v", "2", str(folder / "%04d.jpg")], folder), check=True)


def ffmpeg_pipe(task: ClipTask, out: Path) -> None:
    """ffmpeg_pipe: MJPEG frames on stdout, split and written by the script."""
    folder = out / task.key
    folder.mkdir(parents=True)
    frames = ["-f", "image2pipe", "-c:v", "mjpeg", "-q:v", "2", "pipe:1"]
    stream = subprocess.run(_ffmpeg_outputs(task, frames, folder), stdout=subprocess.PIPE, check=True).stdout
    # an MJPEG frame ends with the EOI marker, which the entropy-coded data never holds (0xFF is stuffed)
    for index, frame in enumerate(stream.split(b"\xff\xd9")[:-1]):
        (folder / f"{index:04d}.jpg").write_bytes(frame + b"\xff\xd9")


# --- the Python baselines (run in worker processes) ---


def write_wav(path: Path, pcm: bytes, num_samples: int) -> None:
    """16-bit mono PCM cut or padded with silence to num_samples."""
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(SAMPLE_RATE)
        file.writeframes(pcm[: 2 * num_samples].ljust(2 * num_samples, b"\0"))


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def resized(frame: av.VideoFrame, task: ClipTask) -> Image.Image:
    """Bicubic in YUV, then converted to RGB unscaled: cheaper than both in one swscale call (emi.media does the
    same)."""
    small = frame.reformat(task.width, task.height, "yuv420p", interpolation="BICUBIC")
    return small.reformat(format="rgb24").to_image()


def decoded(task: ClipTask) -> Iterator[av.VideoFrame | av.AudioFrame]:
    """Every video and audio frame of the clip, the video decoder with emi's threads."""
    with av.open(str(task.path)) as container:
        video, audio = container.streams.video[0], container.streams.audio
        video.codec_context.thread_count = DECODER_THREADS
        for packet in container.demux(video, *audio[:1]):
            yield from packet.decode()


def kept(frames: Iterator[av.VideoFrame | av.AudioFrame], task: ClipTask) -> Iterator[tuple[int, av.VideoFrame]]:
    """(index, frame) of the 5 fps frames: the first frame at or after each k/5 s (within a millisecond); other
    frames (audio) are passed through with index -1."""
    index = 0
    for frame in frames:
        if not isinstance(frame, av.VideoFrame):
            yield -1, frame
            continue
        while index < task.num_frames and frame.time >= index / FPS - 1e-3:
            yield index, frame
            index += 1


def pyav_clip(task: ClipTask, out: Path) -> int:
    """pyav: decode with PyAV, resize and JPEG-encode the kept frames, a wav; the frames written."""
    folder = out / task.key
    folder.mkdir(parents=True)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    pcm, count, data = bytearray(), 0, b""
    for index, frame in kept(decoded(task), task):
        if index < 0:
            pcm += b"".join(bytes(f.planes[0])[: 2 * f.samples] for f in resampler.resample(frame))
            continue
        data = jpeg(resized(frame, task))
        (folder / f"{index:04d}.jpg").write_bytes(data)
        count = index + 1
    for index in range(count, task.num_frames):  # the video ended early: the last frame again
        (folder / f"{index:04d}.jpg").write_bytes(data)
    pcm += b"".join(bytes(f.planes[0])[: 2 * f.samples] for f in resampler.resample(None))
    write_wav(folder / "audio.wav", bytes(pcm), task.num_samples)
    return task.num_frames


def torchcodec_clip(task: ClipTask, out: Path) -> int:
    """torchcodec: the frames played at k/5 s, resized by the decoder, JPEG-encoded with Pillow; the audio
    resampled by AudioDecoder."""
    import numpy as np
    import torch
    from torchcodec.decoders import AudioDecoder, VideoDecoder
    from torchcodec.transforms import Resize

    torch.set_num_threads(1)  # two processes share the cores
    folder = out / task.key
    folder.mkdir(parents=True)
    decoder = VideoDecoder(
        str(task.path), dimension_order="NHWC", num_ffmpeg_threads=DECODER_THREADS,
        transforms=[Resize((task.height, task.width))],
    )  # fmt: skip
    end = decoder.metadata.end_stream_seconds - 1e-3  # a time past the last frame is an error: hold the last
    times = [min(index / FPS, end) for index in range(task.num_frames)]
    for start in range(0, len(times), TORCHCODEC_BATCH):
        batch = decoder.get_frames_played_at(times[start : start + TORCHCODEC_BATCH]).data.numpy()
        for offset, pixels in enumerate(batch):
            (folder / f"{start + offset:04d}.jpg").write_bytes(jpeg(Image.fromarray(np.ascontiguousarray(pixels))))
    samples = AudioDecoder(str(task.path), sample_rate=SAMPLE_RATE, num_channels=1).get_all_samples().data[0]
    pcm = (samples.clamp(-1, 1) * 32767).round().to(torch.int16).numpy().tobytes()
    write_wav(folder / "audio.wav", pcm, task.num_samples)
    return task.num_frames


def has_torchcodec() -> str | None:
    """None where torchcodec imports here, else why not."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as err:  # a missing FFmpeg library shows as a RuntimeError or an OSError, not ImportError
        return f"torchcodec does not import here ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
    return None


# --- the floors (run in worker processes) ---


def decode_floor(task: ClipTask) -> float:
    """(a) Decoding alone: every frame decoded and dropped; this process's CPU seconds for it."""
    start = time.process_time()
    for _ in decoded(task):
        pass
    return time.process_time() - start


def decode_encode_floor(task: ClipTask) -> float:
    """(b) Decoding, and resizing and JPEG-encoding only the kept 5 fps frames; this process's CPU seconds."""
    start = time.process_time()
    for index, frame in kept(decoded(task), task):
        if index >= 0:
            jpeg(resized(frame, task))
    return time.process_time() - start


# --- the rounds ---


def two_at_a_time(function: Callable, tasks: list[ClipTask], out: Path) -> int:
    """A script's pool of 2 processes; the clips done."""
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn")) as pool:
        return len(list(pool.map(function, tasks, [out] * len(tasks))))


def two_commands_at_a_time(function: Callable, tasks: list[ClipTask], out: Path) -> int:
    """ffmpeg processes two at a time, as `xargs -P 2` runs them; the clips done."""
    with ThreadPoolExecutor(WORKERS) as pool:
        return len(list(pool.map(function, tasks, [out] * len(tasks))))


def run_script(name: str, tasks: Path, out: Path) -> int:
    """The body of a baseline script (`--script NAME TASKS OUT`): its clips built into `out`; the clips done."""
    clips = [ClipTask(**{**task, "path": Path(task["path"])}) for task in json.loads(tasks.read_text())]
    if name == "ffmpeg_pipe":
        return two_commands_at_a_time(ffmpeg_pipe, clips, out)
    return two_at_a_time({"torchcodec": torchcodec_clip, "pyav": pyav_clip}[name], clips, out)


def script(name: str, tasks: Path, out: Path) -> int:
    """A baseline written as a Python script, run as a user runs one: its own interpreter, start-up and pool
    included, as emi's command line (and no pool worker imports what the benchmark's own process has imported);
    the clips it wrote."""
    command = [sys.executable, "-m", "benchmarks.bench_shards", "--script", name, str(tasks), str(out)]
    subprocess.run(command, cwd=REPO, check=True)
    return sum(1 for _ in out.glob("*/audio.wav"))


class Contenders:
    """One build of the clip set by each contender, each into a new folder (the older ones are removed between
    contenders, untimed); the floors' CPU seconds, which their long-lived pool reports per clip."""

    def __init__(self, tasks: list[ClipTask], videos: Path, labels: Path, work: Path, baselines: tuple[str, ...]):
        self.tasks, self.videos, self.labels, self.work = tasks, videos, labels, work
        self.baselines = baselines
        self.builds: dict[str, list[Path]] = {}
        self.floor_cpu: dict[str, list[float]] = {name: [] for name in FLOORS}
        self.floor_pool: ProcessPoolExecutor | None = None
        self.tasks_file = work / "tasks.json"  # the baseline scripts' input
        work.mkdir(parents=True, exist_ok=True)
        self.tasks_file.write_text(json.dumps([{**asdict(task), "path": str(task.path)} for task in tasks]))

    def functions(self) -> dict[str, Callable[[], int]]:
        functions = {"emi": self.emi}
        for name in self.baselines:
            functions[name] = lambda name=name: self.baseline(name)
        functions |= {name: (lambda name=name: self.floor(name)) for name in FLOORS}
        return functions

    def fresh(self, name: str) -> Path:
        out = self.work / name / f"round{len(self.builds.setdefault(name, []))}"
        self.builds[name].append(out)
        return out

    def last(self, name: str) -> Path:
        return self.builds[name][-1]

    def emi(self) -> int:
        out = self.fresh("emi")
        finished(emi_build(self.videos, self.labels, out, WORKERS))
        return json.loads((out / "manifest.json").read_text())["num_samples"]

    def baseline(self, name: str) -> int:
        out = self.fresh(name)
        if name == "ffmpeg_cli":
            return two_commands_at_a_time(ffmpeg_cli, self.tasks, out)
        return script(name, self.tasks_file, out)

    def floor(self, name: str) -> int:
        function = decode_floor if name == "decode" else decode_encode_floor
        seconds = list(self.floor_pool.map(function, self.tasks))
        self.floor_cpu[name].append(sum(seconds))
        return len(seconds)

    def prune(self) -> None:
        """Remove every build but each contender's newest (untimed, between contenders)."""
        for builds in self.builds.values():
            for out in builds[:-1]:
                shutil.rmtree(out, ignore_errors=True)

    @contextmanager
    def floor_workers(self) -> Iterator[None]:
        """The floors' pool, started (and its imports done) before the rounds: the floor is the work alone."""
        with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(time.sleep, [0.2] * WORKERS))  # both workers up
            self.floor_pool = pool
            yield


def frames_written(contenders: Contenders) -> dict[str, int]:
    """JPEG frames in each contender's last build (emi's from its manifest)."""
    frames = {"emi": json.loads((contenders.last("emi") / "manifest.json").read_text())["num_frames"]}
    frames |= {name: sum(1 for _ in contenders.last(name).glob("*/*.jpg")) for name in contenders.baselines}
    return frames


def summarise(rounds: harness.Rounds, contenders: Contenders, clip_seconds: float) -> dict[str, Any]:
    """Per contender clips/s, wall s and CPU s per clip-second; emi over every baseline and over the best; emi's
    CPU over the floors'."""
    builders = ["emi", *contenders.baselines]
    cpu = {name: rounds.values(name, "cpu_s") for name in builders}
    for name in FLOORS:  # the parent's share (it only hands out the clips) and the workers' work
        cpu[name] = [a + b for a, b in zip(rounds.values(name, "cpu_s"), contenders.floor_cpu[name])]
    per_clip_second = {name: spread_json([c / clip_seconds for c in values]) for name, values in cpu.items()}
    best = rounds.best_baseline(list(contenders.baselines))
    ratio = rounds.ratio("emi", best)
    floors = {}
    for name in FLOORS:
        over = harness.Spread.of([a / b for a, b in zip(cpu["emi"], cpu[name])])
        floors[name] = {"cpu_s": cpu[name], "cpu_s_per_clip_s": per_clip_second[name], "emi_over": asdict(over)}
    floors["decode_encode"]["met"] = floors["decode_encode"]["emi_over"]["median"] <= FLOOR_TARGET
    return {
        "contenders": {
            name: {
                "clips_per_s": asdict(rounds.spread(name)),
                "wall_s": asdict(rounds.spread(name, "wall_s")),
                "cpu_s_per_clip_s": per_clip_second[name],
                "emi_over": asdict(rounds.ratio("emi", name)),
            }
            for name in builders
        },
        "baseline": best,
        "ratio": asdict(ratio),
        "met": ratio.median >= SPEED_TARGET,
        "floors": floors,
    }


def measure_set(videos: Path, labels: Path, work: Path, rounds: int, baselines: tuple[str, ...]) -> dict[str, Any]:
    """The interleaved rounds over one clip set, and a check that every contender did the same unique work."""
    tasks = plan(videos)
    contenders = Contenders(tasks, videos, labels, work, baselines)
    with contenders.floor_workers():
        measured = harness.interleave(contenders.functions(), rounds, between=contenders.prune)
    for name in measured.names:
        done = measured.values(name, "units")
        if done != [len(tasks)] * rounds:
            raise RuntimeError(f"{name} built {done} clips in its rounds, not {len(tasks)} each")
    clip_seconds = sum(task.seconds for task in tasks)
    return {
        **summarise(measured, contenders, clip_seconds),
        "clips": len(tasks),
        "clip_seconds": round(clip_seconds, 2),
        "expected_frames": sum(task.num_frames for task in tasks),
        "frames": frames_written(contenders),
        "sizes": sorted({f"{task.width}x{task.height}" for task in tasks}),
        "rounds": measured.to_json(),
        "load": measured.load(),
        "emi_shards": str(contenders.last("emi")),
    }


# --- memory ---


def _has_face_detector() -> bool:
    try:
        import cv2
    except ImportError:
        return False
    return hasattr(cv2, "CascadeClassifier")


def memory(work: Path, short_s: float, long_s: float, size: str) -> dict[str, Any]:
    """Peak RSS of one-process builds over a short and a long clip, without and with face cropping."""
    clips = {}
    for name, seconds in (("short", short_s), ("long", long_s)):
        videos = work / name / "videos"
        generated_clip(videos / f"{name}.mp4", seconds, size, rate=10)  # 10 fps: the builder samples 5
        clips[name] = (videos, write_labels(videos, work / name / "labels.csv"))
    result: dict[str, Any] = {"size": size, "short_s": short_s, "long_s": long_s, "crops": {}}
    for crop in ("none", "opencv") if _has_face_detector() else ("none",):
        peaks = {
            name: finished(emi_build(videos, labels, work / f"out-{name}-{crop}", 1, "--face-crop", crop))
            for name, (videos, labels) in clips.items()
        }
        result["crops"][crop] = {
            "short_mb": round(peaks["short"] / 1024, 1),
            "long_mb": round(peaks["long"] / 1024, 1),
            "ratio": round(peaks["long"] / peaks["short"], 3),
        }
    result["met"] = all(crop["ratio"] <= MEMORY_TARGET for crop in result["crops"].values())
    return result


def run(work: Path, quick: bool = False, **sizes: Any) -> dict[str, Any]:
    """The whole benchmark, its inputs made in `work`; `sizes`: fields of Sizes overriding the full (or quick)
    ones."""
    work = Path(work)
    chosen = Sizes(**{**asdict(QUICK if quick else Sizes()), **sizes})
    torchcodec = has_torchcodec()
    baselines = tuple(name for name in BASELINES if name != "torchcodec" or torchcodec is None)
    short = short_clips(work / "short-clips", chosen.short_clips)
    long = long_clips(work / "long-clips", chosen.long_clips, chosen.long_s, chosen.long_size)
    sets = {
        "short": measure_set(*short, work / "short", chosen.rounds, baselines),
        "long": measure_set(*long, work / "long", chosen.rounds, baselines),
    }
    mem = memory(work / "memory", chosen.memory_short_s, chosen.memory_long_s, chosen.memory_size)
    met = all(s["met"] and s["floors"]["decode_encode"]["met"] for s in sets.values()) and mem["met"]
    return {
        "sizes": asdict(chosen),
        "quick": quick,
        "baselines": list(baselines),
        "torchcodec_skipped": torchcodec,
        "decoder_threads": DECODER_THREADS,
        "cpu_cores": os.cpu_count(),
        "sets": sets,
        "memory": mem,
        "met": met,
    }


# --- the report ---


def speed_table(measured: dict[str, Any]) -> str:
    rows = []
    for name, numbers in measured["contenders"].items():
        ratio = "" if name == "emi" else show(numbers["emi_over"])
        if name == measured["baseline"]:
            ratio = f"**{ratio}** (best baseline)"
        rows.append(
            [
                name,
                show(numbers["clips_per_s"]),
                show(numbers["wall_s"]),
                show(numbers["cpu_s_per_clip_s"], 3),
                measured["frames"][name],
                ratio,
            ]
        )
    header = ["contender", "clips/s", "wall s", "CPU s per clip-second", "frames", "emi clips/s over it"]
    return harness.table(header, rows)


def floor_table(measured: dict[str, Any]) -> str:
    emi = measured["contenders"]["emi"]["cpu_s_per_clip_s"]
    rows = [["emi", show(emi, 3), ""]]
    for name, what in (("decode", "(a) decode alone"), ("decode_encode", "(b) decode + resize + JPEG of kept frames")):
        floor = measured["floors"][name]
        rows.append([what, show(floor["cpu_s_per_clip_s"], 3), show(floor["emi_over"])])
    return harness.table(["", "CPU s per clip-second", "emi over it"], rows)


def memory_table(mem: dict[str, Any]) -> str:
    rows = [[crop, m["short_mb"], m["long_mb"], m["ratio"]] for crop, m in mem["crops"].items()]
    header = ["--face-crop", f"{mem['short_s']:g} s clip MB", f"{mem['long_s']:g} s clip MB", "long / short"]
    return harness.table(header, rows)


def set_values(name: str, measured: dict[str, Any]) -> dict[str, Any]:
    """The template's values for one clip set, prefixed with its name."""
    values = {
        "clips": measured["clips"],
        "seconds": f"{measured['clip_seconds']:g}",
        "sizes": ", ".join(measured["sizes"]),
        "load": measured["load"],
        "speed": speed_table(measured),
        "baseline": measured["baseline"],
        "ratio": show(measured["ratio"]),
        "verdict": harness.verdict(measured["met"]),
        "floors": floor_table(measured),
        "floor_verdict": harness.verdict(measured["floors"]["decode_encode"]["met"]),
    }
    return {f"{name}_{key}": value for key, value in values.items()}


def section(result: dict[str, Any]) -> str:
    sizes, mem = result["sizes"], result["memory"]
    skipped = result["torchcodec_skipped"]
    return harness.render(
        "bench_shards",
        rounds=sizes["rounds"], workers=WORKERS, fps=FPS, frame_size=FRAME_SIZE, sample_rate=SAMPLE_RATE,
        quality=JPEG_QUALITY, threads=result["decoder_threads"], cores=result["cpu_cores"],
        torchcodec=f"torchcodec is left out: {skipped}. " if skipped else "",
        long_size=sizes["long_size"], long_s=f"{sizes['long_s']:g}",
        speed_target=SPEED_TARGET, floor_target=FLOOR_TARGET, memory_target=MEMORY_TARGET,
        memory_size=mem["size"], memory_table=memory_table(mem), memory_verdict=harness.verdict(mem["met"]),
        **set_values("short", result["sets"]["short"]), **set_values("long", result["sets"]["long"]),
    )  # fmt: skip


def summary(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, what in (("short", "short 640x360 clips"), ("long", f"long {result['sizes']['long_size']} clips")):
        measured = result["sets"][name]
        floor = measured["floors"]["decode_encode"]
        rows += [
            [f"shard build clips/s, emi / best baseline ({measured['baseline']}), {what}", show(measured["ratio"]),
             f">= {SPEED_TARGET}", yes(measured["met"])],
            [f"shard build CPU per clip-second, emi / decode + encode floor, {what}", show(floor["emi_over"]),
             f"<= {FLOOR_TARGET}", yes(floor["met"])],
        ]  # fmt: skip
    for crop, mem in result["memory"]["crops"].items():
        rows.append(
            [
                f"shard build peak RSS, long / short 720p clip, --face-crop {crop}",
                f"{mem['ratio']:.2f}",
                f"<= {MEMORY_TARGET}",
                yes(mem["ratio"] <= MEMORY_TARGET),
            ]
        )
    return rows


def yes(met: bool) -> str:
    return "yes" if met else "**no**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 short and 2 short 720p clips, 2 rounds")
    parser.add_argument(
        "--script", nargs=3, metavar=("NAME", "TASKS", "OUT"), help="(the benchmark's own use) run one baseline script"
    )
    args = parser.parse_args()
    if args.script:
        name, tasks, out = args.script
        run_script(name, Path(tasks), Path(out))
        return
    with tempfile.TemporaryDirectory(prefix="emi-bench-shards-") as tmp:
        print(section(run(Path(tmp), quick=args.quick)))


if __name__ == "__main__":
    main()
