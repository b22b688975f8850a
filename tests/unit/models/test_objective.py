"""The diffusion objective: the base's own DDPM schedule and prediction type, the noise offset, the timestep bias."""
from __future__ import annotations

import pytest
import torch


def test_objective_uses_the_bases_ddpm_schedule_and_prediction_type():
    from cxrdist.models.diffusion import DiffusionObjective

    conf = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "v_prediction", "_class_name": "PNDMScheduler"}
    obj = DiffusionObjective(conf, snr_gamma=5.0)
    assert type(obj.scheduler).__name__ == "DDPMScheduler" and obj.prediction_type == "v_prediction"
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    noisy, target = obj.noisy_inputs(x0, noise, t)
    assert torch.allclose(target, obj.scheduler.get_velocity(x0, noise, t))
    ac = obj.scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)
    assert torch.allclose(obj.snr_weights(t), torch.clamp(snr, max=5.0) / (snr + 1))
    assert torch.allclose(obj.per_sample_loss(target + 1, target, t), obj.snr_weights(t))
    assert torch.allclose(obj.per_sample_loss(target + 1, target, t, weighted=False), torch.ones(3))  # validation
    eps = DiffusionObjective({**conf, "prediction_type": "epsilon"})
    assert torch.equal(eps.noisy_inputs(x0, noise, t)[1], noise)
    assert torch.allclose(eps.per_sample_loss(noise + 1, noise, t), torch.ones(3))  # no weighting when gamma=0


def test_noise_offset_changes_per_channel_means_only_when_set():
    from cxrdist.models.diffusion import DiffusionObjective

    conf = {"num_train_timesteps": 1000, "prediction_type": "epsilon"}
    x = torch.zeros(64, 4, 16, 16)
    plain = DiffusionObjective(conf).sample_noise(tuple(x.shape), torch.Generator().manual_seed(0))
    offset = DiffusionObjective(conf, noise_offset=0.5).sample_noise(tuple(x.shape), torch.Generator().manual_seed(0))
    assert plain.mean(dim=(2, 3)).std() < 0.1 < offset.mean(dim=(2, 3)).std()


def test_timestep_bias_draws_the_chosen_part_of_the_schedule_more_often():
    import functools

    from cxrdist.errors import ModelError
    from cxrdist.models.diffusion import DiffusionObjective, timestep_weights

    conf = {"num_train_timesteps": 1000, "prediction_type": "epsilon"}

    def draws(**bias):
        weighting = functools.partial(timestep_weights, **bias) if bias else None
        obj = DiffusionObjective(conf, timestep_weighting=weighting)
        g = torch.Generator().manual_seed(0)
        return torch.cat([obj.sample_timesteps(1, g) for _ in range(4000)])

    uniform = draws()
    assert torch.equal(uniform, draws(bias="later", multiplier=1.0))  # a multiplier of 1 is the uniform draw
    assert 0.2 < (uniform >= 750).float().mean() < 0.3
    later = draws(bias="later", multiplier=3.0, portion=0.25)  # 3 x 0.25 / (3 x 0.25 + 0.75) = 0.5
    assert 0.46 < (later >= 750).float().mean() < 0.54 and later.min() >= 0 and later.max() <= 999
    earlier = draws(bias="earlier", multiplier=3.0, portion=0.25)
    assert 0.46 < (earlier < 250).float().mean() < 0.54
    ranged = draws(bias="range", multiplier=5.0, begin=200, end=400)  # 5 x 0.2 / (5 x 0.2 + 0.8) = 0.56
    assert 0.52 < ((ranged >= 200) & (ranged < 400)).float().mean() < 0.6
    with pytest.raises(ModelError, match="timestep_bias_begin/end = 200/1200.*num_train_timesteps"):
        DiffusionObjective(conf, timestep_weighting=functools.partial(
            timestep_weights, bias="range", multiplier=2.0, begin=200, end=1200))
