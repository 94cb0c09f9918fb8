"""Hostile and clumsy input, built for real: each case is something a downloaded shard, a shared
config or run dir, or a slip of the keyboard did to mm1 before (issue 12). Each test asserts the one
line mm1 now says (or the counted skip) and that nothing ran, was read outside the data, was lost
silently, or was written where it should not be."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mm1.cli import main
from mm1.data.formats import open_source
from mm1.data.images import ImageError, load_image
from mm1.data.kinds.caption import write_caption_shard
from mm1.data.safety import ReadPolicy
from mm1.data.skips import DataError, SkipCounter
from mm1.eval.tasks import get_task
from mm1.train.metrics import read_metrics
from mm1.train.run_dir import LOCK_NAME, RunDirLock

TINY = [
    "model.lm.n_layers=1",
    "model.vision.depth=1",
    "data.seq_len=96",
    "data.batch_size=1",
    "train.warmup_steps=1",
    "data.sources.interleaved.weight=0",
    "data.sources.text.weight=0",
]


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """Exit code and the error line of `mm1 ARGV` run in this process: one line, no traceback."""
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"mm1 {argv[0]}: ")]
    assert "Traceback" not in err and (code == 0 or len(lines) == 1), err
    return code, lines[-1] if lines else ""


def train_args(world: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "configs/tiny.yaml", f"data.world={world}", *TINY, *extra, "--out", str(out)]


@pytest.fixture(scope="module")
def run2(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run with a checkpoint at each step (copied by tests that damage it)."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert main(train_args(tiny_world, out, "train.steps=2", "train.save_every=1", "train.keep_last=0")) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ----------------------------------------------------------------------------- configs


def test_an_environment_secret_is_never_resolved_into_a_config(tiny_world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MM1_TEST_SECRET", "hunter2")
    out = tmp_path / "run"
    code, line = cli(capsys, *train_args(tiny_world, out, "name=${oc.env:MM1_TEST_SECRET}"))
    assert code == 2 and line.startswith("mm1 train: config error: name='${oc.env:MM1_TEST_SECRET}'")
    assert "resolver interpolations" in line and "hunter2" not in line
    preset = tmp_path / "shared.yaml"
    preset.write_text("base: " + str(Path("configs/tiny.yaml").resolve()) + "\nname: ${oc.env:MM1_TEST_SECRET}\n")
    code, line = cli(capsys, "train", str(preset), f"data.world={tiny_world}", "--out", str(out))
    assert code == 2 and "resolver interpolations" in line and f"in {preset}" in line
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize(
    "override,expected",
    [
        ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
        ("data.batch_size=-1", "data.batch_size=-1: must be >= 1"),
        ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
        ("data.max_images=0", "data.max_images=0: must be >= 1"),
        ("train.lr=-0.1", "train.lr=-0.1: must be > 0"),
        ("train.betas=[0.9,1.5]", "train.betas[1]=1.5: must be in [0.0, 1.0)"),
        ("data.image_formats=[PNG,EPS]", "data.image_formats=['PNG', 'EPS']: must be a non-empty list of JPEG"),
        ("train.lr=[1,", "override 'train.lr=[1,': the value is not valid YAML"),
    ],
)
def test_out_of_range_or_unparsable_values_are_one_line_before_anything_runs(
    tiny_world, tmp_path, capsys, override, expected
):
    out = tmp_path / "run"
    code, line = cli(capsys, *train_args(tiny_world, out, override))
    assert code == 2 and line.startswith(f"mm1 train: config error: {expected}"), line
    assert not out.exists()


# ----------------------------------------------------------------------------- checkpoints


def test_a_damaged_checkpoint_in_eval_is_one_line(run2, tmp_path, capsys):
    run = copy_run(run2, tmp_path)
    weights = run / "checkpoints" / "step-2" / "model" / "shard-00001-model-00001-of-00001.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    code, line = cli(
        capsys, "eval", "--checkpoint", str(run), "--tasks", "world_caption", "--shots", "0", "--limit", "2"
    )
    assert code == 2 and line.startswith("mm1 eval: checkpoint error: checkpoint ") and weights.name in line


def test_a_checkpoint_without_checksums_is_refused_not_skipped_past(run2, tiny_world, tmp_path, capsys):
    run = copy_run(run2, tmp_path)
    for sums in (run / "checkpoints").glob("step-*/checksums.json"):
        sums.unlink()
    before = (run / "metrics.jsonl").read_text()
    code, line = cli(
        capsys, *train_args(tiny_world, run, "train.steps=2", "train.save_every=1", "train.keep_last=0"), "--resume"
    )
    assert code == 2 and "step-2 cannot be verified: checksums.json is missing" in line, line
    assert (run / "metrics.jsonl").read_text() == before  # no restart at step 0 appended to it


def test_disk_full_during_a_save_is_one_line_and_leaves_no_step_dir(tiny_world, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save", full)  # what the sharded (DCP) writer calls per shard
    out = tmp_path / "run"
    code, line = cli(capsys, *train_args(tiny_world, out, "train.steps=1"))
    assert code == 2 and line.startswith("mm1 train: disk full while writing ") and ".tmp-step-1" in line
    assert not list((out / "checkpoints").glob("step-*"))
    assert [r["step"] for r in read_metrics(out)] == [1]


# ----------------------------------------------------------------------------- data: commands, formats, sizes


class Recording(SkipCounter):
    """A SkipCounter that keeps every skip's detail, so a test can read what the log said."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.details: list[str] = []

    def skip(self, reason, where, detail="", already_counted=False, lost=1) -> None:
        self.details.append(f"{where}: {detail}")
        super().skip(reason, where, detail, already_counted, lost)


def read(args: list, policy: ReadPolicy = ReadPolicy(), min_samples: int = 200) -> tuple[list, Recording]:
    """Every record of `open_source(kind, path)` and the skip counter it reported to."""
    skips = Recording(min_samples=min_samples)
    return list(open_source(*args, skips, policy=policy)), skips


def caplog_text(skips: Recording) -> str:
    return "\n".join(skips.details)


def png(value: int = 128, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def shard(path: Path, n: int, first: int = 0, **extra: bytes) -> Path:
    """A caption shard of `n` good samples (plus `extra` members for sample `first`)."""
    samples = [{"key": f"{i:06d}", "png": png(i % 250), "txt": f"caption {i}"} for i in range(first, first + n)]
    return write_caption_shard(path, samples[:1] and [{**samples[0], **extra}, *samples[1:]])


def test_a_pipe_source_runs_nothing_without_the_opt_in(tiny_world, tmp_path, capsys):
    marker = tmp_path / "ran"
    with pytest.raises(DataError, match=r"runs a shell command; .*data.allow_commands=true"):
        open_source("caption", f"pipe:touch {marker}", SkipCounter())
    out = tmp_path / "run"
    code, line = cli(
        capsys, *train_args(tiny_world, out, f"data.sources.caption.path='pipe:touch {marker}'", "train.steps=1")
    )
    assert code == 2 and line.startswith(f"mm1 train: data error: data source 'pipe:touch {marker}' runs a shell")
    with pytest.raises(DataError, match="streams from the network"):
        open_source("caption", "https://example.com/shard-{000..009}.tar", SkipCounter())
    assert not marker.exists()


def test_a_shard_file_named_like_a_pipe_is_read_as_a_file_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    shard(tmp_path / "a.tar", 2)
    shard(tmp_path / "pipe:touch ran #.tar", 1, first=7)  # a real tar with a hostile name
    src = open_source("caption", "*.tar", SkipCounter())  # a relative glob returned bare names before
    assert all(Path(f).is_absolute() for f in src.files)
    assert sorted(r.key for r in src) == ["000000", "000001", "000007"]
    assert not marker.exists()


@pytest.fixture
def fake_gs(tmp_path, monkeypatch) -> Path:
    """A `gs` on PATH that leaves a marker if anything starts it (Pillow's EPS decoder would)."""
    import PIL.EpsImagePlugin as eps

    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(eps, "gs_binary", None)  # Pillow caches whether gs exists
    return marker


EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
    b"newpath 0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n"
)


def test_eps_bytes_named_png_never_reach_ghostscript(tmp_path, fake_gs):
    path = shard(tmp_path / "s.tar", 2)
    evil = shard(tmp_path / "evil.tar", 1, first=5)
    write_caption_shard(evil, [{"key": "000005", "png": EPS, "txt": "an EPS file named .png"}])
    records = list(open_source("caption", [path, evil], SkipCounter()))
    bad = next(r for r in records if r.key == "000005")
    with pytest.raises(
        ImageError,
        match=r"not a readable image \(a damaged header, or a format outside "
        r"data.image_formats=\['JPEG', 'PNG', 'WEBP'\]\)",
    ) as e:
        load_image(bad.image, bad.where)
    assert e.value.reason == "corrupt image" and not fake_gs.exists()
    with pytest.raises(ImageError):  # the control: with EPS allowed, Pillow does start gs
        load_image(bad.image, bad.where, formats=("EPS",))
    assert fake_gs.exists()


def test_a_sparse_member_claiming_a_gibibyte_is_skipped_and_counted_unread(tmp_path):
    if shutil.which("tar") is None:
        pytest.skip("needs GNU tar to write a sparse member")
    src = tmp_path / "src"
    src.mkdir()
    (src / "000000.png").write_bytes(png())
    (src / "000000.txt").write_text("kept")
    with open(src / "000001.png", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB of holes: a few KB in the tar
    (src / "000001.txt").write_text("bomb")
    out = tmp_path / "s.tar"
    subprocess.run(
        [
            "tar",
            "--sparse",
            "--format=gnu",
            "-cf",
            str(out),
            "-C",
            str(src),
            "000000.png",
            "000000.txt",
            "000001.png",
            "000001.txt",
        ],
        check=True,
    )
    assert out.stat().st_size < 1 << 20
    records, skips = read(["caption", out])
    assert [r.caption for r in records] == ["kept"]
    assert skips.counts == {"member too large": 1}
    assert "000001.png is 1073741824 bytes, over data.max_member_bytes=67108864" in caplog_text(skips)


def test_an_image_file_over_the_size_cap_is_refused_before_decoding(tmp_path):
    (tmp_path / "big.png").write_bytes(png(size=64))
    with pytest.raises(ImageError, match=r"big.png is \d+ bytes, over data.max_member_bytes=100; not decoded"):
        load_image(tmp_path / "big.png", max_bytes=100)
    with pytest.raises(ImageError, match=r"image is \d+ bytes, over data.max_member_bytes=100"):
        load_image(png(size=64), "k", max_bytes=100)


# ----------------------------------------------------------------------------- data: paths outside the data


def test_sft_image_paths_outside_the_data_folder_are_refused_and_counted(tmp_path):
    data, elsewhere = tmp_path / "sft", tmp_path / "elsewhere"
    (data / "images").mkdir(parents=True)
    elsewhere.mkdir()
    (data / "images" / "ok.png").write_bytes(png())
    (elsewhere / "private.png").write_bytes(png())
    (data / "escape").symlink_to(elsewhere)
    convo = [{"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "red"}]
    rows = [
        {"id": name, "image": image, "conversations": convo}
        for name, image in [
            ("ok", "images/ok.png"),
            ("dots", "../" * 30 + "etc/passwd"),
            ("abs", str(elsewhere / "private.png")),
            ("link", "escape/private.png"),
        ]
    ]
    (data / "train.json").write_text(json.dumps(rows))
    records, skips = read(["sft", data / "train.json"])
    assert [r.key for r in records] == ["ok"]
    assert skips.counts == {"image path outside the data": 3}
    assert "etc/passwd' resolves to /etc/passwd, outside the data folder" in caplog_text(skips)
    opened = read(["sft", data / "train.json"], policy=ReadPolicy(allow_outside_paths=True))[0]
    assert [r.key for r in opened] == ["ok", "dots", "abs", "link"]  # the opt-in takes them all


def test_eval_task_image_paths_outside_the_root_are_one_line(tmp_path):
    (tmp_path / "task").mkdir()
    (tmp_path / "secret.png").write_bytes(png())
    (tmp_path / "task" / "test.jsonl").write_text(
        json.dumps({"images": ["../secret.png"], "question": "q?", "answer": "a"}) + "\n"
    )
    (tmp_path / "task" / "spec.yaml").write_text("kind: multi\ntest: test.jsonl\n")
    with pytest.raises(
        DataError,
        match=r"test.jsonl:1: image '.*secret.png' resolves to .*secret.png, outside the "
        r"data folder .*task; .*allow_outside_paths",
    ):
        get_task(str(tmp_path / "task" / "spec.yaml")).test
    assert len(get_task(str(tmp_path / "task" / "spec.yaml"), allow_outside_paths=True).test) == 1


def test_eval_never_builds_a_world_where_a_checkpoint_config_says(run2, tmp_path, capsys):
    run = copy_run(run2, tmp_path)
    ckpt = run / "checkpoints" / "step-2"
    evil = tmp_path / "not-yours"
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["data"]["world"] = str(evil)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    sums = json.loads((ckpt / "checksums.json").read_text())
    sums["config.yaml"] = hashlib.sha256((ckpt / "config.yaml").read_bytes()).hexdigest()  # as an editor would
    (ckpt / "checksums.json").write_text(json.dumps(sums))
    code, line = cli(
        capsys, "eval", "--checkpoint", str(ckpt), "--tasks", "world_caption", "--shots", "0", "--limit", "2"
    )
    assert code == 2 and line.startswith(f"mm1 eval: config error: the checkpoint's config names data.world={evil}")
    assert not evil.exists()


# ----------------------------------------------------------------------------- data: hangs


def test_a_fifo_in_a_shard_folder_is_refused_not_waited_on(tmp_path):
    shard(tmp_path / "a.tar", 2)
    os.mkfifo(tmp_path / "zz.tar")
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blocked on the FIFO"))
    signal.alarm(20)
    try:
        with pytest.raises(DataError, match=r"zz.tar: not a regular file \(a FIFO\); mm1 reads only regular files"):
            open_source("caption", tmp_path, SkipCounter())
        with pytest.raises(DataError, match="a FIFO"):
            open_source("caption", str(tmp_path / "*.tar"), SkipCounter())
        with pytest.raises(ImageError, match="not a regular file"):
            load_image(tmp_path / "zz.tar")
        src = open_source("caption", tmp_path / "a.tar", SkipCounter())
        (tmp_path / "a.tar").unlink()
        os.mkfifo(tmp_path / "a.tar")  # a FIFO swapped in after the source was opened: counted, not waited on
        assert list(src) == [] and src.skips.counts == {"unreadable shard": 1}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- data: lost samples counted


def test_a_truncated_shard_counts_every_sample_it_lost(tmp_path):
    full = shard(tmp_path / "shard-0.tar", 40)
    cut = shard(tmp_path / "shard-1.tar", 40, first=40)
    raw = cut.read_bytes()
    cut.write_bytes(raw[: len(raw) // 4])  # a quarter uploaded: ~30 samples never arrive
    records, skips = read(["caption", [full, cut]])
    got = len(records) - 40
    assert skips.counts == {"truncated tar": 40 - got}  # from the complete shard next to it
    assert f"{40 - got} samples lost (estimated: the largest complete shard of this source held 40)" in caplog_text(
        skips
    )
    (tmp_path / "shard-1_stats.json").write_text(json.dumps({"successes": 40}))  # img2dataset's index
    records, skips = read(["caption", cut])
    assert skips.counts == {"truncated tar": 40 - got}
    with pytest.raises(DataError, match=r"skipped \d+ of 80 samples .* more than data.max_skip_rate=0.05"):
        read(["caption", [full, cut]], min_samples=50)  # the rate trips, as it never did at one skip per shard


def test_a_damaged_header_inside_a_tar_gz_is_detected_like_a_plain_tar(tmp_path):
    raw = bytearray(shard(tmp_path / "s.tar", 40).read_bytes())
    with tarfile.open(tmp_path / "s.tar") as tar:
        offsets = [m.offset for m in tar.getmembers()]
    raw[offsets[20] + 148 : offsets[20] + 156] = b"garbage!"  # sample 10's header checksum
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(bytes(raw)))
    records, skips = read(["caption", tmp_path / "s.tar.gz"])
    assert len(records) == 10
    assert list(skips.counts) == ["broken tar member"] and 25 <= skips.counts["broken tar member"] <= 35
    assert "estimated from the byte offset" in caplog_text(skips)


# ----------------------------------------------------------------------------- resume and the run dir

RUN2 = ["train.steps=2", "train.save_every=1", "train.keep_last=0"]


def snapshot(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in ("config.yaml", "run.json", "metrics.jsonl")}


@pytest.mark.parametrize(
    "override,shown",
    [
        ("train.lr=0.05", "train.lr: None -> 0.05"),
        ("model.lm.dim=128", "model.lm.dim: 256 -> 128"),
        ("data.sources.caption.path=/elsewhere/caption", "data.sources.caption.path: '{world}/caption' -> '/elsewhere"),
        (
            "train.steps=3",
            "train.steps: 2 -> 3. Nothing was written. To apply train.steps, add --allow-change train.steps",
        ),
    ],
)
def test_resume_refuses_a_silent_change_and_writes_nothing(run2, tiny_world, tmp_path, capsys, override, shown):
    run = copy_run(run2, tmp_path)
    before = snapshot(run)
    code, line = cli(capsys, *train_args(tiny_world, run, *RUN2, override), "--resume")
    assert code == 2 and line.startswith(f"mm1 train: config error: --resume would change the run in {run}"), line
    assert shown in line and "train.init_from=" in line
    assert snapshot(run) == before


def test_an_allowed_change_on_resume_is_applied_for_real_and_logged(run2, tiny_world, tmp_path, capsys):
    run = copy_run(run2, tmp_path)
    capsys.readouterr()
    assert (
        main(
            train_args(tiny_world, run, "train.steps=3", "train.save_every=1", "train.keep_last=0")
            + ["--resume", "--allow-change", "train.steps"]
        )
        == 0
    )
    assert "--resume applies train.steps: 2 -> 3" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 3
    code, line = cli(
        capsys, *train_args(tiny_world, run, "train.steps=3"), "--resume", "--allow-change", "model.lm.dim"
    )
    assert code == 2 and "--allow-change model.lm.dim: cannot change on resume" in line


def test_a_restart_from_step_zero_truncates_the_metrics(run2, tiny_world, tmp_path, capsys):
    run = copy_run(run2, tmp_path)
    shutil.rmtree(run / "checkpoints")  # killed before its first checkpoint: steps 1, 2 are redone
    assert main(train_args(tiny_world, run, *RUN2) + ["--resume"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2]  # not 1, 2, 1, 2


def test_a_second_process_on_a_run_dir_gets_one_line_naming_the_holder(run2, tiny_world, tmp_path, capsys):
    run = copy_run(run2, tmp_path)
    before = snapshot(run)
    env = {**os.environ, "PYTHONPATH": str(Path("src").resolve()) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom mm1.train.run_dir import RunDirLock\n"
            "with RunDirLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n",
            str(run),
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, line = cli(capsys, *train_args(tiny_world, run, *RUN2), "--resume")
        assert code == 2 and line == (
            f"mm1 train: error: {run} is in use by another mm1 train (pid {holder.pid} on "
            f"{socket.gethostname()}; lock {run / LOCK_NAME}); wait for it to finish or "
            "stop it, or use another --out"
        )
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with RunDirLock(run):  # the holder died without unlocking: its stale lock file does not block
        assert "pid" in (run / LOCK_NAME).read_text()
