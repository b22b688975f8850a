"""cxrdist.models.diffusion: the trainable model around a denoiser and a text encoder, and the training objective.

A frozen text encoder must not be put in train mode with the rest (its dropout would give another context at
every call), and the min-SNR loss weights must stay finite where a zero-terminal-SNR schedule reaches SNR = 0."""
from __future__ import annotations

import pytest
import torch


def test_a_frozen_text_encoder_stays_in_eval_mode_when_the_model_trains():
    """MiniLM has dropout 0.1: a frozen encoder in train mode gives a different context at every call."""
    from cxrdist.models.diffusion import LoraDiffusionModel
    from cxrdist.models.loading import load_base
    from cxrdist.models.text import tokenize

    base = load_base("preset:tiny-minilm")
    model = LoraDiffusionModel(base.unet, base.text_encoder, train_text_encoder=False).train()
    assert model.unet.training and not model.text_encoder.training
    assert not any(m.training for m in model.text_encoder.modules())
    ids, mask = tokenize(base.tokenizer, ["Mild cardiomegaly. Small left pleural effusion."], warn=False)
    torch.manual_seed(1)
    first = model.encode_text(ids, mask)
    torch.manual_seed(2)
    assert torch.equal(first, model.encode_text(ids, mask))
    trained = LoraDiffusionModel(base.unet, base.text_encoder, train_text_encoder=True).train()
    assert trained.text_encoder.training  # an encoder that trains keeps its train mode


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_are_finite_on_a_zero_terminal_snr_schedule(prediction_type):
    from cxrdist.models.diffusion import DiffusionObjective

    conf = {"num_train_timesteps": 1000, "prediction_type": prediction_type, "beta_schedule": "scaled_linear",
            "rescale_betas_zero_snr": True}
    objective = DiffusionObjective(conf, snr_gamma=5.0)
    assert float(objective.scheduler.alphas_cumprod[-1]) == 0.0  # SNR is exactly 0 at the last timestep
    weights = objective.snr_weights(torch.arange(1000))
    assert torch.isfinite(weights).all()
    if prediction_type == "epsilon":  # min(SNR, gamma) / SNR: 1 wherever SNR < gamma, the limit at SNR = 0
        assert float(weights[-1]) == 1.0
        snr = objective.scheduler.alphas_cumprod[10] / (1 - objective.scheduler.alphas_cumprod[10])
        assert float(weights[10]) == pytest.approx(min(float(snr), 5.0) / float(snr))
