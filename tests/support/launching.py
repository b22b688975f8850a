"""`accelerate launch` of the real training command on 2 CPU ranks, and reading back what a run wrote."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from support.processes import PORT_TRIES, free_port, port_taken, reap, start  # free_port: tests import it here
from support.training import REPO, child_env, run_reaped

ACCEL = REPO / "configs" / "accelerate"
DEEPSPEED = REPO / "configs" / "deepspeed"
LAUNCH_TIMEOUT_S = 300
SCALE = ["model.pretrained=preset:tiny", "data.image_size=64", "data.max_train_samples=32", "data.shuffle_buffer=1",
         "train.batch_size=4", "train.log_every=1", "train.max_steps=4", "train.checkpoint_every=2",
         "eval.eval_every_steps=2", "eval.num_metric_images=1", "eval.num_grid_prompts=1", "eval.inference_steps=2",
         "eval.val_loss_timesteps=[200,600]", "eval.max_eval_samples=1", "sample.batch_size=2",
         "optim.lr_unet=1e-2", "optim.lr_text=1e-2"]
STEP4 = Path("fold1") / "checkpoints" / "step_00000004"
# LoRA values after 4 steps at lr 1e-2 (|w| up to ~0.5): ZeRO-3 vs ZeRO-2 measured 1.3e-5, DDP vs one process
# ~1e-5 (float reduction order); a wrong gather, a missing rank or a different batch is >= 1e-3.
ADAPTER_ATOL = 1e-4


def train_args(shards: Path, out: Path, sets: list[str], extra: tuple[str, ...] = ()) -> list[str]:
    return ["--fold", "1", "--shards", str(shards), "--output-dir", str(out),
            *[a for s in SCALE + sets for a in ("--set", s)], *extra]


def launch_command(config: Path | None, shards: Path, out: Path, sets: tuple[str, ...], extra: tuple[str, ...]):
    prefix = [sys.executable]
    if config is not None:
        prefix += ["-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--main_process_port", str(free_port())]
    return prefix + [str(REPO / "launch" / "train.py"), *train_args(shards, out, list(sets), extra)]


def launch(config: Path | None, shards: Path, out: Path, *sets: str, extra: tuple[str, ...] = (), env=None,
           timeout: int = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """launch/train.py under `accelerate launch --config_file config` (2 ranks), or one plain process."""
    cmd = launch_command(config, shards, out, sets, extra)
    return run_reaped(cmd, env=env or child_env(DS_ACCELERATOR="cpu"), timeout=timeout)


def launch_until(config: Path, shards: Path, out: Path, *sets: str, line_starts: str, env=None,
                 timeout: int = LAUNCH_TIMEOUT_S) -> tuple[str | None, str]:
    """Like `launch`, but read stderr only until a line starting with `line_starts` appears, then kill the
    launcher and all its ranks (a SIGSTOPped rank included, which the launcher would wait 30 s for); they are
    killed and reaped whatever happens while reading. Returns (that line or None, the stderr read so far)."""
    for attempt in range(1, PORT_TRIES + 1):
        proc = start(launch_command(config, shards, out, sets, ()), cwd=REPO,
                     env=env or child_env(DS_ACCELERATOR="cpu"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                     text=True)
        deadline, seen, found = time.monotonic() + timeout, [], None
        try:
            for line in proc.stderr:
                seen.append(line)
                if line.startswith(line_starts):
                    found = line.rstrip("\n")
                    break
                if time.monotonic() > deadline:
                    break
        finally:
            reap(proc)
            proc.stderr.close()
        if found is not None or attempt == PORT_TRIES or not port_taken("".join(seen)):
            return found, "".join(seen)
    raise AssertionError("unreachable")


def two_machines(config: Path, shards, outs: tuple[Path, Path], *sets: str, extra: tuple[str, ...] = (),
                 env=None, timeout: int = LAUNCH_TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """Two `accelerate launch` processes on this host as machine 0 and machine 1 of a 2-machine world (one rank
    each, static rendezvous on 127.0.0.1), each writing to its own `outs[k]` (the same folder twice for a shared
    filesystem). A multi-node DeepSpeed config brings `deepspeed_multinode_launcher: standard` itself. Both are
    killed and reaped with all they started before this returns; a rendezvous port taken meanwhile (machine 0
    fails to bind it) is retried on another."""
    for attempt in range(1, PORT_TRIES + 1):
        port, launchers = free_port(), []
        try:
            for rank in (0, 1):
                launchers.append(start(
                    [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                     "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
                     "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                     str(REPO / "launch" / "train.py"), *train_args(shards, outs[rank], list(sets), extra)],
                    cwd=REPO, env=env or child_env(DS_ACCELERATOR="cpu"), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True))
            first = launchers[0].communicate(timeout=timeout)
            if launchers[0].returncode and port_taken(first[1]) and attempt < PORT_TRIES:
                continue  # machine 1 waits for a store that never comes: the finally ends it
            outputs = [first, launchers[1].communicate(timeout=timeout)]
        finally:
            for p in launchers:
                reap(p)
        return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(launchers, outputs)]
    raise AssertionError("unreachable")


def rewind_to_step2(run: Path, copy: Path) -> Path:
    """A copy of a finished 4-step run as it stood after its step-2 checkpoint: later checkpoints and what the end
    of the run wrote are removed, so `--resume latest` continues from step 2."""
    import shutil

    shutil.copytree(run, copy)
    fold = copy / "fold1"
    for path in fold.iterdir():
        if path.name not in ("checkpoints", "tensorboard"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for checkpoint in (fold / "checkpoints").iterdir():
        if checkpoint.name != "step_00000002":
            shutil.rmtree(checkpoint)
    return copy


def deepspeed_config(tmp: Path, stage: int, **zero: object) -> Path:
    """A copy of configs/accelerate/zero{stage}.yaml pointing at a DeepSpeed JSON with `zero` changed."""
    ds = json.loads((DEEPSPEED / f"zero{stage}.json").read_text())
    ds["zero_optimization"].update(zero)
    (tmp / f"zero{stage}_test.json").write_text(json.dumps(ds))
    accel = yaml.safe_load((ACCEL / f"zero{stage}.yaml").read_text())
    accel["deepspeed_config"]["deepspeed_config_file"] = str(tmp / f"zero{stage}_test.json")
    path = tmp / f"zero{stage}_test.yaml"
    path.write_text(yaml.safe_dump(accel))
    return path


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from cxrdist.train.tracking import scalar_events

    return [(e.step, e.value) for e in scalar_events(run / "fold1" / "tensorboard", tag)]


def last_by_step(values: list[tuple[int, float]]) -> dict[int, float]:
    return {step: value for step, value in values}


def max_diff(a: dict, b: dict) -> float:
    assert a and a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# Two bf16 runs from the same seed: the share of adapter elements farther apart than MOVED stays under
# MAX_SHARE_MOVED (a few sign flips of near-zero gradients under bf16 rounding); a broken path -- an update lost or
# applied twice, a step skipped -- moves 30-93 % of them (tests/integration/test_precision.py).
MOVED = 1e-3
MAX_SHARE_MOVED = 0.1


def share_beyond(a: dict, b: dict, atol: float) -> float:
    import torch

    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    return float((diff > atol).float().mean())


def best_export(run: Path) -> Path:
    found = sorted((run / "fold1").glob("best_model_fold1_epoch*"))
    assert len(found) == 1, found
    return found[0]


def check_common(run: Path, res: subprocess.CompletedProcess, what: str) -> None:
    """Finished, ranks agree, loss fell, only rank 0 wrote TensorBoard files."""
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"{what} | 2 rank(s)" in res.stderr
    digests = json.loads((run / "fold1" / "adapter_digests.json").read_text())["per_rank"]
    assert len(digests) == 2 and len(set(digests)) == 1
    train = last_by_step(scalars(run, "train/loss"))
    val = last_by_step(scalars(run, "val/val_loss"))
    assert train[4] < train[1] and val[4] < val[2], (train, val)
    events = list((run / "fold1" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and len({e.name.split(".")[-2] for e in events}) == 1  # one writer process
    assert not any(v != v for _, v in scalars(run, "train/grad_norm")), "grad norm logged as NaN"


def checkpoint_bytes(run: Path) -> int:
    return sum(f.stat().st_size for f in (run / STEP4).rglob("*") if f.is_file())


def base_bytes(tiny_base_path: str) -> int:
    return sum(f.stat().st_size for f in Path(tiny_base_path).rglob("*.safetensors"))
