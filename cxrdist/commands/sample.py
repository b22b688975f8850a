"""`cxrdist sample`: synthetic radiographs from report text. Parses flags, calls cxrdist.sampling.run, reports."""
from __future__ import annotations

import click

from cxrdist.cli_options import config_options, friendly_errors

# Flags that override a `sample.*` config field (None = not given, keep the config's value).
SAMPLE_FLAGS = ("num_images", "steps", "scheduler", "guidance", "negative_prompt", "seed", "height", "width",
                "batch_size", "device", "dtype")


def apply_sample_flags(cfg, flags: dict):
    """The config with the given sampler flags (--steps, --guidance, ...) set in its `sample` section, checked by
    that section's rules: `sample` and `evaluate` take these flags through here, so they refuse the same values
    with the same message (`'sample.guidance' must be >= 0 (--guidance)`)."""
    from cxrdist.config import merge

    return merge(cfg, {"sample": {k: v for k, v in flags.items() if k in SAMPLE_FLAGS and v is not None}})


@click.command()
@click.option("--model-path", required=True, metavar="PATH",
              help="LoRA checkpoint folder, a .zip of one, a training checkpoint (runs/NAME/foldK/checkpoints/step_N) "
                   "or a full diffusers pipeline folder.")
@click.option("--base", default=None, metavar="PATH|HUB_ID|preset:NAME",
              help="Load a LoRA on this base instead of the one recorded in its cxrdist.json.")
@click.option("--description", "descriptions", multiple=True, metavar="TEXT",
              help="Report text to draw (repeatable). The checkpoint's prompt template is applied once.")
@click.option("--prompts-file", default=None, metavar="FILE",
              help="More reports: .txt (one per line) or .jsonl ({\"report\": ...} per line).")
@click.option("--num-images", type=int, default=None, help="Images per description [sample.num_images: 1].")
@click.option("--steps", type=int, default=None, help="Denoising steps [sample.steps: 25].")
@click.option("--scheduler", default=None, help="dpm++ | ddim | pndm | euler | ddpm [sample.scheduler: dpm++].")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale [sample.guidance: 4.0].")
@click.option("--negative-prompt", default=None, help="Negative prompt, used as is [sample.negative_prompt: \"\"].")
@click.option("--seed", type=int, default=None, help="Image i of the run gets seed + i [sample.seed: 0].")
@click.option("--height", type=int, default=None, help="Pixels; 0 = the base's size [sample.height: 0].")
@click.option("--width", type=int, default=None, help="Pixels; 0 = the base's size [sample.width: 0].")
@click.option("--batch-size", type=int, default=None, help="Images per forward pass [sample.batch_size: 8].")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N | mps [sample.device: auto].")
@click.option("--dtype", default=None, help="fp32 | bf16 | fp16 [sample.dtype: fp32].")
@click.option("--out", default=None, metavar="DIR",
              help="New or empty folder for the images [samples/<model>-<time>]; it appears complete or not at "
                   "all. A folder that already holds samples is refused; one whose run was stopped while moving "
                   "its files in is finished first (and then refused, saying so).")
@config_options
@friendly_errors
def sample(model_path, base, descriptions, prompts_file, out, config, overrides, **flags) -> None:
    """Generate synthetic chest X-rays from report text with a LoRA checkpoint or a full pipeline."""
    from cxrdist.cli_options import load_command_config
    from cxrdist.logging_utils import setup_logging
    from cxrdist.sampling.output import read_prompts
    from cxrdist.sampling.run import default_out_dir, sample_to_folder

    setup_logging()
    cfg = load_command_config(config, overrides, command="sample", reads=("sample", "model"))
    cfg = apply_sample_flags(cfg, flags)
    reports = read_prompts(descriptions, prompts_file)
    summary = sample_to_folder(cfg, model_path, reports, out or default_out_dir(model_path), base_override=base)
    n = len(summary["files"])
    click.echo(f"wrote {n} synthetic image(s) of {summary['height']}x{summary['width']} px in "
               f"{summary['seconds']:.1f} s ({n / max(summary['seconds'], 1e-9):.2f} img/s on {summary['device']}) "
               f"to {summary['out']}/")
    click.echo(f"  index: {summary['out'] / 'index.jsonl'}   grid: {summary['out'] / 'grid.png'}")
