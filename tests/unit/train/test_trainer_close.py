"""Closing a trainer releases its model, optimizer and validation set (so --all-folds starts each fold from the memory the first started from)."""
from __future__ import annotations


def test_closing_a_trainer_releases_its_model_optimizer_and_validation_set(tmp_path):
    """What `--all-folds` relies on to start each fold from the memory the first one started from."""
    import gc
    import weakref

    from support.fakes import make_trainer, reset_accelerate

    trainer = make_trainer(tmp_path, "train.max_steps=1")
    trainer.fit()
    held = [weakref.ref(x) for x in (trainer.base.unet, trainer.base.text_encoder, trainer.optimizer,
                                     trainer.validator)]
    trainer.close()
    reset_accelerate()
    gc.collect()
    assert [ref() is None for ref in held] == [True] * len(held)
