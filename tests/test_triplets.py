"""Triplet dataset format: atomic resumable writer, shard manifests, validating reader."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from erasekit.dataset_tools.triplets import TripletDataset, TripletWriter, parse_shard

ORIGIN = {"kind": "image", "image": "a.jpg", "instance": 3}


def _sample(seed, size=(24, 32)):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    mask = np.zeros(size, bool)
    mask[4:12, 5:20] = True
    source = target.copy()
    source[mask] = 255 - source[mask]
    return source, mask, target


def test_roundtrip_is_exact_and_sorted(tmp_path):
    with TripletWriter(tmp_path) as writer:
        for i in (2, 0, 1):
            s, m, t = _sample(i)
            record = writer.write(f"s{i:03d}", s, m, t, {"origin": ORIGIN, "params": {"angle": i}})
            assert record["width"] == 32 and record["height"] == 24
    ds = TripletDataset(tmp_path)
    assert len(ds) == 3 and [r["id"] for r in ds.iter_records()] == ["s000", "s001", "s002"]
    for i in range(3):
        s, m, t = _sample(i)
        item = ds[i]
        assert np.array_equal(item["source"], s) and np.array_equal(item["target"], t)
        assert item["mask"].dtype == bool and np.array_equal(item["mask"], m)
        assert item["record"]["params"] == {"angle": i} and item["record"]["origin"] == ORIGIN
    assert cv2.imread(str(tmp_path / "mask" / "s000.png"), cv2.IMREAD_UNCHANGED).ndim == 2
    assert ds.validate() == 3


def test_write_rejects_bad_input_without_leaving_files(tmp_path):
    s, m, t = _sample(0)
    with TripletWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="target is 16×24 but source is 32×24"):
            writer.write("a", s, m, t[:, :16], {"origin": ORIGIN})
        with pytest.raises(ValueError, match="only"):
            writer.write("a", s, m.astype(np.uint8) * 7, t, {"origin": ORIGIN})
        with pytest.raises(ValueError, match="origin"):
            writer.write("a", s, m, t, {"origin": {"kind": "video", "video": "v.mp4"}})
        with pytest.raises(ValueError, match="file stem"):
            writer.write("../x", s, m, t, {"origin": ORIGIN})
        with pytest.raises(TypeError):
            writer.write("a", s, m, t, {"origin": ORIGIN, "params": object()})
        with pytest.raises(ValueError, match="EncodedTriplet"):
            writer.write_encoded("a", (b"", b"", b""), {"origin": ORIGIN})
        writer.write("a", s, m, t, {"origin": ORIGIN})
        with pytest.raises(ValueError, match="already exists"):
            writer.write("a", s, m, t, {"origin": ORIGIN})
    assert sorted(p.name for p in (tmp_path / "source").iterdir()) == ["a.png"]


def test_resume_cuts_a_torn_line_and_temp_files_and_keeps_orphans(tmp_path):
    with TripletWriter(tmp_path) as writer:
        for i in range(3):
            writer.write(f"s{i}", *_sample(i), {"origin": ORIGIN})
    cv2.imwrite(str(tmp_path / "source" / "orphan.png"), np.zeros((4, 4, 3), np.uint8))  # killed before its line
    (tmp_path / "mask" / ".tmp-manifest-x.png").write_bytes(b"partial")
    with open(tmp_path / "manifest.jsonl", "a") as handle:
        handle.write('{"id": "s9", "sou')  # killed while appending
    with TripletWriter(tmp_path, resume=True) as writer:
        assert writer.has("s0") and writer.has("s2") and not writer.has("s9")
        writer.write("s3", *_sample(3), {"origin": ORIGIN})
    assert (tmp_path / "source" / "orphan.png").exists()  # never deleted: erasekit-dataset repair moves it aside
    assert not (tmp_path / "mask" / ".tmp-manifest-x.png").exists()  # a partial write is not a sample
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["s0", "s1", "s2", "s3"]
    assert len(TripletDataset(tmp_path)) == 4


def test_no_resume_refuses_a_filled_folder(tmp_path):
    with TripletWriter(tmp_path) as writer:
        writer.write("a", *_sample(0), {"origin": ORIGIN})
    with pytest.raises(ValueError, match="already holds 1 samples"):
        TripletWriter(tmp_path, resume=False)


def test_shards_write_separate_manifests_read_as_one(tmp_path):
    writers = [TripletWriter(tmp_path, shard=f"{i}/2") for i in range(2)]
    with pytest.raises(ValueError, match="another process"):
        TripletWriter(tmp_path, shard="1/2")
    for i in range(4):
        writers[i % 2].write(f"s{i}", *_sample(i), {"origin": ORIGIN})
    for writer in writers:
        writer.close()
    assert (tmp_path / "manifest-shard-0-of-2.jsonl").exists() and (tmp_path / "manifest-shard-1-of-2.jsonl").exists()
    ds = TripletDataset(tmp_path)
    assert [r["id"] for r in ds.iter_records()] == ["s0", "s1", "s2", "s3"]
    with TripletWriter(tmp_path, shard="2/3", resume=False) as writer:  # other shards' samples are no clash...
        assert writer.has("s0")
    with pytest.raises(ValueError, match="manifest-shard-1-of-2.jsonl already lists 2 samples"):
        TripletWriter(tmp_path, shard="1/2", resume=False)  # ...its own are
    with TripletWriter(tmp_path, shard="0/3") as writer:  # another shard count still sees finished samples
        assert all(writer.has(f"s{i}") for i in range(4))
    assert parse_shard("3/4") == (3, 4)
    with pytest.raises(ValueError, match="out of range"):
        parse_shard("4/4")
    with pytest.raises(ValueError, match="form i/N"):
        parse_shard("1-4")


def test_reader_names_the_bad_file(tmp_path):
    with TripletWriter(tmp_path) as writer:
        writer.write("a", *_sample(0), {"origin": ORIGIN})
        writer.write("b", *_sample(1), {"origin": ORIGIN})
    grey = np.full((24, 32), 128, np.uint8)
    cv2.imwrite(str(tmp_path / "mask" / "a.png"), grey)
    cv2.imwrite(str(tmp_path / "target" / "b.png"), np.zeros((10, 10, 3), np.uint8))
    ds = TripletDataset(tmp_path)
    with pytest.raises(ValueError, match=r"mask[/\\]a\.png is not binary"):
        ds[0]
    with pytest.raises(ValueError, match=r"target[/\\]b\.png is 10×10 but the manifest says 32×24"):
        ds[1]
    os.unlink(tmp_path / "source" / "b.png")
    with pytest.raises(FileNotFoundError, match="source/b.png"):
        TripletDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        TripletDataset(tmp_path / "source")


def test_duplicate_ids_across_manifests_are_an_error(tmp_path):
    with TripletWriter(tmp_path, shard="0/2") as writer:
        writer.write("a", *_sample(0), {"origin": ORIGIN})
    (tmp_path / "manifest-shard-1-of-2.jsonl").write_text((tmp_path / "manifest-shard-0-of-2.jsonl").read_text())
    with pytest.raises(ValueError, match="appears in both"):
        TripletDataset(tmp_path)


def test_sigkill_mid_write_never_shows_a_half_sample(tmp_path):
    """A writer killed at random points: every visible sample is complete and the resumed run finishes."""
    script = textwrap.dedent(
        f"""
        import numpy as np, sys
        from erasekit.dataset_tools.triplets import TripletWriter
        w = TripletWriter(sys.argv[1])
        rng = np.random.default_rng(0)
        for i in range(10_000):
            if w.has(f"s{{i:05d}}"):
                continue
            img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            w.write(f"s{{i:05d}}", img, img[..., 0] > 128, img, {{"origin": {ORIGIN!r}}})
            print(i, flush=True)
        """
    )
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(5):  # wait for a few samples, then kill in the middle of the next ones
            proc.stdout.readline()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ds = TripletDataset(tmp_path)
        ids = [r["id"] for r in ds.iter_records()]
        assert len(ids) == len(set(ids)) and ds.validate() == len(ids)
    with TripletWriter(tmp_path) as writer:  # resume cleans the orphans of the last kill
        kept = len(writer)
    assert {p.stem for p in (tmp_path / "source").iterdir()} == {r["id"] for r in TripletDataset(tmp_path).iter_records()}
    assert kept >= 15
