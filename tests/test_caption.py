"""Shipping students: self-describing checkpoints, `make caption` (image modes, bad files, exit status), ONNX export
and its torch-free runtime (parity with PyTorch, greedy and beam)."""

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.config import EncoderSettings
from pipeline.core.errors import PipelineError
from pipeline.data.images import load_rgb
from pipeline.inference.caption import caption_files, find_images, read_image
from pipeline.students import onnx_runtime
from pipeline.students.beam import beam_search, greedy_decode
from pipeline.students.checkpoint import Student, load_decoder, load_student
from pipeline.students.decoders import build_decoder
from pipeline.students.encoders import build_encoder, image_transform
from pipeline.students.runtime import to_pixels
from pipeline.students.train import train_student
from pipeline.students.vocab import Vocabulary
from tests.helpers import ARCHS, END_BIAS, ROOT, SMALL, make_student, run_stage, varied_images, write_config


class NumpyDecoder:
    """A torch decoder behind numpy arrays, to run the numpy searches on it."""

    def __init__(self, decoder):
        self.decoder = decoder

    def init_state(self, feats):
        return {k: v.numpy() for k, v in self.decoder.init_state(torch.from_numpy(feats)).items()}

    def step(self, state, tokens):
        logp, new = self.decoder.step({k: torch.from_numpy(v) for k, v in state.items()}, torch.from_numpy(tokens))
        return logp.numpy(), {k: v.numpy() for k, v in new.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_numpy_searches_mirror_the_torch_searches(arch):
    shape = {"vgg19_gru": (32,), "resnet101_gru": (48,), "resnet101_attn_gru": (9, 48),
             "vit_transformer": (5, 24)}[arch]
    torch.manual_seed(3)
    decoder = build_decoder(arch, shape[-1], 30, SMALL).eval()
    with torch.no_grad():
        decoder.out.bias[2] += END_BIAS[arch]
        feats = torch.randn(24, *shape)
        wrapped = NumpyDecoder(decoder)
        greedy = greedy_decode(decoder, feats, 12, 1, 2)
        assert onnx_runtime.greedy_decode(wrapped, feats.numpy(), 12, 1, 2) == greedy
        for k in (2, 4):
            assert onnx_runtime.beam_search(wrapped, feats.numpy(), k, 12, 1, 2) == beam_search(decoder, feats, k,
                                                                                                 12, 1, 2)
    assert len({len(s) for s in greedy}) > 1  # captions of different lengths: <end> handling is exercised


def test_pixels_are_the_training_transform():
    for image in varied_images(5):
        expected = image_transform(40)(image).numpy()
        got = to_pixels([image], size=40, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))[0]
        assert np.allclose(got, expected, atol=1e-6)


def test_trained_checkpoint_rebuilds_and_captions_without_its_config(tmp_path):
    """train_student's best/ holds what it needs: it loads with no config, and the caption stage run under a config
    whose students settings differ (hidden_dim, encoder width) writes the same captions."""
    images = varied_images(12)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / "photos" / f"{i:02d}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        image.save(paths[-1])
    encoder = build_encoder("vgg19", SMALL.encoder, 0).eval()
    with torch.no_grad():
        table = encoder(torch.from_numpy(to_pixels(images, size=32, mean=(0.485, 0.456, 0.406),
                                                   std=(0.229, 0.224, 0.225))))
    caps = [f"the lady wears a {c} shirt ." for c in ("cotton", "denim", "stripe")] * 4
    vocab = Vocabulary.build(caps, 1)

    class Scorer:
        def score(self, refs, hyps, only=None):
            return {"CIDEr-D": 1.0}

    cfg = SMALL.model_copy(update={"epochs": 20, "batch_size": 4, "decoder_lr": 1e-2, "val_every_epochs": 20})
    train_student("vgg19_gru", cfg, lambda split, idx: table[idx], table.shape[-1], {"train": caps, "val": caps[:4]},
                  vocab, tmp_path / "student", 0, Scorer(), frozen_encoder=encoder)
    best = tmp_path / "student" / "best"
    meta = json.loads((best / "student.json").read_text())
    assert meta["decoder"]["hidden_dim"] == 32 and meta["encoder"]["name"] == "vgg19"
    assert meta["image"]["size"] == 32 and meta["beam_size"] == 3 and meta["max_length"] == 12
    student = load_student(best)
    expected = student.caption(images, beam_size=2)
    other = write_config(tmp_path, students={"hidden_dim": 64, "embed_dim": 8, "max_length": 30,
                                             "encoder": {"width": 0.5, "image_size": 64}})
    res = run_stage("caption", "--config", str(other), "--student", str(best), "--images", str(tmp_path / "photos"),
                    "--out", str(tmp_path / "out.jsonl"), "--beam", "2")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == expected and [r["path"] for r in rows] == [str(p) for p in paths]
    assert all(isinstance(r["attributes"], dict) for r in rows)
    assert any("shirt" in r["caption"] for r in rows)  # the trained decoder, not a random one


@pytest.mark.slow
def test_a_pretrained_encoder_ships_in_the_checkpoint(tmp_path):
    """A student of a pretrained (ImageNet-file) encoder loads without that file: best/ carries the weights."""
    from torchvision import models

    from pipeline.students.encoders import WEIGHTS

    torch.manual_seed(4)
    weights = tmp_path / "imagenet" / Path(WEIGHTS["resnet101"].url).name
    weights.parent.mkdir()
    torch.save(models.resnet101().state_dict(), weights)
    cfg = SMALL.model_copy(update={"encoder": EncoderSettings(pretrained=True, weights_dir=weights.parent,
                                                              image_size=64)})
    best = make_student(tmp_path / "best", "resnet101_gru", cfg)
    decoder, vocab, meta = load_decoder(best, device="cpu")
    imagenet = Student(build_encoder("resnet101", cfg.encoder).eval(), decoder, vocab, meta)  # from the file
    weights.unlink()  # a user's machine has no ImageNet file
    images = varied_images(6)
    assert load_student(best, device="cpu").caption(images, beam_size=2) == imagenet.caption(images, beam_size=2)


def test_a_checkpoint_of_an_older_version_fails_with_one_line_naming_what_is_missing(tmp_path):
    best = make_student(tmp_path / "best", "vgg19_gru")
    meta = json.loads((best / "student.json").read_text())
    old = {k: meta[k] for k in ("arch", "feat_dim", "vocab_size", "seed", "encoder_finetuned")}  # what v1 wrote
    (best / "student.json").write_text(json.dumps(old))
    with pytest.raises(PipelineError, match=r"older version \(no format_version, decoder, encoder, image"):
        load_student(best)
    (tmp_path / "a.png").write_bytes(b"")
    res = run_stage("caption", "--student", str(best), "--images", str(tmp_path / "a.png"), "--out",
                    str(tmp_path / "c.jsonl"))
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert str(best / "student.json") in res.stderr and "older version" in res.stderr
    (best / "student.json").write_text(json.dumps(meta))
    (best / "encoder.safetensors").unlink()
    with pytest.raises(PipelineError, match="incomplete student, encoder.safetensors missing"):
        load_student(best)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_every_image_mode_is_captioned_and_bad_files_are_skipped_with_their_reason(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rgb = varied_images(1, seed=5)[0].resize((40, 24))
    grey = np.asarray(rgb.convert("L"))
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("LA").save(folder / "grey_alpha.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("P").save(folder / "palette_transparent.png", transparency=0)
    rgb.convert("1").save(folder / "bilevel.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate 90 degrees clockwise
    rgb.save(folder / "rotated.jpg", exif=exif, quality=95)
    rgb.save(folder / "plain.png")
    Image.new("RGB", (300, 300)).save(folder / "huge.png")
    (folder / "bomb.png").write_bytes(_png_header(40_000, 40_000))
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    os.mkfifo(folder / "fifo.jpg")  # opening it would block forever
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    rgb.resize((160, 96)).save(tmp_path / "whole.jpg")
    whole = (tmp_path / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    # the modes a user's photos come in are read upright and as 8-bit RGB
    assert Image.open(folder / "sixteen_bit.png").mode.startswith("I")
    assert np.array_equal(np.asarray(load_rgb(folder / "sixteen_bit.png"))[..., 0], grey)
    upright = load_rgb(folder / "rotated.jpg")
    assert upright.size == (24, 40)
    assert np.abs(np.asarray(upright, dtype=int) - np.asarray(rgb.transpose(Image.Transpose.ROTATE_270),
                                                               dtype=int)).mean() < 8  # jpeg noise
    assert load_rgb(folder / "cmyk.jpg").mode == "RGB"

    student = load_student(make_student(tmp_path / "best", "resnet101_attn_gru"))
    out = tmp_path / "captions.jsonl"
    result = caption_files(student, find_images([str(folder)]), out=out, beam_size=2, batch_size=4,
                           max_pixels=200 * 200)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    good = ["bilevel.png", "cmyk.jpg", "grey.png", "grey_alpha.png", "palette.png",
            "palette_transparent.png", "plain.png", "rgba.png", "rotated.jpg", "sixteen_bit.png"]
    assert [Path(r["path"]).name for r in rows] == good and result.captioned == len(good)
    assert all(set(r) == {"path", "caption", "attributes"} and r["caption"] for r in rows)
    reasons = {Path(s["path"]).name: s["reason"] for s in result.skipped}
    assert sorted(reasons) == ["bomb.png", "empty.jpg", "fifo.jpg", "huge.png", "loop.jpg", "notes.txt",
                               "truncated.jpg"]
    assert reasons["fifo.jpg"] == "not a regular file (a FIFO)"
    assert reasons["loop.jpg"] == "cannot be read (Too many levels of symbolic links)"
    assert "more than caption.max_pixels=40000" in reasons["huge.png"] and "300x300" in reasons["huge.png"]
    assert reasons["bomb.png"].startswith("too large")
    assert reasons["notes.txt"] == reasons["empty.jpg"] == "not an image (no image format PIL reads)"
    assert "truncated" in reasons["truncated.jpg"] and "tmp" not in reasons["truncated.jpg"]  # no path twice
    listed = [json.loads(line) for line in (tmp_path / "captions.skipped.jsonl").read_text().splitlines()]
    assert {Path(s["path"]).name: s["reason"] for s in listed} == reasons
    # the batch a file lands in does not change its caption
    alone = student.caption([read_image(folder / "rotated.jpg", max_pixels=10**6)], beam_size=2)
    assert alone == [r["caption"] for r in rows if r["path"].endswith("rotated.jpg")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A vgg19_gru student with its ONNX export, and test images."""
    from pipeline.students.export import export_onnx

    base = tmp_path_factory.mktemp("exported")
    best = make_student(base / "best", "vgg19_gru")
    export_onnx(best)
    (base / "photos").mkdir()
    for i, image in enumerate(varied_images(20, seed=1)):
        image.save(base / "photos" / f"{i:02d}.png")
    return best, base / "photos"


def test_onnx_caption_runs_without_torch_and_matches_pytorch(exported, tmp_path):
    best, photos = exported
    assert sorted(p.name for p in (best / "onnx").iterdir() if not p.name.startswith(".")) == [
        "encoder.onnx", "init_state.onnx", "onnx.json", "step.onnx"]
    torch_rows = caption_files(load_student(best, device="cpu"), find_images([str(photos)]),
                               out=tmp_path / "torch.jsonl", beam_size=3, batch_size=8, max_pixels=10**6)
    script = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_module('stages.caption', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", script, "caption", "--student", str(best), "--images", str(photos),
                          "--out", str(tmp_path / "onnx.jsonl"), "--runtime", "onnx", "--beam", "3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "onnx.jsonl").read_text() == (tmp_path / "torch.jsonl").read_text()
    assert torch_rows.captioned == 20


def test_onnx_export_of_other_weights_is_refused(exported, tmp_path):
    best, _ = exported
    copy = shutil.copytree(best, tmp_path / "best")
    make_student(tmp_path / "retrained", "vgg19_gru", seed=1)
    shutil.copy(tmp_path / "retrained" / "model.safetensors", copy / "model.safetensors")
    with pytest.raises(PipelineError, match="exported from other weights"):
        onnx_runtime.OnnxStudent(copy)
    shutil.rmtree(copy / "onnx")
    with pytest.raises(PipelineError, match="export the student first"):
        onnx_runtime.OnnxStudent(copy)


def test_caption_exit_status_and_one_line_errors(exported, tmp_path):
    best, _ = exported  # onnxruntime: the subprocesses start without importing torch
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.txt").write_text("x")
    (tmp_path / "bad" / "b.jpg").write_bytes(b"\xff\xd8 broken")
    res = run_stage("caption", "--student", str(best), "--images", str(tmp_path / "bad"), "--out",
                    str(tmp_path / "c.jsonl"), "--runtime", "onnx")
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(
        "caption: error: no image captioned: all 2 files skipped (e.g. ")
    assert not (tmp_path / "c.jsonl").exists()
    assert len((tmp_path / "c.skipped.jsonl").read_text().splitlines()) == 2
    varied_images(1)[0].save(tmp_path / "bad" / "c.png")
    res = run_stage("caption", "--student", str(best), "--images", str(tmp_path / "bad" / "*.*"), "--out",
                    str(tmp_path / "c.jsonl"), "--runtime", "onnx")
    assert res.returncode == 0, res.stderr
    assert "captioned 1 of 3 images" in res.stdout and "skipped" in res.stderr  # the log names each skipped file
    res = run_stage("caption", "--student", str(best), "--images", str(tmp_path / "nothing*.png"))
    assert res.returncode == 1 and res.stderr.strip().endswith("no such file or folder, and no file matches it "
                                                               "as a pattern")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_captions_equal_pytorch_captions(arch, tmp_path):
    """Every architecture, 100 images: onnxruntime + numpy search write PyTorch's captions, greedy and beam."""
    from pipeline.students.export import export_onnx

    best = make_student(tmp_path / "best", arch)
    export_onnx(best)
    student, onnx = load_student(best, device="cpu"), onnx_runtime.OnnxStudent(best)
    images = varied_images(100, seed=2)
    for beam in (1, 3):
        expected = [c for i in range(0, 100, 25) for c in student.caption(images[i: i + 25], beam)]
        got = [c for i in range(0, 100, 25) for c in onnx.caption(images[i: i + 25], beam)]
        assert got == expected, (arch, beam)
        assert len(set(expected)) >= 2, expected[:5]  # not one caption for every image
