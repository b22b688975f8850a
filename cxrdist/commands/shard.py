"""`cxrdist shard ...`: build WebDataset shard sets from a source, and inspect them. Parse, call, report."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import click

from cxrdist.cli_options import friendly_errors


def _build_options(default_size: int) -> Callable:
    def decorate(func: Callable) -> Callable:
        options = [
            click.option("--out", "out", required=True, type=click.Path(file_okay=False),
                         help="Folder for the shard set (index.json, rejects.jsonl, <split>-NNNNNN.tar)."),
            click.option("--size", default=default_size, show_default=True, help="Square image side in pixels."),
            click.option("--folds", default=5, show_default=True, help="Cross-validation folds of the non-test part."),
            click.option("--test-fraction", type=float, default=None,
                         help="Share of groups (patients / reports) held out as the test split [default: 0.2; "
                              "refused with --official-split, which uses the data set's own]."),
            click.option("--seed", default=0, show_default=True, help="Seed of the group-level split."),
            click.option("--shard-size", default=1000, show_default=True, help="Samples per tar file."),
            click.option("--workers", default=0, show_default=True, help="Preprocessing processes (0 = all cores)."),
            click.option("--resize", "resize_mode", type=click.Choice(["pad", "crop"]), default="pad",
                         show_default=True, help="Keep the whole image (pad) or centre-crop to a square."),
            click.option("--bit-depth", type=click.Choice(["8", "16"]), default="8", show_default=True,
                         help="PNG bit depth in the shards."),
            click.option("--resume", is_flag=True,
                         help="Continue an interrupted build in --out (kept shards are re-checked by size and "
                              "sha256; damaged ones are rebuilt). A finished set is left as it is, cached latents "
                              "included, and a stopped cache-latents swap is finished first."),
            click.option("--max-reject-fraction", default=0.5, show_default=True, type=click.FloatRange(0, 1),
                         help="Fail (exit 1, no index.json, this build's shards removed) when more than this "
                              "share of the inputs is rejected; a build with an empty split always fails."),
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _run_build(source, out: str, kw: dict[str, Any]) -> None:
    from cxrdist.data.shard import build_shards

    kw = dict(kw, bit_depth=int(kw["bit_depth"]))
    index = build_shards(source, out, **kw)
    _echo_build_summary(Path(out), index)


def _echo_build_summary(out: Path, index: dict) -> None:
    run, counts = index["run"], index["counts"]
    n_shards = sum(len(s["shards"]) for s in index["splits"].values())
    if run.get("latents_swap_finished"):
        click.echo(f"finished the stopped cache-latents of {out} first: all {run['latents_swap_finished']} shards "
                   "with latents swapped in and index.json updated")
    if run.get("already_complete"):
        click.echo(f"{out} is already complete: {counts['written']} samples in {n_shards} shards, every one matching "
                   "index.json; nothing was rebuilt")
    else:
        click.echo(f"{counts['written']} samples in {n_shards} shards at {out} "
                   f"({counts['rejected']} rejected); this run processed {run['processed']} images in "
                   f"{run['seconds']:.1f} s ({run['images_per_second']:.1f} img/s, {run['workers']} workers"
                   + (f", {run['shards_resumed']} shards kept from before" if run["shards_resumed"] else "")
                   + (f", {run['shards_rebuilt']} damaged shards rebuilt" if run.get("shards_rebuilt") else "")
                   + ")")
    if run.get("latents_dropped"):
        click.echo(f"the rebuilt shards carry no latents, so index.json no longer records any: rerun `cxrdist shard "
                   f"cache-latents {out} --pretrained <base>` to train on cached latents")
    click.echo("splits: " + ", ".join(f"{name} {s['count']} ({s['groups']} groups)"
                                      for name, s in index["splits"].items()))
    if index.get("source_summary"):
        click.echo("source: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in index["source_summary"].items()))
    if index["rejects"]:
        click.echo("rejected: " + ", ".join(f"{reason} {n}" for reason, n in index["rejects"].items())
                   + f" (every one listed in {out / 'rejects.jsonl'})")
    click.echo(f"index: {out / 'index.json'}")


@click.group()
def shard() -> None:
    """Build WebDataset shard sets (iu-xray, mimic-cxr, chexpert-plus, manifest, phantom) and inspect them."""


@shard.command("iu-xray")
@click.option("--from", "from_dir", type=click.Path(file_okay=False), default=None,
              help="Folder with NLMCXR_png.tgz / NLMCXR_reports.tgz or their extracted folders (no download).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Where archives are downloaded and extracted (default: <out>/.inputs).")
@click.option("--fields", default="findings,impression", show_default=True,
              help="Report sections that make the prompt, in order (findings, impression, indication, comparison).")
@click.option("--parallel-downloads", default=1, show_default=True, help="Parallel HTTP ranges per archive.")
@_build_options(256)
@friendly_errors
def iu_xray(from_dir, cache_dir, fields, parallel_downloads, out, **kw) -> None:
    """Indiana University / Open-i chest X-rays (CC BY-NC-ND 4.0): download or --from DIR, then shard."""
    from cxrdist.data.sources.download import prepare_iu_inputs
    from cxrdist.data.sources.iu_xray import IUXraySource

    cache = Path(cache_dir) if cache_dir else Path(out) / ".inputs"
    roots = prepare_iu_inputs(from_dir, cache, parallel=parallel_downloads)
    # --out (and the cache in it) may lie inside --from: scanning --from must not find them a second time
    source = IUXraySource([r.resolve() for r in roots], exclude=[Path(out).resolve(), cache.resolve()],
                          fields=[f.strip() for f in fields.split(",") if f.strip()])
    _run_build(source, out, kw)


@shard.command("manifest")
@click.argument("manifest_file", type=click.Path(dir_okay=False))
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Base folder for relative paths (default: the manifest's folder).")
@click.option("--image-col", default="image", show_default=True)
@click.option("--group-col", default="group", show_default=True, help="Patient or study id column.")
@click.option("--text-col", default=None, help="Report text column [default: report, if present].")
@click.option("--text-path-col", default=None, help="Column with a path to a report file [default: report_path].")
@click.option("--view-col", default=None, help="View column [default: view, if present].")
@click.option("--labels-col", default=None, help="Labels column [default: labels, if present].")
@click.option("--uid-col", default=None, help="Unique id column [default: uid, else the image file name].")
@click.option("--label-sep", default="|", show_default=True, help="Separator of labels in one CSV cell.")
@click.option("--sections", default=None,
              help="Keep only these report sections, in order (e.g. findings,impression) [default: the whole text].")
@click.option("--fallback", is_flag=True,
              help="With --sections: the report's last paragraph when it has neither FINDINGS nor IMPRESSION.")
@_build_options(256)
@friendly_errors
def manifest(manifest_file, root, image_col, group_col, text_col, text_path_col, view_col, labels_col, uid_col,
             label_sep, sections, fallback, out, **kw) -> None:
    """Any CSV / TSV / JSONL of image path + report (+ group, view, labels): MIMIC-CXR, CheXpert, PadChest..."""
    from cxrdist.data.sources.manifest import ManifestColumns, ManifestSource

    columns = ManifestColumns(image=image_col, group=group_col, text=text_col, text_path=text_path_col,
                              view=view_col, labels=labels_col, uid=uid_col, label_sep=label_sep)
    manifest_path = Path(manifest_file).resolve()
    source = ManifestSource(manifest_path, columns, root=Path(root).resolve() if root else None,
                            sections=_split_list(sections) if sections is not None else None, fallback=fallback)
    _run_build(source, out, kw)


def _report_options(func: Callable) -> Callable:
    """--views, --sections, --fallback, --official-split, --uncertain: shared by mimic-cxr and chexpert-plus."""
    options = [
        click.option("--views", default="PA,AP", show_default=True,
                     help="Views to keep (PA, AP, LATERAL, LL, ...; 'frontal' = PA,AP, 'lateral' = LATERAL,LL, "
                          "'all')."),
        click.option("--sections", default="findings,impression", show_default=True,
                     help="Report sections that make the prompt, in order (findings, impression, indication, "
                          "comparison, technique, examination, wet_read, addendum)."),
        click.option("--fallback", is_flag=True,
                     help="Use the report's last paragraph when it has neither FINDINGS nor IMPRESSION."),
        click.option("--official-split/--no-official-split", default=True, show_default=True,
                     help="The data set's own held-out images are the test split and the rest is drawn into "
                          "patient-level folds (--test-fraction is then refused)."),
        click.option("--uncertain", type=click.Choice(["drop", "positive", "negative", "uncertain"]), default="drop",
                     show_default=True, help="What a -1.0 (uncertain) CheXpert label becomes: left out, a positive "
                                             "label, a negative one (sample JSON extra.negative_labels), or "
                                             "'Label/uncertain'."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@shard.command("mimic-cxr")
@click.option("--root", required=True, type=click.Path(file_okay=False),
              help="MIMIC-CXR-JPG (or MIMIC-CXR DICOM) folder: files/ and the mimic-cxr-2.0.0-*.csv.gz tables.")
@click.option("--reports", type=click.Path(), default=None,
              help="mimic-cxr-reports.zip or its extracted folder [default: <root>/mimic-cxr-reports.zip, else "
                   "sSTUDY.txt files under <root>/files].")
@_report_options
@click.option("--labeler", type=click.Choice(["auto", "chexpert", "negbio", "none"]), default="auto",
              show_default=True, help="Label table: -chexpert, else -negbio (auto).")
@click.option("--layout", type=click.Choice(["auto", "jpg", "dicom"]), default="auto", show_default=True,
              help="jpg: the metadata table and .jpg files; dicom: cxr-record-list.csv.gz and .dcm files.")
@_build_options(256)
@friendly_errors
def mimic_cxr(root, reports, views, sections, fallback, official_split, uncertain, labeler, layout, out,
              **kw) -> None:
    """MIMIC-CXR-JPG / MIMIC-CXR (PhysioNet credentialed access): images, reports zip, split and labels."""
    from cxrdist.data.sources.mimic_cxr import MimicCXRSource

    source = MimicCXRSource(Path(root).resolve(), reports=Path(reports).resolve() if reports else None,
                            views=views, sections=_split_list(sections), fallback=fallback,
                            official_split=official_split, uncertain=uncertain, labeler=labeler, layout=layout)
    _run_build(source, out, kw)


@shard.command("chexpert-plus")
@click.option("--root", required=True, type=click.Path(file_okay=False),
              help="Folder the CSV's image paths are relative to (PNG/ and DICOM/ subfolders are found too).")
@click.option("--csv", "csv_file", required=True, type=click.Path(dir_okay=False),
              help="df_chexpert_plus_*.csv (path_to_image, frontal_lateral, ap_pa, deid_patient_id, section_*, "
                   "split).")
@click.option("--image-format", type=click.Choice(["png", "dicom"]), default="png", show_default=True,
              help="Read path_to_image (PNG) or path_to_dcm (DICOM).")
@_report_options
@_build_options(256)
@friendly_errors
def chexpert_plus(root, csv_file, image_format, views, sections, fallback, official_split, uncertain, out,
                  **kw) -> None:
    """CheXpert Plus (Stanford AIMI): image-report pairs from its CSV, split column honoured."""
    from cxrdist.data.sources.chexpert_plus import CheXpertPlusSource

    source = CheXpertPlusSource(Path(root).resolve(), Path(csv_file).resolve(), image_format=image_format,
                                views=views, sections=_split_list(sections), fallback=fallback,
                                official_split=official_split, uncertain=uncertain)
    _run_build(source, out, kw)


@shard.command("phantom")
@click.option("--n", "n", default=5000, show_default=True, help="Number of synthetic phantoms.")
@_build_options(64)
@friendly_errors
def phantom(n, out, **kw) -> None:
    """Procedurally generated chest phantoms with templated reports (the offline default data set)."""
    from cxrdist.data.sources import source_class

    source = source_class("phantom")(n=n, size=kw["size"], seed=kw["seed"])
    _run_build(source, out, kw)


@shard.command("inspect")
@click.argument("shards_dir", type=click.Path(file_okay=False))
@click.option("--verify", is_flag=True, help="Recompute every shard's sha256 against index.json.")
@click.option("--preview", type=click.Path(dir_okay=False), default=None,
              help="Preview grid PNG path (default: <dir>/preview.png).")
@click.option("--no-preview", is_flag=True, help="Skip the preview grid.")
@click.option("--split", default=None, help="Split shown in the preview (default: test, else fold0).")
@click.option("-n", "n", default=16, show_default=True, help="Samples in the preview grid.")
@friendly_errors
def inspect_cmd(shards_dir, verify, preview, no_preview, split, n) -> None:
    """Print a shard set's summary, verify checksums, and write a preview grid with prompts."""
    from cxrdist.data.index import load_index, verify_checksums
    from cxrdist.data.inspect import preview_grid, summary_lines
    from cxrdist.errors import DataError

    index = load_index(shards_dir)
    for line in summary_lines(index):
        click.echo(line)
    if verify:
        problems = verify_checksums(index, raise_on_error=False)
        for problem in problems:
            click.echo(f"BAD  {problem}", err=True)
        n_shards = sum(len(s["shards"]) for s in index.splits.values())
        if problems:
            raise DataError(f"{len(problems)} of {n_shards} shards failed verification: rebuild the shard set")
        click.echo(f"verified    {n_shards} shards: all sha256 match index.json")
    if not no_preview:
        # a remote shard set's preview goes to the current folder unless --preview says where
        default = "preview.png" if index.remote else os.path.join(shards_dir, "preview.png")
        path = preview_grid(index, preview or default, n=n, split=split)
        click.echo(f"preview     {path}")
