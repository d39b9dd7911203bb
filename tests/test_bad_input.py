"""Bad input ends a command with one line that names the file or key, exit status 2 and no
traceback, before anything that looks like a finished run is written; a bad sample among
good ones is skipped and counted per reason in metrics.json."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import FILES_SMOKE
from PIL import Image

from limoe import cli
from limoe.config import check_types
from limoe.data.csv import read_csv
from limoe.data.skips import SkipCounts
from limoe.train import build_datamodule, build_module, compose, train

BIN = Path(sys.executable).parent
QUIET = ["callbacks.progress_bar=null", "trainer.enable_progress_bar=false"]
CSV_RUN = [*FILES_SMOKE, *QUIET, "data=csv", "data.batch_size=2", "trainer.max_steps=2"]


def image(path: Path, level: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (level, level, level)).save(path)
    return path


def write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(("filepath", "title"))
        writer.writerows(rows)
    return path


@pytest.fixture
def good_csv(tmp_path) -> Path:
    rows = [(image(tmp_path / f"img/{i}.png", 20 * i).name, f"grey {i}") for i in range(8)]
    return write_rows(tmp_path / "good.csv", [(f"img/{name}", cap) for name, cap in rows])


def limoe(entry: str, *args: str, monkeypatch, capsys) -> tuple[int, str]:
    """Run a console script in this process; its exit status and standard error."""
    monkeypatch.setattr(sys, "argv", [f"limoe-{entry}", *args])
    with pytest.raises(SystemExit) as exit:
        getattr(cli, entry)()
    return exit.value.code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("limoe: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def assert_fails(entry: str, args: list[str], message: str, monkeypatch, capsys) -> None:
    code, err = limoe(entry, *args, monkeypatch=monkeypatch, capsys=capsys)
    line = one_error_line(err)
    assert code == 2 and message in line, line


def assert_no_run(run_dir: Path) -> None:
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoints").exists()


# ---------------------------------------------------------------------------- data files


def test_a_csv_with_a_header_and_no_rows_stops_before_training(tmp_path, monkeypatch, capsys):
    empty = write_rows(tmp_path / "empty.csv", [])
    run_dir = tmp_path / "run"
    args = [*CSV_RUN, f"data.train_data={empty}", f"hydra.run.dir={run_dir}"]
    message = f"data.train_data={empty} holds no samples (0 rows read)"
    assert_fails("train", args, message, monkeypatch, capsys)
    assert_no_run(run_dir)


def test_a_csv_whose_every_image_is_missing_names_the_file_and_the_reason(
    tmp_path, monkeypatch, capsys
):
    missing = write_rows(tmp_path / "m.csv", [(f"nope/{i}.png", f"grey {i}") for i in range(5)])
    run_dir = tmp_path / "run"
    args = [*CSV_RUN, f"data.train_data={missing}", f"hydra.run.dir={run_dir}", "test=false"]
    message = f"data.train_data={missing}: no usable sample among 5 rows read (5 missing file)"
    assert_fails("train", args, message, monkeypatch, capsys)
    assert_no_run(run_dir)


def test_a_split_mostly_unusable_stops_at_max_skipped_fraction(good_csv, tmp_path):
    rows = [(f"img/{i}.png", f"grey {i}") for i in range(4)] + [("img/x.png", "gone")] * 5
    path = write_rows(tmp_path / "mostly.csv", rows)
    counts = SkipCounts(f"data.val_data={path}")
    assert len(read_csv(path, counts=counts)) == 4
    with pytest.raises(ValueError, match=r"5 of 9 rows are unusable \(5 missing file\), more than "
                       r"data.max_skipped_fraction=0.5; check the image paths"):  # fmt: skip
        counts.check(0.5)
    counts.check(5 / 9)  # exactly at the limit: the run goes on


def test_unusable_val_test_and_zeroshot_data_stop_before_training(good_csv, tmp_path):
    empty = write_rows(tmp_path / "empty.csv", [])
    (tmp_path / "zs/cat").mkdir(parents=True)
    (tmp_path / "zs/cat/notes.png").write_text("not an image")
    cases = {
        f"data.val_data={empty}": f"data.val_data={empty} holds no samples",
        f"data.test_data={empty}": f"data.test_data={empty} holds no samples",
        f"+data.zeroshot.pets.root={tmp_path / 'zs'}": (
            f"data.zeroshot.pets.root={tmp_path / 'zs'}: no usable sample among 1 rows read "
            "(1 undecodable); the files are not images"
        ),
        "seed=0": "nothing to test on: set data.test_data",
    }
    for override, message in cases.items():
        cfg = compose([*CSV_RUN, f"data.train_data={good_csv}", override])
        with pytest.raises(ValueError) as error:
            build_datamodule(cfg).check(("fit", "test"))
        assert message in str(error.value)


def test_a_row_that_is_not_utf8_is_skipped_and_counted_with_its_file_and_line(good_csv, caplog):
    with good_csv.open("ab") as f:
        f.write(b"img/0.png\tcaf\xe9 au lait\n")  # latin-1, not UTF-8
        f.write(b"img/1.png\n")  # one field
    counts = SkipCounts(str(good_csv))
    rows = read_csv(good_csv, counts=counts)
    assert len(rows) == 8 and counts.totals()["skipped_unreadable_row"] == 2
    assert (
        f"skipping {good_csv}: unreadable row at line 10 (bytes that are not UTF-8)" in caplog.text
    )
    assert "at line 11 (1 fields, fewer than the header's)" in caplog.text


def test_skip_counts_are_written_per_split_and_reason(good_csv, tmp_path):
    """Read-time skips counted once, skips found while loading summed over processes."""
    with good_csv.open("a") as f:
        f.write("img/missing.png\tgone\nimg/0.png\t \n")
    (tmp_path / "img/cut.png").write_bytes((tmp_path / "img/7.png").read_bytes()[:60])
    with good_csv.open("a") as f:
        f.write("img/cut.png\ttruncated\n")
    cfg = compose([*CSV_RUN, f"data.train_data={good_csv}", f"data.test_data={good_csv}"],
                  tmp_path / "run")  # fmt: skip
    metrics = train(cfg)
    written = json.loads((tmp_path / "run/metrics.json").read_text())
    assert written["data/test_rows"] == metrics["data/test_rows"] == 11
    assert written["data/test_skipped_missing_file"] == 1
    assert written["data/test_skipped_empty_caption"] == 1
    assert written["data/test_skipped_unreadable_row"] == 0
    # cut.png: its header reads, its pixels do not; found once when the test split is loaded
    assert written["data/test_skipped_undecodable"] == 1
    datamodule = build_datamodule(cfg)
    datamodule.check(("test",))
    datamodule.counts["test"].skip_loaded("undecodable")
    doubled = datamodule.skip_totals(lambda loaded: [2 * n for n in loaded])  # two processes
    assert doubled["test"] == {"rows": 11, "skipped_missing_file": 1, "skipped_empty_caption": 1,
                               "skipped_undecodable": 2, "skipped_unreadable_row": 0}  # fmt: skip


# ---------------------------------------------------------------------------- shards


def tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("case", ["no shard", "not a tar", "no captions"])
def test_bad_shards_stop_before_training_naming_the_shard(case, tmp_path, monkeypatch, capsys):
    shard = tmp_path / "000000.tar"
    if case == "not a tar":
        shard.write_text("filepath\ttitle\n")
        message = f"shard {shard} is not a tar archive"
    elif case == "no captions":
        tar(shard, {f"{i}.png": png() for i in range(4)})
        message = f"data.train_data={shard}: no usable sample among 4 rows read (4 empty caption)"
    else:
        shard = tmp_path / "{000000..000001}.tar"
        message = "no shard file"
    run_dir = tmp_path / "run"
    args = [*CSV_RUN, "data=webdataset", f"data.train_data='{shard}'", "data.train_num_samples=4",
            "test=false", f"hydra.run.dir={run_dir}"]  # fmt: skip
    assert_fails("train", args, message, monkeypatch, capsys)
    assert_no_run(run_dir)


# ---------------------------------------------------------------------------- checkpoints


def test_a_missing_checkpoint_is_one_line(good_csv, tmp_path, monkeypatch, capsys):
    args = [*CSV_RUN, f"data.train_data={good_csv}", f"ckpt_path={tmp_path}/nope.ckpt",
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    assert_fails("train", args, f"ckpt_path={tmp_path}/nope.ckpt does not exist",
                 monkeypatch, capsys)  # fmt: skip
    assert_fails("evaluate", [f"ckpt={tmp_path}/nope.ckpt"], f"ckpt={tmp_path}/nope.ckpt does not exist",
                 monkeypatch, capsys)  # fmt: skip


def test_a_file_that_is_not_a_checkpoint_is_one_line(good_csv, tmp_path, monkeypatch, capsys):
    message = f"ckpt={good_csv} is not a limoe checkpoint: torch.load cannot read it"
    assert_fails("evaluate", [f"ckpt={good_csv}"], message, monkeypatch, capsys)
    assert_fails("analyze", [f"ckpt={good_csv}"], message, monkeypatch, capsys)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    message = f"ckpt={tmp_path / 'other.ckpt'} is not a limoe checkpoint: it holds no model config"
    assert_fails("evaluate", [f"ckpt={tmp_path / 'other.ckpt'}"], message, monkeypatch, capsys)


def test_a_checkpoint_of_another_model_names_the_keys_that_differ(
    good_csv, tmp_path, monkeypatch, capsys
):
    dense = build_module(compose([*CSV_RUN, "model=dense", f"data.train_data={good_csv}"]))
    ckpt = tmp_path / "dense.ckpt"
    torch.save({"state_dict": dense.state_dict(), "hyper_parameters": dict(dense.hparams)}, ckpt)
    run_dir = tmp_path / "run"
    args = [
        *CSV_RUN,
        f"data.train_data={good_csv}",
        f"ckpt_path={ckpt}",
        f"hydra.run.dir={run_dir}",
    ]
    message = (f"ckpt_path={ckpt} holds another model than this run's (checkpoint vs run: "
               "model.moe_layers: [] vs [0, 1, 2, 3])")  # fmt: skip
    assert_fails("train", args, message, monkeypatch, capsys)
    assert_no_run(run_dir)


# ---------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps='abc' is a str; it needs int"),
        ("trainer.max_steps=2.5", "trainer.max_steps=2.5 is a float; it needs int"),
        ("model.moe.capacity_factor=big", "model.moe.capacity_factor='big' is a str; it needs "
                                          "a number or null"),
        ("optim.lr=fast", "optim.lr='fast' is a str; it needs a number"),
        ("test=1", "test=1 is an int; it needs bool"),
        ("model.moe_layers=2", "model.moe_layers=2 is an int; it needs a list of ints"),
    ],
)  # fmt: skip
def test_a_value_of_the_wrong_type_names_the_key_the_value_and_the_type(
    override, message, tmp_path, monkeypatch, capsys
):
    args = ["experiment=smoke", override, f"hydra.run.dir={tmp_path}"]
    assert_fails("train", args, message, monkeypatch, capsys)


def test_values_of_the_right_type_pass_the_check():
    cfg = compose(["trainer.precision=bf16-mixed", "trainer.val_check_interval=0.5",
                   "model.moe.capacity_factor=1", "+data.augment.scale=[0.5,1.0]"])  # fmt: skip
    check_types(cfg)
    with pytest.raises(TypeError, match=r"data.augment.scale=0.5 is a float; it needs a list"):
        compose(["+data.augment.scale=0.5"])


# ---------------------------------------------------------------------------- bugs


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """An error that is not the user's passes through Hydra and the command as it is."""

    def broken(cfg):
        raise AttributeError("a bug")

    monkeypatch.setattr(cli.runs, "train", broken)
    monkeypatch.setattr(
        sys, "argv", ["limoe-train", "experiment=smoke", f"hydra.run.dir={tmp_path}"]
    )
    with pytest.raises(AttributeError, match="a bug"):
        cli.train()


def test_an_error_from_a_loader_worker_is_told_in_its_own_words():
    wrapped = ValueError("Caught UnusableDataError in DataLoader worker process 0.\nOriginal "
                         "Traceback (most recent call last):\n  File ...\n"
                         "limoe.data.skips.UnusableDataError: shards: 1000 samples in a row")  # fmt: skip
    assert cli.error_line(wrapped) == "shards: 1000 samples in a row"


def test_the_console_script_exits_2_with_one_line(tmp_path):
    empty = write_rows(tmp_path / "empty.csv", [])
    cmd = [str(BIN / "limoe-train"), *CSV_RUN, f"data.train_data={empty}",
           f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert one_error_line(result.stderr).endswith("holds no samples (0 rows read)")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.moe.top_k=2", "model.moe.top_k is now model.moe.router.top_k"),
        ("model.moe.gemm=loop", "model.moe.gemm is now model.moe.experts.gemm"),
        ("model.moe.loss_scope=modality", "model.moe.loss_scope is now model.moe.losses.scope"),
        ("model.moe.local_entropy_weight=0",
         "model.moe.local_entropy_weight is now model.moe.losses.local_entropy_weight"),
        ("model.moe.router=soft", "a router is chosen as a config group now, "
                                  "router@model.moe.router=soft (one of expert_choice, "
                                  "modality, soft, topk)"),
    ],
)  # fmt: skip
def test_a_moe_key_that_moved_names_the_new_one(override, message, tmp_path, monkeypatch, capsys):
    args = ["experiment=smoke", override, f"hydra.run.dir={tmp_path}"]
    assert_fails("train", args, message, monkeypatch, capsys)
    assert not any(tmp_path.iterdir())


def test_a_value_a_librarys_own_target_rejects_is_one_line_naming_the_node(
    tmp_path, monkeypatch, capsys
):
    """Lightning's Trainer rejects a negative step count itself; the line names its node."""
    args = ["experiment=smoke", "trainer.max_steps=-5", f"hydra.run.dir={tmp_path}"]
    message = "trainer: `max_steps` must be a non-negative integer or -1"
    assert_fails("train", args, message, monkeypatch, capsys)
    assert_no_run(tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("size.width=33", "model.width=33 (size.width) must be a multiple of model.num_heads=2 "
                          "(size.num_heads)"),
        ("size.num_heads=5", "model.width=32 (size.width) must be a multiple of "
                             "model.num_heads=5 (size.num_heads)"),
        ("size.width=30", "model.width=30 (size.width) must be a multiple of 4 for the 2-D "
                          "sin-cos position embedding"),
        ("size.depth=0", "model.depth=0 (size.depth) must be at least 1"),
        ("size.patch_size=5", "model.image_size=32 (data.image_size) must be a multiple of "
                              "model.patch_size=5 (size.patch_size)"),
        ("size.width=0", "model.width=0 (size.width) must be at least 1"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("arm", ["limoe", "clip"])
def test_a_tower_no_model_can_take_is_one_line_naming_the_key(
    override, message, arm, tmp_path, monkeypatch, capsys
):
    args = ["experiment=smoke", f"model={arm}", override, f"hydra.run.dir={tmp_path}"]
    assert_fails("train", args, message, monkeypatch, capsys)
