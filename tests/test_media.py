"""emi.media: frames at a rate, mono audio at a rate, streamed in this process; clear errors for bad files, and
no file may make FFmpeg read another one."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio
from PIL import Image

from emi.media import MediaError, decode_clip, num_frames_for, num_samples_for, output_size, probe, wav_bytes

from helpers import GRID, ffmpeg

GRID_CLIPS = sorted(GRID.glob("*.mpg"))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    paths = {
        name: folder / name
        for name in (
            "colors.mp4",
            "silent.mp4",
            "odd.mp4",
            "portrait.mp4",
            "tone.wav",
            "still.png",
            "fast.mp4",
            "text.mp4",
            "empty.mp4",
            "cut.mp4",
            "cut_fast.mp4",
            "full.avi",
            "cut.avi",
            "folder.mp4",
        )
    }
    # 1 s red then 1 s blue, with a 440 Hz tone: which frame shows which colour is known.
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "color=c=red:s=64x48:r=25:d=1",
        "-f",
        "lavfi",
        "-i",
        "color=c=blue:s=64x48:r=25:d=1",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=44100:duration=2",
        "-filter_complex",
        "[0][1]concat=n=2[v]",
        "-map",
        "[v]",
        "-map",
        "2",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        str(paths["colors.mp4"]),
    )
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=80x60:r=25:d=1.4",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        str(paths["silent.mp4"]),
    )
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=80x60:r=30:d=1.3", "-c:v", "mpeg4", str(paths["odd.mp4"]))
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=60x80:r=25:d=1",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        str(paths["portrait.mp4"]),
    )
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=1", "-ac", "2", str(paths["tone.wav"]))
    still = np.zeros((48, 64, 3), np.uint8)
    still[:, 32:] = (0, 255, 0)  # left half black, right half green
    Image.fromarray(still).save(paths["still.png"])
    for name, extra in (("cut", []), ("cut_fast", ["-movflags", "+faststart"])):
        full = folder / f"{name}_full.mp4"
        ffmpeg(
            "-f",
            "lavfi",
            "-i",
            "testsrc=s=160x120:r=25:d=2",
            "-f",
            "lavfi",
            "-i",
            "sine=duration=2",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            *extra,
            str(full),
        )
        paths[f"{name}.mp4"].write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    paths["fast.mp4"] = folder / "cut_fast_full.mp4"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=80x60:r=25:d=6",
        "-f",
        "lavfi",
        "-i",
        "sine=duration=6",
        "-c:v",
        "mpeg4",
        "-c:a",
        "pcm_s16le",
        str(paths["full.avi"]),
    )
    paths["cut.avi"].write_bytes(paths["full.avi"].read_bytes()[: paths["full.avi"].stat().st_size * 2 // 5])
    paths["folder.mp4"].mkdir()
    paths["text.mp4"].write_text("this is not a video\n")
    paths["empty.mp4"].write_bytes(b"")
    return paths


def test_frame_and_sample_count_rules():
    assert [num_frames_for(d, 5.0) for d in (3.0, 0.0, 0.05, 2.3, 2.29, 1.3)] == [15, 1, 1, 12, 11, 7]
    assert num_samples_for(3.0, 16000) == 48000
    assert num_samples_for(0.0, 16000) == 0


def test_output_size_keeps_aspect_with_even_sides():
    assert output_size(360, 288, 256) == (320, 256)
    assert output_size(160, 120, 256) == (342, 256)
    assert output_size(60, 80, 64) == (64, 86)
    assert output_size(1920, 1080, 224) == (398, 224)
    assert output_size(361, 289, None) == (360, 288)
    with pytest.raises(ValueError, match="even"):
        output_size(360, 288, 255)


@pytest.mark.parametrize("clip", GRID_CLIPS, ids=lambda p: p.stem)
def test_grid_clip_decodes_to_fifteen_frames_and_three_seconds_of_audio(clip):
    decoded = decode_clip(clip, fps=5.0, sample_rate=16000, frame_size=256)
    assert decoded.frames.shape == (15, 256, 320, 3)
    assert decoded.frames.dtype == np.uint8
    assert decoded.audio.shape == (47680,) and decoded.audio.dtype == np.float32  # FFmpeg's duration: 2.98 s
    assert np.abs(decoded.audio).max() <= 1.0
    assert decoded.duration_s == 2.98 and decoded.sample_rate == 16000 and decoded.fps == 5.0
    assert decoded.has_audio and decoded.has_video
    assert decoded.source_size == (360, 288)
    assert decoded.frames.std() > 10  # real pictures, not a blank buffer


def test_grid_audio_is_the_clips_audio():
    clip = GRID_CLIPS[0]
    decoded = decode_clip(clip, sample_rate=16000)
    waveform, rate = torchaudio.load(str(clip))
    reference = torchaudio.functional.resample(waveform.mean(0), rate, 16000).numpy()
    n = min(reference.size, decoded.audio.size)
    assert np.corrcoef(reference[:n], decoded.audio[:n])[0, 1] > 0.9


def test_frames_are_sampled_over_time(media):
    decoded = decode_clip(media["colors.mp4"], fps=5.0, frame_size=48)
    assert decoded.frames.shape == (10, 48, 64, 3)
    mean_rgb = decoded.frames.reshape(10, -1, 3).mean(axis=1)
    red, blue = mean_rgb[:, 0] > 200, mean_rgb[:, 2] > 200
    assert red.tolist() == [True] * 5 + [False] * 5
    assert blue.tolist() == [False] * 5 + [True] * 5


def test_audio_is_mono_at_the_target_rate(media):
    decoded = decode_clip(media["colors.mp4"], sample_rate=8000)
    assert decoded.audio.shape == (num_samples_for(decoded.duration_s, 8000),)
    spectrum = np.abs(np.fft.rfft(decoded.audio[:8000]))
    assert abs(np.fft.rfftfreq(8000, 1 / 8000)[spectrum.argmax()] - 440) <= 2


def test_frame_count_follows_the_rule_for_other_durations(media):
    decoded = decode_clip(media["odd.mp4"], fps=5.0, frame_size=60)
    assert decoded.duration_s == pytest.approx(1.3, abs=0.05)
    assert decoded.frames.shape[0] == num_frames_for(decoded.duration_s, 5.0)


def test_portrait_video_keeps_its_aspect(media):
    decoded = decode_clip(media["portrait.mp4"], frame_size=64)
    assert decoded.frames.shape[1:] == (86, 64, 3)
    assert decoded.source_size == (60, 80)


def test_clip_without_audio_gets_silence_of_its_length(media):
    decoded = decode_clip(media["silent.mp4"], fps=5.0, sample_rate=16000, frame_size=60)
    assert not decoded.has_audio and decoded.has_video
    assert decoded.frames.shape[0] == 7
    assert decoded.audio.shape == (num_samples_for(decoded.duration_s, 16000),)
    assert decoded.audio.size > 20000 and not decoded.audio.any()


def test_audio_only_file_has_no_frames(media):
    decoded = decode_clip(media["tone.wav"], sample_rate=16000)
    assert not decoded.has_video and decoded.has_audio
    assert decoded.frames.shape[0] == 0
    assert decoded.audio.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(decoded.audio))
    assert abs(np.fft.rfftfreq(16000, 1 / 16000)[spectrum.argmax()] - 440) <= 2


def test_audio_only_file_is_resampled_and_mixed_down(media):
    decoded = decode_clip(media["tone.wav"], sample_rate=22050)
    assert decoded.has_audio and decoded.audio.shape == (22050,) and decoded.audio.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(decoded.audio))
    assert abs(np.fft.rfftfreq(22050, 1 / 22050)[spectrum.argmax()] - 440) <= 2


def test_still_image_is_a_one_frame_clip(media):
    decoded = decode_clip(media["still.png"], fps=5.0, sample_rate=16000, frame_size=48)
    assert decoded.frames.shape == (1, 48, 64, 3)
    assert decoded.duration_s == 0.0 and decoded.audio.shape == (0,) and not decoded.has_audio
    left, right = decoded.frames[0, :, :28].mean(axis=(0, 1)), decoded.frames[0, :, 36:].mean(axis=(0, 1))
    assert left.max() < 10 and right[1] > 245 and right[0] < 10


@pytest.mark.parametrize(
    "name, reason",
    [
        ("empty.mp4", "empty file (0 bytes)"),
        ("text.mp4", "not a media file (it is a text file)"),
        ("cut.mp4", "not readable as media: truncated, corrupt or not an accepted format (FFmpeg: moov atom not found"),
        ("cut_fast.mp4", "truncated or corrupt: decoded"),
        ("cut.avi", "truncated: its streams end at 2.40 s, the file declares 6.00 s"),
        ("missing.mp4", "file not found"),
        ("folder.mp4", "is a directory, not a media file"),
    ],
)
def test_bad_files_raise_media_error_with_the_reason(media, name, reason):
    path = media.get(name, media["empty.mp4"].with_name(name))
    with pytest.raises(MediaError) as raised:
        decode_clip(path)
    assert raised.value.reason.startswith(reason), raised.value.reason
    assert raised.value.path == str(path) and str(path) in str(raised.value)


def test_avi_cut_before_its_end_is_truncated_not_shorter(media, tmp_path):
    """A cut AVI has no index: FFmpeg takes what is left for the clip; its header still counts every frame."""
    assert probe(media["full.avi"]).duration_s == 6.0
    assert decode_clip(media["full.avi"], frame_size=60).frames.shape[0] == 30
    # a clip whose video stream ends early but whose audio runs to the end is a shorter video, held, not cut
    held = tmp_path / "held.mp4"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=64x48:r=25:d=1",
        "-f",
        "lavfi",
        "-i",
        "sine=duration=3",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        str(held),
    )
    decoded = decode_clip(held, frame_size=48)
    assert decoded.frames.shape[0] == num_frames_for(decoded.duration_s, 5.0) >= 14
    assert np.array_equal(decoded.frames[-1], decoded.frames[6])


@pytest.fixture(scope="module")
def referring(tmp_path_factory) -> dict[str, Path]:
    """Inputs that name another file: the secret clip lies outside the folder the inputs are in."""
    root = tmp_path_factory.mktemp("referring")
    secret = root / "secret.ts"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=64x48:r=25:d=1",
        "-f",
        "lavfi",
        "-i",
        "sine=duration=1",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-f",
        "mpegts",
        str(secret),
    )
    folder = root / "videos"
    folder.mkdir()
    inputs = {
        "hls.mp4": f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n",
        "hls_relative.m3u8": "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n../secret.ts\n#EXT-X-ENDLIST\n",
        "concat.mp4": f"ffconcat version 1.0\nfile '{secret}'\n",
        "concat_bare.mkv": f"file '{secret}'\n",
        "dash.mp4": f'<?xml version="1.0"?>\n<MPD><Period><AdaptationSet><Representation><BaseURL>{secret}'
        "</BaseURL></Representation></AdaptationSet></Period></MPD>\n",
        "session.mp4": "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 5004 RTP/AVP 96\n",
    }
    paths = {}
    for name, text in inputs.items():
        paths[name] = folder / name
        paths[name].write_text(text)
    return paths


@pytest.mark.parametrize(
    "name, what",
    [
        ("hls.mp4", "an HLS playlist"),
        ("hls_relative.m3u8", "an HLS playlist"),
        ("concat.mp4", "an FFmpeg concat script"),
        ("concat_bare.mkv", "an FFmpeg concat script"),
        ("dash.mp4", "an XML manifest (DASH, IMF or similar)"),
        ("session.mp4", "an SDP session description"),
    ],
)
def test_inputs_that_refer_to_other_files_are_refused(referring, name, what):
    with pytest.raises(MediaError) as raised:
        decode_clip(referring[name])
    assert (
        raised.value.reason == f"refused: {what}, which refers to other files or URLs (only self-contained "
        "media is read)"
    )


def test_only_self_contained_demuxers_and_local_files_are_allowed():
    from emi import media

    assert media._OPEN_OPTIONS["protocol_whitelist"] == "file"
    allowed = set(media._OPEN_OPTIONS["format_whitelist"].split(","))
    assert not allowed & {"hls", "dash", "concat", "image2", "imf", "sdp", "rtsp", "rtp", "tty", "lavfi"}


def test_intact_faststart_file_decodes(media):
    decoded = decode_clip(media["fast.mp4"], frame_size=120)
    assert decoded.frames.shape == (10, 120, 160, 3) and decoded.has_audio


def test_probe_reports_streams(media, tmp_path):
    info = probe(media["colors.mp4"])
    assert info.has_video and info.has_audio and not info.is_image
    assert (info.width, info.height) == (64, 48)
    rotated = tmp_path / "rotated.mp4"  # stored 80x60, shown upright as 60x80
    ffmpeg("-i", str(media["silent.mp4"]), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(rotated))
    assert (probe(rotated).width, probe(rotated).height) == (60, 80)
    upright = decode_clip(rotated, frame_size=60).frames
    plain = decode_clip(media["silent.mp4"], frame_size=60).frames
    assert upright.shape[1:] == (80, 60, 3)
    assert np.abs(upright.astype(int) - np.rot90(plain, 1, axes=(1, 2)).astype(int)).mean() < 4
    assert probe(media["still.png"]).is_image
    assert not probe(media["tone.wav"]).has_video


def test_wav_bytes_is_16_bit_mono_pcm(tmp_path):
    waveform = np.sin(np.linspace(0, 100, 1600)).astype(np.float32) * 0.5
    waveform[:3] = (1.5, -1.5, 0.25)  # out of range values are clipped
    data = wav_bytes(waveform, 16000)
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()) == (1, 2, 16000, 1600)
        pcm = np.frombuffer(wav.readframes(1600), "<i2")
    assert pcm[:3].tolist() == [32767, -32767, round(0.25 * 32767)]
    assert np.abs(pcm[3:] / 32767 - waveform[3:]).max() < 1 / 32767
    path = tmp_path / "x.wav"
    path.write_bytes(data)
    loaded, rate = torchaudio.load(str(path))
    assert rate == 16000 and loaded.shape == (1, 1600)
    assert torch.allclose(loaded[0, 3:], torch.from_numpy(waveform[3:]), atol=1e-4)
