"""`cxr-batch train` in an unlucky operator's hands: a folder that lacks images or holds a
corrupt one, an --out that already holds a bundle or a run, ImageNet weights without internet,
Ctrl-C in the middle of an epoch. Each gets one clear line, and no bundle is overwritten or
left half-written. Tiny real runs (quick.toml, 64 px, 1-2 epochs)."""

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .conftest import REPO

QUICK = REPO / "training" / "configs" / "quick.toml"


def train_cmd(images, metadata, out, *extra):
    return [sys.executable, "-m", "cxr_batch", "train", "--images", str(images), "--metadata", str(metadata),
            "--out", str(out), "--config", str(QUICK), "--device", "cpu", *map(str, extra)]


def train(images, metadata, out, *extra, env=None):
    return subprocess.run(train_cmd(images, metadata, out, *extra), capture_output=True, text=True, timeout=600,
                          env=env)


def folder_digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_out_that_is_a_bundle_or_a_folder_of_bundles_is_refused_and_left_as_it_was(nih, tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(REPO / "weights" / "cxr-fpn-v1", weights / "cxr-fpn-v1")
    before = folder_digest(weights)
    # and a folder inside a bundle: v1's training_run holds the metrics and thresholds its card cites
    for out in (weights / "cxr-fpn-v1", weights, weights / "cxr-fpn-v1" / "training_run"):
        for extra in ((), ("--resume",)):
            proc = train(nih / "images", nih / "labels.csv", out, *extra)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert "weights bundle" in proc.stderr and "another --out" in proc.stderr, proc.stderr
    assert folder_digest(weights) == before


def test_imagenet_download_without_internet_is_one_line_before_any_work(nih, tmp_path):
    # the download goes to a proxy that refuses every connection: nothing leaves this machine
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    proc = train(nih / "images", nih / "labels.csv", tmp_path / "run", "--imagenet", "torchvision", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("cxr-batch: error:")]
    assert len(error) == 1 and "ImageNet" in error[0] and "--imagenet FILE" in error[0], proc.stderr
    assert not (tmp_path / "run" / "prepared.csv").exists()  # refused before the data was touched


def test_missing_and_corrupt_training_images_are_reported_not_a_traceback(nih, tmp_path):
    names = sorted(p.name for p in (nih / "images").glob("*.png"))[:60]
    images = tmp_path / "images"
    images.mkdir()
    for name in names:
        (images / name).symlink_to(nih / "images" / name)
    # two images the run keeps whatever the split (balancing thins 'No Finding' and Atelectasis-only images)
    labels = {row[0]: row[1] for row in csv.reader((nih / "labels.csv").read_text().splitlines())}
    zero, truncated = [n for n in names if labels[n] not in ("No Finding", "Atelectasis")][2:4]
    (images / zero).unlink()
    (images / zero).write_bytes(b"")
    (images / truncated).unlink()
    (images / truncated).write_bytes((nih / "images" / truncated).read_bytes()[:3000])
    run = tmp_path / "run"
    proc = train(images, nih / "labels.csv", run, "--limit", 60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    n_rows = len((nih / "labels.csv").read_text().splitlines()) - 1
    assert f"{n_rows - 60} of {n_rows} rows of {nih / 'labels.csv'} name images not in {images}" in proc.stderr
    assert "2 images cannot be read" in proc.stderr and "unreadable_images.txt" in proc.stderr, proc.stderr
    listed = (run / "unreadable_images.txt").read_text().split("\n")
    assert {line.split("\t")[0] for line in listed if line} == {zero, truncated}
    assert zero not in proc.stderr and not (run / "bundle").exists()  # the log names no file


@pytest.mark.slow
def test_ctrl_c_mid_epoch_then_the_same_command_resumes_and_a_finished_run_is_not_overwritten(nih, tmp_path):
    run = tmp_path / "run"
    cmd = train_cmd(nih / "images", nih / "labels.csv", run, "--epochs", 3, "--limit", 200)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:  # epoch 1 finished and checkpointed: interrupt in the middle of the next
            lines.append(line)
            if "epoch 1 " in line:
                deadline = time.monotonic() + 60
                while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(0.5)
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    stderr = "".join(lines) + rest
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "interrupted" in stderr and "--resume" in stderr
    assert not (run / "bundle" / "manifest.json").exists()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # the same command: refused
    assert again.returncode == 1 and "--resume" in again.stderr and "Traceback" not in again.stderr, again.stderr
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resumed after epoch 1" in resumed.stderr, resumed.stderr[-2000:]
    bundle = folder_digest(run / "bundle")

    once_more = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert once_more.returncode == 1 and "holds a finished run" in once_more.stderr, once_more.stderr[-2000:]
    assert folder_digest(run / "bundle") == bundle


class Interrupt:
    def __reduce__(self):
        raise KeyboardInterrupt  # Ctrl-C while the object is written


def test_a_checkpoint_interrupted_while_written_keeps_the_previous_one(tmp_path):
    import torch

    from training.train import load_checkpoint, save_atomic

    path = tmp_path / "checkpoint.pt"
    earlier = {"model": {"w": torch.ones(3)}, "optimizer": {}, "lr_scheduler": {}, "epoch": 4}
    save_atomic(earlier, path)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({**earlier, "epoch": 5, "extra": Interrupt()}, path)
    assert load_checkpoint(path, "cpu")["epoch"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_an_image_size_the_network_cannot_take_is_refused_before_any_work(nih, tmp_path):
    """The CLI refuses --image-size under 32; a TOML's [preprocessing] image_size must be held to the
    same bound (at 16 px DenseNet's last pooling has nothing left: a traceback after the data stages)."""
    config = tmp_path / "tiny.toml"
    config.write_text(QUICK.read_text().replace("image_size = 64", "image_size = 16"))
    cmd = train_cmd(nih / "images", nih / "labels.csv", tmp_path / "run")
    cmd[cmd.index(str(QUICK))] = str(config)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "image_size" in proc.stderr and "32" in proc.stderr
    assert not (tmp_path / "run" / "prepared.csv").exists()


def test_train_help_states_the_defaults_the_run_uses():
    from click.testing import CliRunner

    from cxr_batch.cli import main
    from training.config import TrainConfig

    text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    cfg = TrainConfig()
    for option, value, following in (("--epochs", cfg.epochs, "--image-size"),
                                     ("--image-size", cfg.preprocessing.image_size, "--batch-size"),
                                     ("--batch-size", cfg.batch_size, "--limit"), ("--device", cfg.device, "--resume")):
        shown = text.split(f" {option} ", 1)[1].split(f" {following} ", 1)[0]
        assert f"[default: {value}]" in shown, (option, shown)


def test_a_misspelt_finding_names_the_table_and_the_known_findings_before_any_work(nih, tmp_path):
    rows = (nih / "labels.csv").read_text().splitlines()
    rows[1] = rows[1].replace("Cardiomegaly", "Cardiomegally", 1)
    assert "Cardiomegally" in rows[1]
    metadata = tmp_path / "labels.csv"
    metadata.write_text("\n".join(rows) + "\n")
    proc = train(nih / "images", metadata, tmp_path / "run")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{metadata}: unknown finding 'Cardiomegally'" in proc.stderr and "Pneumothorax" in proc.stderr
    assert not (tmp_path / "run" / "prepared.csv").exists()


def nih_rows(nih, n):
    """The header and the first ``n`` rows of the NIH labels table, as lists of fields."""
    rows = list(csv.reader((nih / "labels.csv").read_text().splitlines()))
    return rows[0], rows[1:n + 1]


def write_csv(path, header, rows):
    path.write_text("\n".join(",".join(row) for row in [header, *rows]) + "\n")
    return path


def test_split_lists_that_put_a_patient_or_an_image_on_both_sides_are_refused_as_leakage(nih, tmp_path):
    """A hospital's own train_val/test lists: an image in both, or two images of one patient
    split across them, would score the test on what training saw. Refused before any work,
    naming them (was a traceback for the patient, and silence for the image: trained on and
    dropped from the test)."""
    header, rows = nih_rows(nih, 60)
    names = [row[0] for row in rows]
    train_val = tmp_path / "train_val_list.txt"
    test = tmp_path / "test_list.txt"
    train_val.write_text("\n".join(names[:45] + names[-2:]) + "\n")  # the test list's last two images too
    test.write_text("\n".join(names[45:]) + "\n")
    proc = train(nih / "images", nih / "labels.csv", tmp_path / "run", "--limit", 60, "--split-lists", train_val, test)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "2 images are in both --split-lists files" in proc.stderr and names[-1] in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "prepared.csv").exists()

    train_val.write_text("\n".join(names[:45]) + "\n")
    shared = rows[50][3]  # a test image's patient given to a training image too
    leaked = [row[:3] + [shared] + row[4:] if i == 0 else row for i, row in enumerate(rows)]
    metadata = write_csv(tmp_path / "labels.csv", header, leaked)
    proc = train(nih / "images", metadata, tmp_path / "run", "--limit", 60, "--split-lists", train_val, test)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"1 patient has images in both --split-lists files ({shared})" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "prepared.csv").exists()


def test_an_image_named_on_two_rows_of_the_metadata_is_refused(nih, tmp_path):
    """Two rows for one image (a table concatenated twice, a re-export under other patient IDs)
    put the same pixels in training and in the test. Refused before any work, naming them."""
    header, rows = nih_rows(nih, 60)
    again = [row[:3] + [str(900000 + i)] + row[4:] for i, row in enumerate(rows[:3])]
    metadata = write_csv(tmp_path / "labels.csv", header, rows + again)
    proc = train(nih / "images", metadata, tmp_path / "run", "--limit", 100)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{metadata}: 3 images are on more than one row" in proc.stderr and rows[0][0] in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "prepared.csv").exists()


def test_a_disk_full_for_the_checkpoint_names_the_file_and_resume(nih, small_disk):
    """The run's disk fills when the first weights are written (a DenseNet-121 is ~30 MB; the
    data stages fit in the 4 MiB): one line naming the file, the full disk and --resume (was
    'error: [Errno 28] No space left on device'), and no temporary file left taking the space."""
    run = small_disk / "run"
    proc = train(nih / "images", nih / "labels.csv", run)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("cxr-batch: error:")]
    assert len(error) == 1 and f"{run}/" in error[0] and "No space left on device" in error[0], proc.stderr
    assert "--resume" in error[0], error
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_dicom_and_16_bit_png_training_images_are_read_as_a_scan_reads_them(nih, tmp_path):
    """A site's labelled studies are DICOM files and PNGs of any depth, named in the table as they
    are on disk. Training reads them with the scan's reader (was: every non-PNG file 'not in'
    the folder, left out), and a held-out image is scored from the same pixels a scan sees."""
    import numpy as np
    from PIL import Image

    from cxr_batch.readers import read_study
    from training.cache import decode_resized

    from .dicomgen import grey, write

    header, rows = nih_rows(nih, 48)
    images = tmp_path / "images"
    images.mkdir()
    for i, row in enumerate(rows):
        source = nih / "images" / row[0]
        if i < 6:  # 12-bit DICOM, stored as x16 like a detector's output
            row[0] = row[0].replace(".png", ".dcm")
            write(images / row[0], grey(source).astype(np.uint16) * 16, BitsStored=12, HighBit=11)
        elif i < 10:  # 16-bit PNG
            Image.fromarray(grey(source).astype(np.uint16) * 257).save(images / row[0])
        else:
            (images / row[0]).symlink_to(source)
    metadata = write_csv(tmp_path / "labels.csv", header, rows)
    run = tmp_path / "run"
    proc = train(images, metadata, run, "--epochs", 0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not in" not in proc.stderr, proc.stderr
    assert json.loads((run / "prepare.json").read_text())["rows_read"] == 48  # none left out
    for row in rows[:6]:  # a 12-bit DICOM without VOI decodes to its PNG's exact grey levels, as in a scan
        png = nih / "images" / row[0].replace(".dcm", ".png")
        assert np.array_equal(read_study(images / row[0]).grey, grey(png))
        assert np.array_equal(decode_resized(images / row[0], 72), decode_resized(png, 72))


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(nih, tmp_path):
    """Stopped after epoch 1 and resumed, a run must end where the same run without a stop ends
    (the same seed on the same CPU): the random state of the shuffling and the augmentation is
    part of the checkpoint (was re-seeded from the start: another epoch 2, other weights)."""
    import torch

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(nih / "images", nih / "labels.csv", whole, "--epochs", 2).returncode == 0
    assert train(nih / "images", nih / "labels.csv", parts, "--epochs", 1).returncode == 0
    resumed = train(nih / "images", nih / "labels.csv", parts, "--epochs", 2, "--resume")
    assert resumed.returncode == 0 and "resumed after epoch 1" in resumed.stderr, resumed.stderr[-2000:]
    # the last epoch's weights (the bundle holds the best epoch's, which may be epoch 1 in both)
    a, b = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (whole, parts))
    assert [e["train_loss"] for e in a["history"]] == [e["train_loss"] for e in b["history"]]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_images_in_neither_split_list_are_counted_not_dropped_silently(nih, tmp_path):
    """A site's lists that forget images: the run says how many it leaves out and records the
    lists it split by (prepare.json said 'official lists' of any files, and nothing of these)."""
    header, rows = nih_rows(nih, 60)
    names = [row[0] for row in rows]
    train_val, test = tmp_path / "mine_train.txt", tmp_path / "mine_test.txt"
    train_val.write_text("\n".join(names[:40]) + "\n")
    test.write_text("\n".join(names[45:]) + "\n")  # 40-44 in neither
    run = tmp_path / "run"
    proc = train(nih / "images", nih / "labels.csv", run, "--limit", 60, "--epochs", 0, "--split-lists", train_val, test)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "5 images are in neither --split-lists file: left out" in proc.stderr, proc.stderr
    info = json.loads((run / "prepare.json").read_text())
    assert "mine_train.txt" in info["split"] and "mine_test.txt" in info["split"] and info["not_in_lists"] == 5


def test_resume_with_other_settings_or_data_is_refused_before_any_work(nih, tmp_path):
    """--resume continues the checkpoint's run: given another image size or another table, it
    went on training those weights on other inputs and the bundle described only the last
    command's. Refused before the data stages rewrite the run folder, naming what differs;
    --epochs may grow (that is what resuming a finished run is for)."""
    run = tmp_path / "run"
    assert train(nih / "images", nih / "labels.csv", run, "--epochs", 1).returncode == 0
    prepared = (run / "prepared.csv").read_bytes()
    header, rows = nih_rows(nih, 60)
    other = write_csv(tmp_path / "other.csv", header, rows[10:])
    for extra, said in ((("--image-size", 32), "preprocessing.image_size 64 (this command: 32)"),
                        (("--metadata", other), f"metadata {nih / 'labels.csv'} (this command: {other})")):
        cmd = train_cmd(nih / "images", nih / "labels.csv", run, "--epochs", 2, "--resume")
        flag = cmd.index(extra[0]) if extra[0] in cmd else None
        cmd = cmd[:flag] + cmd[flag + 2:] if flag is not None else cmd
        proc = subprocess.run(cmd + [extra[0], str(extra[1])], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert said in proc.stderr and "another --out" in proc.stderr, proc.stderr
        assert (run / "prepared.csv").read_bytes() == prepared


def test_resume_with_the_same_inputs_named_otherwise_goes_on(nih, tmp_path):
    """The same run resumed from another folder: the image folder given relative where it was
    absolute, the same table moved to another place. Nothing the weights learn from differs, and
    --resume refused it ('metadata A (this command: B)'), leaving the operator to retrain."""
    table = tmp_path / "first" / "labels.csv"
    table.parent.mkdir()
    shutil.copy(nih / "labels.csv", table)
    run = tmp_path / "run"
    assert train(nih / "images", table, run, "--epochs", 1).returncode == 0
    moved = tmp_path / "moved" / "labels.csv"
    moved.parent.mkdir()
    table.rename(moved)
    images = os.path.relpath(nih / "images", tmp_path)
    proc = subprocess.run(train_cmd(images, moved, run, "--epochs", 2, "--resume"), capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed after epoch 1" in proc.stderr, proc.stderr[-2000:]
    header, rows = nih_rows(nih, 60)
    write_csv(moved, header, rows[10:])  # edited in place: another table under the same name
    proc = subprocess.run(train_cmd(nih / "images", moved, run, "--epochs", 3, "--resume"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1 and f"metadata {moved} (this command: the same path, other content)" in proc.stderr, \
        proc.stderr[-2000:]


def test_a_disk_full_while_the_image_cache_is_written_is_one_line_not_a_bus_error(nih, small_disk):
    """The cache is a run's largest file (about 7 GB for the full NIH set at 224 px) and was
    written through a memory map of a sparse file: on a full disk the process died of SIGBUS
    (exit 135) with no word said. Now its space is taken before any pixel is written: one line
    naming the file, its size and the full disk."""
    run = small_disk / "run"
    proc = train(nih / "images", nih / "labels.csv", run, "--image-size", 300)  # 48 x 334 x 334 bytes > 4 MiB
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-2000:])
    error = [line for line in proc.stderr.splitlines() if line.startswith("cxr-batch: error:")]
    assert len(error) == 1 and f"{run}/cache_334.u8" in error[0] and "No space left on device" in error[0], proc.stderr
    assert re.search(r"it needs \d+\.\d MB", error[0]) and "Errno" not in error[0], error
    assert not (run / "cache_334.u8").exists()  # not left holding the space


def test_an_imagenet_file_that_is_cut_off_or_not_imagenet_weights_is_one_line_before_any_work(nih, tmp_path):
    """`--imagenet FILE` was loaded without the checks `--init-backbone` makes: a cut-off
    download was a traceback, and a TorchXRayVision file a traceback of 'size mismatch' after
    the data stages had run."""
    import torch
    from torchvision.models import densenet121

    torch.save(densenet121(weights=None).state_dict(), tmp_path / "tv.pth")
    data = (tmp_path / "tv.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    one_channel = densenet121(weights=None).state_dict()
    one_channel["features.conv0.weight"] = one_channel["features.conv0.weight"][:, :1]
    torch.save(one_channel, tmp_path / "xrv.pt")
    for name, why in (("cut.pth", "cut off"), ("xrv.pt", "TorchXRayVision backbone (one input channel), not ImageNet "
                                                          "weights: pass it as --init-backbone")):
        run = tmp_path / f"run_{name}"
        proc = train(nih / "images", nih / "labels.csv", run, "--imagenet", tmp_path / name)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        error = [line for line in proc.stderr.splitlines() if line.startswith("cxr-batch: error:")]
        assert len(error) == 1 and why in error[0], proc.stderr
        assert not (run / "prepared.csv").exists()  # refused before the data was touched


def test_a_run_killed_while_writing_its_checkpoint_leaves_no_temporary_file_behind_its_resume(nih, tmp_path):
    """SIGKILL in the middle of writing checkpoint.pt leaves its temporary file (a DenseNet-121
    with Adam's state: about 100 MB), and no later run removed it. The run folder is now one
    run's at a time (a second is refused while the first runs, its files left alone) and a
    run starting there removes what a killed one left."""
    from cxr_batch.folderlock import FolderLock

    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 1000)
    with FolderLock(run, "train"):  # another run is writing there
        busy = train(nih / "images", nih / "labels.csv", run, "--epochs", 0, "--image-size", 32)
    assert busy.returncode == 1 and "Traceback" not in busy.stderr, busy.stderr[-2000:]
    assert "in use by cxr-batch train" in busy.stderr and stale.exists(), busy.stderr
    proc = train(nih / "images", nih / "labels.csv", run, "--epochs", 0, "--image-size", 32, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not stale.exists() and (run / "bundle" / "manifest.json").is_file()


def test_a_killed_run_s_decoding_workers_do_not_keep_its_run_folder_locked(tmp_path):
    """The image cache is decoded by a pool of forked workers; SIGKILL of the run (the OOM
    killer, a lost session) left them behind asleep, and as forked children they held the run
    folder's lock: the next run and --resume were refused, 'in use by cxr-batch train' naming
    the dead process, for as long as the orphans lived (for ever)."""
    from pathlib import Path

    from cxr_batch.folderlock import FolderBusy, FolderLock

    run = tmp_path / "run"
    run.mkdir()
    # the run as far as its cache: the folder held, then a pool of forked decoding workers
    script = ("import sys, time\n"
              "from concurrent.futures import ProcessPoolExecutor\n"
              "from pathlib import Path\n"
              "from training.train import hold_run_folder\n"
              "lock = hold_run_folder(Path(sys.argv[1]))\n"
              "pool = ProcessPoolExecutor(2)\n"
              "print(*pool.map(abs, [-1, -2]), flush=True)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(run)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().split() == ["1", "2"]  # the workers run
        workers = [int(p) for p in (Path("/proc") / str(proc.pid) / "task" / str(proc.pid) / "children")
                   .read_text().split()]
        assert workers
        with pytest.raises(FolderBusy):  # the run holds its folder while its workers decode
            FolderLock(run, "train").acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert all(Path(f"/proc/{w}").exists() for w in workers)  # orphaned, still there
        with FolderLock(run, "train"):  # the next run (or --resume) takes the folder
            pass
    finally:
        proc.kill()
        for w in locals().get("workers", []):
            try:
                os.kill(w, signal.SIGKILL)
            except OSError:
                pass


def test_a_killed_run_s_decoding_workers_end_with_it(tmp_path):
    """SIGKILL of a run while its image cache was decoded left the pool's forked workers asleep
    for ever (each holding the memory it had mapped): they now end once the run is gone."""
    from pathlib import Path

    script = ("import time\n"
              "from training.cache import decoding_pool\n"
              "pool = decoding_pool(2)\n"
              "print(*pool.map(abs, [-1, -2]), flush=True)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    workers = []
    try:
        assert proc.stdout.readline().split() == ["1", "2"]  # the workers run
        workers = [int(p) for p in (Path("/proc") / str(proc.pid) / "task" / str(proc.pid) / "children")
                   .read_text().split()]
        assert workers
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

        def alive(pid):  # ended once it is gone or a zombie (whoever adopted it reaps it)
            try:
                return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(alive(w) for w in workers)
    finally:
        proc.kill()
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.parametrize("resamples", [1, 50, 199])
def test_too_few_bootstrap_resamples_for_a_95_interval_are_refused_before_any_work(nih, tmp_path, resamples):
    """`bootstrap = 50` trained, then printed a "95% CI" from 50 resamples, which `cxr-batch evaluate
    --bootstrap 50` refuses to make: the same minimum holds for both, before any work."""
    from cxr_batch.metrics import MIN_RESAMPLES

    config = tmp_path / "few.toml"
    config.write_text(re.sub(r"(?m)^bootstrap = \d+.*$", f"bootstrap = {resamples}", QUICK.read_text()))
    assert f"bootstrap = {resamples}\n" in config.read_text()
    cmd = train_cmd(nih / "images", nih / "labels.csv", tmp_path / "run")
    cmd[cmd.index(str(QUICK))] = str(config)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("cxr-batch: error:")]
    assert len(error) == 1 and f"bootstrap = {resamples}" in error[0], proc.stderr
    assert f"at least {MIN_RESAMPLES}" in error[0] and "0" in error[0], error
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_train_and_evaluate_share_one_minimum_of_bootstrap_resamples(tmp_path):
    from click.testing import CliRunner

    from cxr_batch.cli import main
    from cxr_batch.config import ConfigError
    from cxr_batch.metrics import MIN_RESAMPLES
    from training.config import TrainConfig

    for n in (0, MIN_RESAMPLES, 2000):
        assert TrainConfig(bootstrap=n).bootstrap == n
    with pytest.raises(ConfigError, match=f"at least {MIN_RESAMPLES}"):
        TrainConfig(bootstrap=MIN_RESAMPLES - 1)
    (tmp_path / "labels.csv").write_text("Image Index,Finding Labels\n")
    refused = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--labels", str(tmp_path / "labels.csv"), "--out",
                                        str(tmp_path / "out"), "--bootstrap", str(MIN_RESAMPLES - 1)])
    assert refused.exit_code == 2 and f"at least {MIN_RESAMPLES}" in refused.output, refused.output
    text = " ".join(CliRunner().invoke(main, ["evaluate", "--help"]).output.split())
    assert f"at least {MIN_RESAMPLES}" in text


def test_a_run_that_fails_in_process_lets_go_of_its_run_folder(nih, tmp_path):
    """training.train.main took the run folder's lock without letting go of it when the run
    raised: called in-process (a notebook, a test, a caller's retry loop), the same call made
    again, the data fixed or not, was refused 'in use by cxr-batch train' naming this very
    process, until the process ended."""
    from cxr_batch.folderlock import FolderLock
    from training.config import TrainConfig
    from training.train import main

    (tmp_path / "images").mkdir()  # none of the table's images: the run stops after taking the folder
    cfg = TrainConfig.load(QUICK, images=str(tmp_path / "images"), metadata=str(nih / "labels.csv"),
                           out=str(tmp_path / "run"), device="cpu")
    for _ in range(2):  # the second call fails for the same reason, not for the lock
        with pytest.raises(ValueError, match="no image of") as failed:
            main(cfg)
        assert "in use" not in str(failed.value)
    with FolderLock(tmp_path / "run", "train"):  # free for the next run, in this process or another
        pass


@pytest.fixture()
def disk_60m(tmp_path):
    """A 60 MiB tmpfs: room for one DenseNet's weights (~39 MB), not two (needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_disk_full_after_the_epochs_is_one_line_and_leaves_no_half_weights(nih, disk_60m):
    """The disk fills after training, while the run's final weights are written (model_final.pt,
    then the bundle): was a torch RuntimeError traceback ('unexpected pos 33353408 vs 33353296')
    and a model_final.pt cut off at 34 of its 39 MB. Now one line naming the file and --resume,
    no half file; with room again the same command with --resume ends with a bundle that loads."""
    run = disk_60m / "run"
    proc = train(nih / "images", nih / "labels.csv", run, "--epochs", 0)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("cxr-batch: error:")]
    assert len(error) == 1 and f"{run}/" in error[0] and "No space left on device" in error[0], proc.stderr
    assert "--resume" in error[0], error
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert not (run / "model_final.pt").exists() and not (run / "bundle" / "model.pt").exists()
    subprocess.run(["mount", "-o", "remount,size=200m", str(disk_60m)], check=True)
    proc = train(nih / "images", nih / "labels.csv", run, "--epochs", 0, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from cxr_batch.bundle import load_bundle
    load_bundle(run / "bundle")


def test_a_run_killed_while_its_bundle_was_written_leaves_no_temporary_file_in_the_bundle(tmp_path):
    """SIGKILL while bundle/model.pt is written leaves a ~39 MB temporary file in bundle/: the
    next run into the folder (--resume) removed those of the run folder only, so it stayed in
    the bundle that is then shipped."""
    from training.train import hold_run_folder

    run = tmp_path / "run"
    (run / "bundle").mkdir(parents=True)
    left = run / "bundle" / ".model.pt.k3j2h1.tmp"
    left.write_bytes(b"\0" * 1024)
    (run / "bundle" / "model.pt").write_bytes(b"weights")
    hold_run_folder(run).release()
    assert not left.exists() and (run / "bundle" / "model.pt").exists()


def test_resume_of_a_finished_run_is_refused_and_keeps_its_bundle(nih, tmp_path, small_bundle):
    """--resume on a run whose bundle was written, with no epoch left to train (here an --epochs 0
    run's), trained nothing and wrote the bundle again:
    a new model.pt and manifest, so a new bundle_sha256, and the results scored with the
    bundle no longer named it (monitor finds a results.csv's bundle by it)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(small_bundle, run / "bundle")  # as an --epochs 0 run leaves it: no checkpoint
    before = folder_digest(run)
    proc = train(nih / "images", nih / "labels.csv", run, "--resume")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "holds a finished run" in proc.stderr and "nothing to resume" in proc.stderr, proc.stderr
    assert folder_digest(run) == before


@pytest.mark.slow
def test_a_run_trained_on_and_killed_before_its_new_bundle_is_finished_by_resume(nih, tmp_path):
    """A finished 1-epoch run trained on with --resume --epochs 2 and killed after its second epoch,
    before the new bundle's manifest was written, keeps the first bundle's manifest: --resume
    --epochs 2 was refused as 'a finished run ... it trained 2 of 2 epochs', so the only ways on
    were to train more epochs or to lose the run. The bundle of the first finish is not this
    checkpoint's: the same command finishes the run, a bundle with both epochs."""
    run = tmp_path / "run"
    assert train(nih / "images", nih / "labels.csv", run).returncode == 0
    first = tmp_path / "first_bundle"
    shutil.copytree(run / "bundle", first)
    assert train(nih / "images", nih / "labels.csv", run, "--resume", "--epochs", 2).returncode == 0
    shutil.rmtree(run / "bundle")  # as the kill left it: the first finish's manifest
    shutil.copytree(first, run / "bundle")
    proc = train(nih / "images", nih / "labels.csv", run, "--resume", "--epochs", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert [r["epoch"] for r in manifest["training"]["history"]] == [1, 2]
    proc = train(nih / "images", nih / "labels.csv", run, "--resume", "--epochs", 2)  # now it is finished
    assert proc.returncode == 1 and "holds a finished run" in proc.stderr, proc.stderr[-2000:]
