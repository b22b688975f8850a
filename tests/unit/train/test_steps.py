"""The training step, on in-memory data and the tiny preset: what an expert checks first."""
from __future__ import annotations

import math

import pytest
import torch

from cxrdist.train.steps import optimizer_steps
from support.fakes import make_trainer


def fixed_loss(trainer):
    from cxrdist.train.validation import build_loss_set, diffusion_loss

    data = build_loss_set(trainer.data.train_batches(0), trainer.encoder, trainer.accelerator.device, 0)
    return diffusion_loss(trainer.model, trainer.objective, data, [100, 300, 500, 700, 900], 8, trainer.accelerator)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning threads per process are 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trainer(tmp_path):
    t = make_trainer(tmp_path, "optim.lr_unet=3e-2", "optim.lr_text=3e-2", "train.caption_dropout=0", n_train=8)
    yield t
    t.close()


def test_loss_falls_and_only_adapters_change(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {f"{part}.{n}": p.detach().clone() for part, m in (("unet", model.unet), ("text", model.text_encoder),
                                                                 ("vae", trainer.base.vae)) for n, p in m.named_parameters()}
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    named = {f"{part}.{n}": p for part, m in (("unet", model.unet), ("text", model.text_encoder),
                                              ("vae", trainer.base.vae)) for n, p in m.named_parameters()}
    assert in_optimizer == {id(p) for n, p in named.items() if "lora_" in n}
    loss0 = fixed_loss(trainer)
    list(optimizer_steps(trainer, 20))
    loss1 = fixed_loss(trainer)  # same samples, noise and timesteps as loss0: any change is the training
    assert loss1 < 0.97 * loss0, (loss0, loss1)
    changed = {n for n, p in named.items() if not torch.equal(p.detach(), before[n])}
    assert changed, "nothing trained"
    assert all("lora_" in n for n in changed), sorted(n for n in changed if "lora_" not in n)[:5]
    assert any(n.startswith("unet.") for n in changed) and any(n.startswith("text.") for n in changed)
    assert all(p.dtype == torch.float32 for n, p in named.items() if "lora_" in n)


def test_clipping_clips_every_optimizer_step(tmp_path):
    t = make_trainer(tmp_path, "optim.max_grad_norm=1e-4", "train.grad_accum=2")
    seen = []
    inner = t.optimizer.optimizer
    original = inner.step

    def spy(*args, **kwargs):
        grads = [p.grad for g in inner.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return original(*args, **kwargs)

    inner.step = spy
    try:
        logs = list(optimizer_steps(t, 3))
    finally:
        t.close()
    assert len(seen) == 3  # one optimizer step per 2 micro-batches
    assert all(n <= 1e-4 * 1.001 for n in seen), seen
    assert all(log["grad_norm"] > 1e-3 for log in logs), logs  # the logged norm is the pre-clip norm


def test_lr_follows_warmup_then_cosine_per_optimizer_step(tmp_path):
    from cxrdist.train.optim import lr_multiplier

    t = make_trainer(tmp_path, "optim.warmup_steps=2", "train.max_steps=8", "train.grad_accum=2",
                     "optim.lr_unet=1e-3", "optim.lr_text=4e-4")
    try:
        lrs = [t.lr_scheduler.get_last_lr()]
        for _ in range(8):
            list(optimizer_steps(t, 1))
            lrs.append(t.lr_scheduler.get_last_lr())
    finally:
        t.close()
    for step, (lr_unet, lr_text) in enumerate(lrs):
        expected = lr_multiplier("cosine", step, 2, 8)
        assert lr_unet == pytest.approx(1e-3 * expected) and lr_text == pytest.approx(4e-4 * expected)
    assert lrs[1][0] > lrs[0][0] and lrs[2][0] == pytest.approx(1e-3)  # warm-up reaches the peak
    assert lrs[-1][0] == pytest.approx(0.0, abs=1e-12)  # cosine ends at zero
    assert 0.5 * (1 + math.cos(math.pi * 3 / 6)) == pytest.approx(lrs[5][0] / 1e-3)


def test_wsd_holds_the_peak_then_decays_to_zero_over_the_last_fraction(tmp_path):
    from cxrdist.train.optim import decay_steps, lr_multiplier

    t = make_trainer(tmp_path, "optim.warmup_steps=2", "train.max_steps=12", "optim.scheduler=wsd",
                     "optim.decay_fraction=0.4", "optim.lr_unet=1e-3")
    try:
        assert decay_steps(t.cfg.optim, 12) == 4  # 0.4 of the 10 steps after warm-up
        lrs = [t.lr_scheduler.get_last_lr()[0]]
        for _ in range(12):
            list(optimizer_steps(t, 1))
            lrs.append(t.lr_scheduler.get_last_lr()[0])
    finally:
        t.close()
    assert lrs == pytest.approx([1e-3 * lr_multiplier("wsd", step, 2, 12, 4) for step in range(13)])
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1e-3)  # warm-up reaches the peak
    assert lrs[2:9] == pytest.approx([1e-3] * 7)  # held through step 8 = 12 - 4
    assert all(a > b for a, b in zip(lrs[8:], lrs[9:]))  # then decays every step ...
    assert lrs[12] == pytest.approx(0.0, abs=1e-12)  # ... to zero at the end
    assert lrs[10] == pytest.approx(1e-3 * 0.5)  # half-way through a cosine decay


def test_wsd_decay_fraction_is_validated():
    from cxrdist.config import load_config
    from cxrdist.errors import ConfigError

    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="optim.decay_fraction"):
            load_config(None, ["optim.scheduler=wsd", f"optim.decay_fraction={bad}"])


def test_caption_dropout_rate_and_template_applied_once(tiny_base_path):
    from cxrdist.models.diffusion import BatchEncoder
    from cxrdist.models.loading import load_base

    base = load_base(tiny_base_path)
    enc = BatchEncoder(base.vae, base.tokenizer, "chest x-ray: {report}", caption_dropout=0.25)
    g = torch.Generator().manual_seed(0)
    prompts = enc.prompts(["Mild cardiomegaly."] * 20000, g)
    dropped = sum(p == "" for p in prompts) / len(prompts)
    assert abs(dropped - 0.25) < 0.015
    assert set(prompts) == {"", "chest x-ray: Mild cardiomegaly."}
    assert enc.prompts(["Mild cardiomegaly."], None) == ["chest x-ray: Mild cardiomegaly."]  # validation: no drop
    enc.caption_dropout = 0.0
    assert "" not in enc.prompts(["a"] * 1000, g)


def test_latents_from_pixels_in_minus_one_one_equal_cached(tiny_base_path):
    from cxrdist.models.diffusion import BatchEncoder
    from cxrdist.models.loading import load_base

    base = load_base(tiny_base_path)
    enc = BatchEncoder(base.vae, base.tokenizer, "{report}", 0.0)
    pixels = torch.rand(2, 1, 64, 64) * 2 - 1
    raw = base.vae.encode(pixels).latent_dist.mode()
    on_the_fly = enc.latents({"pixel_values": pixels}, "cpu")
    cached = enc.latents({"pixel_values": None, "latents": raw.half()}, "cpu")
    assert torch.allclose(on_the_fly, raw * base.vae.config.scaling_factor)
    assert torch.allclose(on_the_fly, cached, atol=2e-2)
