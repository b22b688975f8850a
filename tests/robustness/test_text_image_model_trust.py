"""Text in every script, invalid Unicode, floating-point images, non-finite samples, pickled weights, duplicate
columns, shared sampler flags, special files and temporary names.

Every case runs the real command (click's CliRunner on `cxrdist`) and is held to the battery's contract
(support.robustness): a failure is a non-zero exit with one `Error: ` line naming the thing and no traceback; a
record-level problem is a counted reject in a build that succeeds; the inputs are byte-identical afterwards.
A FIFO in a case has a watchdog: should the command block on it, the watchdog unblocks it after a while and
the case fails instead of hanging the suite.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cxrdist.data.reports import has_words, report_prompt
from cxrdist.data.sources.manifest import ManifestSource
from cxrdist.fileio import TEMP_SUFFIX
from cxrdist.models.lora import METADATA_NAME, WEIGHTS_NAME
from support.data_files import write_manifest, write_png
from support.robustness import (Case, Ctx, Plan, error_line, good_rows, index_of, invoke, params, rejects_of,
                                run_case, shard_manifest, snapshot)
from support.trust import plant

def _shard_samples(out: Path) -> dict[str, dict]:
    """source file name -> {"txt": text, "png": pixels, "json": meta} of every sample written."""
    members: dict[str, dict] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    samples = {}
    for parts in members.values():
        meta = json.loads(parts["json"].decode("utf-8"))
        samples[Path(meta["source_path"]).name] = {
            "txt": parts["txt"].decode("utf-8"), "json": meta,
            "png": np.asarray(Image.open(io.BytesIO(parts["png"])))}
    return samples


class GuardedFifo:
    """A FIFO with a watchdog: after `deadline` s, a reader still blocked on it is unblocked (an empty write end
    opened and closed), and `rescued` says so. Never needed when the code refuses the FIFO without opening it."""

    def __init__(self, path: Path, deadline: float = 60.0) -> None:
        self.path = path
        os.mkfifo(path)
        self.rescued = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(deadline,), daemon=True)
        self._thread.start()

    def _watch(self, deadline: float) -> None:
        if self._done.wait(deadline):
            return
        while not self._done.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: nobody is reading, nothing to rescue yet
                    return
                self._done.wait(0.2)
                continue
            self.rescued = True
            os.close(fd)  # the blocked reader sees end-of-file and goes on

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def _fifo(ctx: Ctx, path: Path) -> GuardedFifo:
    path.parent.mkdir(parents=True, exist_ok=True)
    guard = GuardedFifo(path)
    ctx.request.addfinalizer(guard.stop)
    return guard


def _not_rescued(*guards: GuardedFifo):
    def check(result) -> None:
        assert not any(g.rescued for g in guards), "the command blocked on a FIFO"
    return check


def _no_model_loaded(ctx: Ctx):
    def check(result) -> None:
        assert ctx.model_loads == [], "the model was loaded"
    return check


def _both(*checks):
    def check(result) -> None:
        for each in checks:
            each(result)
    return check


# ---- 1. every language is text -----------------------------------------------------------------------------

REPORTS_IN_MANY_SCRIPTS = {
    "ru": "Сердце не увеличено. Лёгкие без очаговых изменений.",
    "zh": "心影大小正常。双肺未见明显实变。",
    "el": "Καρδιά φυσιολογικού μεγέθους. Ελεύθεροι πνεύμονες.",
    "ar": "حجم القلب طبيعي. الرئتان صافيتان.",
    "de": "Öß: Herz normal groß, kein Erguss.",
    "es": "Silueta cardíaca normal. Sin derrame pleural.",
    "ja": "心拡大なし。胸水なし。",
}


@pytest.mark.parametrize("text", list(REPORTS_IN_MANY_SCRIPTS.values()) + ["Öß", "无", "ب"])
def test_letters_of_any_script_are_words(text):
    assert has_words(text)


@pytest.mark.parametrize("text", ["", "   ", "12. 3/4 -- ...", "。，！", "٣٤٥", "\u200b\u00a0"])
def test_digits_punctuation_and_markers_are_not_words(text):
    assert not has_words(text)


def test_english_headings_keep_non_english_text():
    text = "FINDINGS: Сердце не увеличено.\nIMPRESSION: 心影大小正常。"
    assert report_prompt(text) == "Сердце не увеличено. 心影大小正常。"
    assert report_prompt("Befund ÜFINDINGS: x", ["findings"], fallback=True) == "Befund ÜFINDINGS: x"  # one word


def _reports_in_every_script(suffix: str):
    """One image per language (report inline, or in a UTF-8 report file for two of them), plus one report of
    digits and punctuation only: every language is written, and only that one is an empty_report."""
    def setup(ctx: Ctx) -> Plan:
        root = ctx.tmp / "in"
        rows = []
        for i, (lang, text) in enumerate(REPORTS_IN_MANY_SCRIPTS.items()):
            write_png(root / "img" / f"{lang}.png", seed=i)
            if lang in ("ru", "zh"):
                (root / f"{lang}.txt").write_text(text, encoding="utf-8")
                rows.append({"image": f"img/{lang}.png", "group": f"p-{lang}", "report": "",
                             "report_path": f"{lang}.txt"})
            else:
                rows.append({"image": f"img/{lang}.png", "group": f"p-{lang}", "report": text, "report_path": ""})
        write_png(root / "img" / "digits.png", seed=40)
        rows.append({"image": "img/digits.png", "group": "p-digits", "report": "12. 3/4 --", "report_path": ""})
        manifest = write_manifest(root / f"m.{suffix}", rows)
        out = ctx.tmp / "out"

        def check(result) -> None:
            assert [r["reason"] for r in rejects_of(out)] == ["empty_report"]
            samples = _shard_samples(out)
            written = {name.removesuffix(".png"): sample["txt"] for name, sample in samples.items()}
            assert written == {lang: " ".join(text.split()) for lang, text in REPORTS_IN_MANY_SCRIPTS.items()}
            assert index_of(out)["counts"]["written"] == len(REPORTS_IN_MANY_SCRIPTS)
        return Plan(shard_manifest(manifest, out), keep=[root], check=check)
    return setup


def _patients_named_in_other_scripts(ctx: Ctx) -> Plan:
    """Patient ids in Chinese and Cyrillic stay different groups (not all "__"): they spread over both folds."""
    root = ctx.tmp / "in"
    names = ["张伟", "李娜", "王芳", "刘洋", "Иванов", "Петров", "Смирнов", "Сидоров"]
    rows = []
    for i, name in enumerate(names):
        write_png(root / "img" / f"x{i}.png", seed=i)
        rows.append({"image": f"img/x{i}.png", "group": name, "report": f"Report {i}: clear lungs."})
    manifest = write_manifest(root / "m.jsonl", rows)
    out = ctx.tmp / "out"

    def check(result) -> None:
        groups = {s["json"].get("group") for s in _shard_samples(out).values()}
        assert len(groups) == len(names), groups
        assert len(list(ManifestSource(manifest).records())) == len(names)
    return Plan(shard_manifest(manifest, out), keep=[root], check=check)


LANGUAGE_CASES = [
    Case("reports-in-every-script-csv", _reports_in_every_script("csv"), None),
    Case("reports-in-every-script-jsonl", _reports_in_every_script("jsonl"), None),
    Case("patient-ids-in-other-scripts", _patients_named_in_other_scripts, None),
]


# ---- 2. text that is not valid Unicode ---------------------------------------------------------------------

def _jsonl_with_surrogate(column: str, reason: str):
    """6 good rows plus one whose `column` holds a lone surrogate as a JSON escape: one reject, the rest built."""
    def setup(ctx: Ctx) -> Plan:
        root = ctx.tmp / "in"
        rows = good_rows(root)
        write_png(root / "img" / "bad.png", seed=50)
        lines = [json.dumps(row) for row in rows]
        bad = {"image": "img/bad.png", "group": "bad", "report": "Clear lungs.", "labels": ["normal"]}
        text = json.dumps(bad)
        escaped = {"report": ('"Clear lungs."', '"Clear \\udcff lungs."'),
                   "group": ('"bad"', '"b\\udcffd"'),
                   "labels": ('["normal"]', '["norm\\udcffal"]'),
                   "image": ('"img/bad.png"', '"img/b\\udcffad.png"')}[column]
        lines.append(text.replace(*escaped))
        manifest = root / "m.jsonl"
        manifest.write_text("\n".join(lines) + "\n", encoding="ascii")
        out = ctx.tmp / "out"

        def check(result) -> None:
            rejects = rejects_of(out)
            assert [(r["id"], r["reason"]) for r in rejects] == [("m.jsonl:7", reason)]
            assert "not valid Unicode text" in rejects[0]["detail"] and "U+DCFF" in rejects[0]["detail"]
            assert index_of(out)["counts"]["written"] == 6
        return Plan(shard_manifest(manifest, out), keep=[root], check=check)
    return setup


def _csv_bytes(data: bytes, name: str = "m.csv"):
    def setup(ctx: Ctx) -> Plan:
        root = ctx.tmp / "in"
        good_rows(root)
        (root / name).write_bytes(data)
        out = ctx.tmp / "out"
        return Plan(shard_manifest(root / name, out), keep=[root], absent=[out])
    return setup


CSV_BAD_BYTE_IN_A_REPORT = ("image,group,report\n" + "".join(f"img/good{i}.png,p{i},Report {i}.\n" for i in range(4))
                            ).encode() + b"img/good4.png,p4,Cardiom\xe9galie \xff\xfe.\n"
CSV_TWO_REPORT_COLUMNS = ("image,group,report,view,report\n"
                          + "".join(f"img/good{i}.png,p{i},Report {i}.,PA,other text\n" for i in range(6))).encode()
JSONL_KEY_TWICE = ('{"image": "img/good0.png", "group": "p0", "report": "Clear."}\n'
                   '{"image": "img/good1.png", "group": "p1", "report": "Clear.", "report": "Other."}\n').encode()

UNICODE_CASES = [
    Case("jsonl-lone-surrogate-in-report", _jsonl_with_surrogate("report", "undecodable_report"), None),
    Case("jsonl-lone-surrogate-in-group", _jsonl_with_surrogate("group", "bad_row"), None),
    Case("jsonl-lone-surrogate-in-labels", _jsonl_with_surrogate("labels", "bad_row"), None),
    Case("jsonl-lone-surrogate-in-image-path", _jsonl_with_surrogate("image", "bad_row"), None),
    # The CSV is decoded as one UTF-8 text stream: a bad byte is a file error naming its line, not a guess.
    Case("csv-invalid-utf8-in-a-report-cell", _csv_bytes(CSV_BAD_BYTE_IN_A_REPORT), r"m\.csv:6 is not UTF-8 .*re-save"),
]


# ---- 3. floating-point images ------------------------------------------------------------------------------

def _float_tiff(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.float32), mode="F").save(path)
    return path


def _ramp(low: float, high: float, height: int = 40, width: int = 32) -> np.ndarray:
    rng = np.random.default_rng(7)
    ramp = np.linspace(low, high, height * width).reshape(height, width)
    return (ramp + rng.normal(0, (high - low) * 0.01, ramp.shape)).clip(low, high)


def _float_image_case(values, reason: str | None):
    """6 good rows plus a float32 TIFF: written with its contrast kept, or one reject with `reason`."""
    def setup(ctx: Ctx) -> Plan:
        root = ctx.tmp / "in"
        rows = good_rows(root)
        _float_tiff(root / "img" / "float.tif", values() if callable(values) else values)
        rows.append({"image": "img/float.tif", "group": "f", "report": "Float image."})
        manifest = write_manifest(root / "m.csv", rows)
        out = ctx.tmp / "out"

        def check(result) -> None:
            rejects = rejects_of(out)
            if reason:
                assert [(Path(r.get("source_path", r["id"])).name, r["reason"]) for r in rejects] == \
                    [("float.tif", reason)]
                return
            assert rejects == []
            pixels = _shard_samples(out)["float.tif"]["png"]
            drawn = pixels[pixels > 0]  # the padding is black
            assert (drawn == 255).mean() < 0.1, "the float image was clipped"
            assert len(np.unique(drawn)) > 40 and drawn.max() >= 240, "the float image lost its contrast"
        return Plan(shard_manifest(manifest, out), keep=[root], check=check)
    return setup


def _with_nan() -> np.ndarray:
    values = _ramp(0.0, 4095.0)
    values[5, 5] = np.nan
    return values


FLOAT_IMAGE_CASES = [
    Case("float-tiff-12-bit-values", _float_image_case(lambda: _ramp(0.0, 4095.0), None), None),
    Case("float-tiff-unit-range", _float_image_case(lambda: _ramp(0.0, 1.0), None), None),
    Case("float-tiff-negative-range", _float_image_case(lambda: _ramp(-1024.0, 3071.0), None), None),
    Case("float-tiff-one-nan-pixel", _float_image_case(_with_nan, "bad_pixels"), None),
    Case("float-tiff-all-inf", _float_image_case(np.full((40, 32), np.inf), "bad_pixels"), None),
    Case("float-tiff-constant", _float_image_case(np.full((40, 32), 1234.5), "degenerate_image"), None),
]


def test_a_float_image_in_the_unit_range_is_taken_as_it_is(tmp_path):
    from cxrdist.data.imageio import decode_file

    values = _ramp(0.1, 0.9)
    decoded = decode_file(_float_tiff(tmp_path / "f.tif", values))
    assert np.allclose(decoded, values.astype(np.float32))
    wide = _ramp(0.0, 4095.0)
    decoded = decode_file(_float_tiff(tmp_path / "g.tif", wide))
    assert np.allclose(decoded, (wide - wide.min()) / (wide.max() - wide.min()), atol=1e-6)


# ---- 4. samples that are not finite ------------------------------------------------------------------------

def _exploding_adapter(ctx: Ctx, alpha: float | str = 1e30) -> Path:
    """The tiny adapter with non-zero LoRA B factors (as after training) and an absurd UNet alpha."""
    folder = ctx.tmp / "model" / "exploding"
    shutil.copytree(ctx.fixture("tiny_adapter"), folder)
    tensors = load_file(str(folder / WEIGHTS_NAME))
    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=generator) * 0.01 if "lora_B" in k else v
               for k, v in tensors.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME))
    meta = json.loads((folder / METADATA_NAME).read_text(encoding="utf-8"))
    meta["adapter"]["unet"]["alpha"] = alpha
    (folder / METADATA_NAME).write_text(json.dumps(meta), encoding="utf-8")
    return folder


def _sample_exploding(*flags):
    def setup(ctx: Ctx) -> Plan:
        model = _exploding_adapter(ctx)
        out = ctx.tmp / "out"
        argv = ["sample", "--model-path", model, "--description", "Normal heart.", "--description",
                "Small effusion.", "--steps", "2", "--out", out, *flags]
        return Plan(argv, keep=[model.parent], absent=[out])
    return setup


def _sample_decoding_to_nan(ctx: Ctx) -> Plan:
    """Latents fine, but the VAE's output is NaN for the second prompt (an fp16 overflow in the decoder)."""
    from cxrdist.sampling import pipeline

    real = pipeline._decode_raw

    def decode(base, latents):
        pixels = real(base, latents)
        pixels[1:] = float("nan")
        return pixels

    ctx.monkeypatch.setattr(pipeline, "_decode_raw", decode)
    model = ctx.fixture("tiny_adapter")
    out = ctx.tmp / "out"
    argv = ["sample", "--model-path", model, "--description", "Normal heart.", "--description", "Small effusion.",
            "--steps", "2", "--out", out]
    return Plan(argv, keep=[model], absent=[out])


def _adapter_alpha_not_finite(ctx: Ctx) -> Plan:
    ctx.forbid_model_load()
    folder = ctx.tmp / "model" / "a"
    shutil.copytree(ctx.fixture("tiny_adapter"), folder)
    text = (folder / METADATA_NAME).read_text(encoding="utf-8")
    meta = json.loads(text)
    meta["adapter"]["unet"]["alpha"] = float("inf")
    (folder / METADATA_NAME).write_text(json.dumps(meta), encoding="utf-8")  # json writes Infinity
    out = ctx.tmp / "out"
    return Plan(["sample", "--model-path", folder, "--description", "Clear.", "--out", out], keep=[folder.parent],
                absent=[out], check=_no_model_loaded(ctx))


NONFINITE_CASES = [
    Case("sample-adapter-alpha-1e30", _sample_exploding(),
         r"prompt 0 \(image 0, seed 0\) came out as NaN/inf in its latents from model '.*exploding' on base "
         r"'preset:tiny'.*nothing was written.*check the adapter"),
    Case("sample-adapter-alpha-1e30-two-images-each", _sample_exploding("--num-images", "2", "--seed", "5"),
         r"prompt 0 \(image 0, seed 5\) came out as NaN/inf"),
    Case("sample-decoded-pixels-nan", _sample_decoding_to_nan,
         r"prompt 1 \(image 1, seed 1\) came out as NaN/inf in its decoded pixels"),
    Case("sample-adapter-alpha-infinity", _adapter_alpha_not_finite, r"'adapter\.unet\.alpha' is not a finite number"),
]


def test_generate_images_refuses_nan_before_converting(tiny_base_path):
    from cxrdist.models.loading import load_base
    from cxrdist.sampling.pipeline import NonFiniteSample, SampleSettings, generate_images

    base = load_base(tiny_base_path)
    first = next(base.unet.parameters())
    with torch.no_grad():
        first.fill_(float("nan"))
    with pytest.raises(NonFiniteSample, match=r"prompt 0 \(image 0, seed 3\) came out as NaN/inf in its latents "
                                              r"from base") as caught:
        generate_images(base, ["a", "b"], SampleSettings(steps=1, scheduler="ddim"), seeds=[3, 4])
    assert caught.value.naming("runs/x", 7).args[0].startswith("prompt 7 (image 0, seed 3)")
    assert "from model 'runs/x' on base" in str(caught.value.naming("runs/x", 7))


# ---- 5. one-line errors: pickled weights, duplicate columns, shared flags, special files -------------------

def _base_with_pickle(component: str, weights: str):
    """A copy of the tiny base whose `component` weights are a pickle that runs code when unpickled."""
    def setup(ctx: Ctx) -> Plan:
        base = ctx.tmp / "model" / "base"
        shutil.copytree(ctx.fixture("tiny_base_path"), base)
        for old in (base / component).glob("*.safetensors"):
            old.unlink()
        marker = ctx.tmp / "pwned"
        plant(base / component / weights, marker)
        out = ctx.tmp / "out"

        def check(result) -> None:
            assert not marker.exists(), "the pickle ran"
        return Plan(["sample", "--model-path", base, "--description", "Clear.", "--steps", "1", "--out", out],
                    keep=[base], absent=[out, marker], check=check)
    return setup


def _lora_folder(files: dict[str, object], with_base: bool = True):
    """A diffusers LoRA folder (no cxrdist.json) holding `files`: name -> bytes, or "pickle" for a hostile one."""
    def setup(ctx: Ctx) -> Plan:
        ctx.forbid_model_load()
        folder = ctx.tmp / "model" / "lora"
        folder.mkdir(parents=True)
        marker = ctx.tmp / "pwned"
        for name, content in files.items():
            if content == "pickle":
                plant(folder / name, marker)
            else:
                (folder / name).write_bytes(content)
        out = ctx.tmp / "out"
        argv = ["sample", "--model-path", folder, "--description", "Clear.", "--out", out]
        if with_base:
            argv += ["--base", "preset:tiny"]

        def check(result) -> None:
            assert not marker.exists(), "the pickle ran"
            assert ctx.model_loads == [], "the base loaded before the LoRA was checked"
        return Plan(argv, keep=[folder], absent=[out, marker], check=check)
    return setup


PICKLE_CASES = [
    Case("base-text-encoder-hostile-bin", _base_with_pickle("text_encoder", "pytorch_model.bin"),
         r"text_encoder/pytorch_model\.bin is a pickled weights file .*convert the weights to \.safetensors"),
    Case("base-unet-hostile-bin", _base_with_pickle("unet", "diffusion_pytorch_model.bin"),
         r"unet/diffusion_pytorch_model\.bin is a pickled weights file .*convert the weights to \.safetensors"),
    Case("lora-folder-only-a-bin", _lora_folder({"pytorch_lora_weights.bin": "pickle"}),
         r"lora/pytorch_lora_weights\.bin is a pickled LoRA weights file.*convert it to "
         r"pytorch_lora_weights\.safetensors"),
    Case("lora-folder-pickle-named-safetensors", _lora_folder({WEIGHTS_NAME: "pickle"}),
         r"pytorch_lora_weights\.safetensors is not a valid safetensors file"),
]


def _duplicate_columns(ctx: Ctx) -> Plan:
    root = ctx.tmp / "in"
    good_rows(root)
    (root / "m.csv").write_bytes(CSV_TWO_REPORT_COLUMNS)
    out = ctx.tmp / "out"
    return Plan(shard_manifest(root / "m.csv", out), keep=[root], absent=[out])


DUPLICATE_CASES = [
    Case("csv-two-report-columns", _duplicate_columns,
         r"m\.csv has two columns named 'report' \(columns 3 and 5\): rename or remove one"),
    Case("jsonl-a-key-twice", _csv_bytes(JSONL_KEY_TWICE, "m.jsonl"), r"m\.jsonl:2 has the key 'report' twice"),
]


def _flags(command: str, *flags):
    """`sample` or `evaluate` with bad sampler flags: refused before a model loads or a shard is read."""
    def setup(ctx: Ctx) -> Plan:
        ctx.forbid_model_load()
        model = ctx.fixture("tiny_adapter")
        out = ctx.tmp / "out"
        if command == "sample":
            argv = ["sample", "--model-path", model, "--description", "Clear.", "--out", out, *flags]
        else:
            argv = ["evaluate", "--model-path", model, "--shards", ctx.tmp / "no-shards", "--out", out / "r.json",
                    *flags]
        return Plan(argv, keep=[model], absent=[out], check=_no_model_loaded(ctx))
    return setup


SHARED_FLAGS = [
    (("--guidance=-5",), r"'sample\.guidance' must be >= 0 \(--guidance\)"),
    (("--guidance", "nan"), r"'sample\.guidance' must be a finite"),
    (("--steps", "0"), r"'sample\.steps' must be >= 1 \(--steps\)"),
    (("--steps=-3",), r"'sample\.steps' must be >= 1 \(--steps\)"),
    (("--scheduler", "bogus"), r"'sample\.scheduler' must be one of"),
    (("--seed=-1",), r"--seed -1 is out of range"),
    (("--seed", str(2**64)), r"--seed 18446744073709551616 is out of range"),
]
FLAG_CASES = [Case(f"{command}-{'-'.join(flags).strip('-').replace('=', '')}", _flags(command, *flags), message)
              for flags, message in SHARED_FLAGS for command in ("sample", "evaluate")]


@pytest.mark.parametrize("flags", [flags for flags, _ in SHARED_FLAGS if not any("seed" in f for f in flags)])
def test_sample_and_evaluate_refuse_a_sampler_flag_with_the_same_line(flags, ctx):
    lines = []
    for command in ("sample", "evaluate"):
        ctx.forbid_model_load()
        result = invoke(_flags(command, *flags)(ctx))
        lines.append(error_line(result))
    assert lines[0] == lines[1]


def _manifest_is_a_fifo(ctx: Ctx) -> Plan:
    guard = _fifo(ctx, ctx.tmp / "in" / "m.csv")
    out = ctx.tmp / "out"
    return Plan(shard_manifest(guard.path, out), absent=[out], check=_not_rescued(guard))


def _fifo_in_manifest(column: str, reason: str):
    """6 good rows plus one whose image or report file is a FIFO: one reject, never opened."""
    def setup(ctx: Ctx) -> Plan:
        root = ctx.tmp / "in"
        rows = good_rows(root)
        guard = _fifo(ctx, root / ("img/pipe.png" if column == "image" else "pipe.txt"))
        if column == "image":
            rows.append({"image": "img/pipe.png", "group": "pipe", "report": "Pipe.", "report_path": ""})
        else:
            write_png(root / "img" / "other.png", seed=50)
            rows.append({"image": "img/other.png", "group": "pipe", "report": "", "report_path": "pipe.txt"})
        manifest = write_manifest(root / "m.csv", rows)
        out = ctx.tmp / "out"

        def check(result) -> None:
            rejects = rejects_of(out)
            assert [r["reason"] for r in rejects] == [reason] and "a FIFO, not a regular file" in rejects[0]["detail"]
            assert index_of(out)["counts"]["written"] == 6
        return Plan(shard_manifest(manifest, out), check=_both(check, _not_rescued(guard)))
    return setup


def _fifo_in_model(where: str):
    """A FIFO in place of a file the model loader would open."""
    def setup(ctx: Ctx) -> Plan:
        ctx.forbid_model_load()  # the FIFO is found before any weights load
        out = ctx.tmp / "out"
        if where == "model-path":
            guard = _fifo(ctx, ctx.tmp / "model.zip")
            model = guard.path
        elif where == "base":
            model = ctx.tmp / "model" / "base"
            shutil.copytree(ctx.fixture("tiny_base_path"), model)
            (model / "tokenizer" / "tokenizer.json").unlink()
            guard = _fifo(ctx, model / "tokenizer" / "tokenizer.json")
        else:
            model = ctx.tmp / "model" / "a"
            shutil.copytree(ctx.fixture("tiny_adapter"), model)
            name = METADATA_NAME if where == "metadata" else WEIGHTS_NAME
            (model / name).unlink()
            guard = _fifo(ctx, model / name)
        argv = ["sample", "--model-path", model, "--description", "Clear.", "--steps", "1", "--out", out]
        return Plan(argv, absent=[out], check=_both(_not_rescued(guard), _no_model_loaded(ctx)))
    return setup


SPECIAL_FILE_CASES = [
    Case("manifest-is-a-fifo", _manifest_is_a_fifo, r"manifest .*m\.csv is a FIFO, not a regular file"),
    Case("manifest-image-is-a-fifo", _fifo_in_manifest("image", "missing_image"), None),
    Case("manifest-report-file-is-a-fifo", _fifo_in_manifest("report_path", "missing_report"), None),
    Case("model-path-is-a-fifo", _fifo_in_model("model-path"), r"model path .*model\.zip is a FIFO"),
    Case("base-tokenizer-file-is-a-fifo", _fifo_in_model("base"),
         r"tokenizer/tokenizer\.json in the model folder is a FIFO, not a regular file"),
    Case("adapter-metadata-is-a-fifo", _fifo_in_model("metadata"), r"a/cxrdist\.json in the model folder is a FIFO"),
    Case("adapter-weights-is-a-fifo", _fifo_in_model("weights"),
         r"a/pytorch_lora_weights\.safetensors in the model folder is a FIFO"),
]


# ---- 6. temporary names never touch a user's folder --------------------------------------------------------

def _init_model_beside_partial_folders(ctx: Ctx) -> Plan:
    """Folders named like the old temporary names (`X.partial`, `X.<pid>.partial`) hold user files."""
    out = ctx.tmp / "tiny"
    mine = [ctx.tmp / "tiny.partial", ctx.tmp / f"tiny.{os.getpid()}.partial"]
    for folder in mine:
        folder.mkdir()
        (folder / "notes.txt").write_text("user data", encoding="utf-8")

    def check(result) -> None:
        assert (out / "model_index.json").is_file()
        assert not [p for p in ctx.tmp.iterdir() if p.name.endswith(TEMP_SUFFIX)], "a temporary folder was left"
    return Plan(["init-model", "tiny", "--out", out], keep=mine, check=check)


def _init_model_into_a_full_folder(ctx: Ctx) -> Plan:
    out = ctx.tmp / "tiny"
    out.mkdir()
    (out / "keep.txt").write_text("user data", encoding="utf-8")
    return Plan(["init-model", "tiny", "--out", out], keep=[out])


TEMP_NAME_CASES = [
    Case("init-model-beside-partial-folders", _init_model_beside_partial_folders, None),
    Case("init-model-into-a-full-folder", _init_model_into_a_full_folder, r"tiny exists and is not empty"),
]


def test_save_adapter_and_save_base_leave_partial_folders_alone(tmp_path, monkeypatch, tiny_base_path):
    from cxrdist.config import LoraConfig
    from cxrdist.models.loading import load_base, save_base
    from cxrdist.models.lora import adapter_metadata, adapter_state_dicts, attach_lora, save_adapter
    from cxrdist.models.presets import build_preset

    users = [tmp_path / "adapter.partial", tmp_path / "base.partial"]
    for folder in users:
        folder.mkdir()
        (folder / "notes.txt").write_text("user data", encoding="utf-8")
    before = snapshot(users)
    base = load_base(tiny_base_path)
    spec = attach_lora(base, LoraConfig(unet_rank=2, train_text_encoder=False))
    tensors = adapter_state_dicts(base.unet, base.text_encoder)
    save_adapter(tmp_path / "adapter", *tensors, adapter_metadata(base, spec, "{report}"))
    save_base(build_preset("tiny"), tmp_path / "base")
    assert snapshot(users) == before
    assert (tmp_path / "adapter" / WEIGHTS_NAME).is_file() and (tmp_path / "base" / "model_index.json").is_file()

    # A save that fails half-way removes its own temporary folder and nothing else.
    from diffusers import StableDiffusionPipeline

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StableDiffusionPipeline, "save_lora_weights", fail)
    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", fail)
    with pytest.raises(OSError):
        save_adapter(tmp_path / "adapter2", *tensors, adapter_metadata(base, spec, "{report}"))
    with pytest.raises(OSError):
        save_base(build_preset("tiny"), tmp_path / "base2")
    assert snapshot(users) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "adapter.partial", "base", "base.partial"]


# ---- the battery -------------------------------------------------------------------------------------------

CASES = LANGUAGE_CASES + UNICODE_CASES + FLOAT_IMAGE_CASES + NONFINITE_CASES + PICKLE_CASES + DUPLICATE_CASES + \
    FLAG_CASES + SPECIAL_FILE_CASES + TEMP_NAME_CASES


@pytest.mark.parametrize("case", params(CASES))
def test_text_image_model_input(case: Case, ctx: Ctx):
    run_case(case, ctx)


def test_a_folder_name_that_is_not_utf8_is_read_and_recorded_byte_for_byte(tmp_path):
    """Linux file names are bytes: one that is not UTF-8 reaches Python as lone surrogates, which the shard's
    metadata and rejects.jsonl must still write as UTF-8 and give back unchanged."""
    from cxrdist.data.shard import build_shards

    root = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/r\xffoot"))
    root.mkdir()
    rows = []
    for i in range(8):
        write_png(root / f"im{i}.png", seed=i)
        rows.append({"image": f"im{i}.png", "group": f"p{i}", "report": f"Heart size normal, case {i}."})
    rows.append({"image": "gone.png", "group": "p9", "report": "Lungs clear."})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    index = build_shards(ManifestSource(manifest, root=root), tmp_path / "out", size=16, folds=2,
                         test_fraction=0.25, seed=0, shard_size=4, workers=1, progress=False)
    assert index["counts"]["written"] == 8 and index["rejects"] == {"missing_image": 1}
    paths = set()
    for tar in (tmp_path / "out").glob("*.tar"):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    paths.add(json.loads(archive.extractfile(member).read().decode("utf-8"))["source_path"])
    assert {os.fsencode(p) for p in paths} == {os.fsencode(str(root / f"im{i}.png")) for i in range(8)}
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text(encoding="utf-8"))
    assert os.fsencode(reject["source_path"]) == os.fsencode(str(root / "gone.png"))
